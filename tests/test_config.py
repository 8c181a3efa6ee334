from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from radpretrain.config import load_config, save_config
from radpretrain.demo import DemoConfig
from radpretrain.errors import ConfigError
from radpretrain.finetune.config import FinetuneConfig, SweepConfig
from radpretrain.pretrain.config import PretrainConfig


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    precision: Literal["no", "bf16", "fp16"] = "no"
    tasks: dict[str, float] = field(default_factory=lambda: {"simclr": 1.0})
    optim: Optim = field(default_factory=Optim)
    resume: str | None = None


def test_defaults_file_and_overrides_layer(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 3e-4\ntasks: {metadata: 0.5}\n")
    cfg = load_config(Cfg, path, ["optim.lr=0.01", "precision=bf16"])
    assert cfg.steps == 20
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.optim.betas == [0.9, 0.999]
    assert cfg.precision == "bf16"
    # a dict set by a layer replaces the default instead of merging into it
    assert cfg.tasks == {"metadata": 0.5}


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*Did you mean 'lr'"):
        load_config(Cfg, None, ["optim.lrr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"'stepz'.*Did you mean 'steps'"):
        load_config(Cfg, path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=ten", "must be an integer"),
        ("precision=fp8", "must be one of"),
        ("optim=3", "is a section"),
        ("tasks=[1]", "must be a mapping"),
        ("steps", "must look like key=value"),
    ],
)
def test_wrong_types_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, None, [override])


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)


def test_saved_config_loads_back(tmp_path: Path) -> None:
    cfg = load_config(Cfg, None, ["resume=/x", "tasks={mae: 1.0, metadata: 0.25}"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Cfg, tmp_path / "resolved.yaml") == cfg


# YAML 1.1 reads no/off/on/yes as booleans; a field typed as text keeps them as the text written.

WORDS = ("no", "off", "on", "yes")


def _text_fields(schema: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, type) of every field of `schema` (sections walked) whose values are text or lists of text."""
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        tp = hints[item.name]
        arms = [arm for arm in typing.get_args(tp) if arm is not type(None)] if _is_union(tp) else [tp]
        section = next((arm for arm in arms if dataclasses.is_dataclass(arm)), None)
        if section is not None:
            yield from _text_fields(section, f"{prefix}{item.name}.")  # type: ignore[arg-type]
        elif all(_is_text(arm) for arm in arms) or (
            len(arms) == 1 and typing.get_origin(tp) is list and _is_text(typing.get_args(tp)[0])
        ):
            yield f"{prefix}{item.name}", tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _is_text(tp: Any) -> bool:
    if typing.get_origin(tp) is Literal:
        return all(isinstance(choice, str) for choice in typing.get_args(tp))
    return tp is str


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _yaml_text(key: str, value: str) -> str:
    parts = key.split(".")
    return "".join(f"{'  ' * depth}{part}:\n" for depth, part in enumerate(parts[:-1])) + (
        f"{'  ' * (len(parts) - 1)}{parts[-1]}: {value}\n"
    )


CLI_SCHEMAS = [PretrainConfig, FinetuneConfig, SweepConfig, DemoConfig]  # every schema `load_config` is given
TEXT_FIELDS = [(schema, key, tp) for schema in CLI_SCHEMAS for key, tp in _text_fields(schema)]


def test_the_walk_finds_the_text_fields() -> None:
    found = {f"{schema.__name__}.{key}" for schema, key, _ in TEXT_FIELDS}
    for key in (
        "PretrainConfig.precision",
        "PretrainConfig.encoder.name",
        "PretrainConfig.augment.strong.resize",
        "PretrainConfig.probe.labels",
        "FinetuneConfig.mixed_precision",
        "FinetuneConfig.structure",
        "FinetuneConfig.weak.kind",
        "SweepConfig.finetune.dwp.init",
        "SweepConfig.strategies",
        "DemoConfig.encoder",
    ):
        assert key in found


@pytest.mark.parametrize("word", WORDS)
@pytest.mark.parametrize(("schema", "key", "tp"), TEXT_FIELDS, ids=[f"{s.__name__}.{k}" for s, k, _ in TEXT_FIELDS])
def test_yaml_1_1_boolean_words_stay_text_in_every_text_field(
    schema: type, key: str, tp: Any, word: str, tmp_path: Path
) -> None:
    is_list = typing.get_origin(tp) is list
    value = f"[{word}]" if is_list else word
    path = tmp_path / "c.yaml"
    path.write_text(_yaml_text(key, value))
    for source, overrides in ((None, [f"{key}={value}"]), (path, [])):
        try:
            config = load_config(schema, source, overrides)
        except ConfigError as exc:  # a closed set of choices may refuse the word, but as the word
            message = str(exc)
            assert f"'{word}'" in message and ("must be one of" in message or "Known" in message), message
            assert "True" not in message and "False" not in message, message
        else:
            assert _get(config, key) == ([word] if is_list else word)


def test_precision_no_on_the_command_line_is_the_string_no() -> None:
    assert load_config(PretrainConfig, None, ["precision=no"]).precision == "no"
    assert load_config(FinetuneConfig, None, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(Cfg, None, ["precision=no"]).precision == "no"
    with pytest.raises(ConfigError, match="must be one of 'no', 'bf16', 'fp16', got 'off'"):
        load_config(PretrainConfig, None, ["precision=off"])


def test_text_fields_keep_the_text_written_and_other_fields_keep_yaml(tmp_path: Path) -> None:
    cfg = load_config(Cfg, None, ["name=true", "resume=null", "optim.betas=[0.5, 0.6]"])
    assert (cfg.name, cfg.resume, cfg.optim.betas) == ("true", None, [0.5, 0.6])
    assert load_config(Cfg, None, ["name=null"]).name == "null"  # no None for a field that cannot be None
    assert load_config(Cfg, None, ["name=1.10"]).name == "1.10"  # not the float 1.1 turned back into text
    assert load_config(Cfg, None, ["name='no'", "resume=off"]) == Cfg(name="no", resume="off")
    assert load_config(PretrainConfig, None, ["out=yes", "data.shards=on"]).data.shards == Path("on")
    assert load_config(PretrainConfig, None, ["cpu=yes", "resume=off"]).cpu is True  # booleans stay YAML's
    path = tmp_path / "c.yaml"
    path.write_text("name: off\nresume: ~\nsteps: 3\n")
    assert load_config(Cfg, path) == Cfg(name="off", resume=None, steps=3)
    with pytest.raises(ConfigError, match="must be an integer, got False"):
        load_config(Cfg, None, ["steps=no"])
