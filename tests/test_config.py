from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from radpretrain.config import load_config, save_config
from radpretrain.errors import ConfigError


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
