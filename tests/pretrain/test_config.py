"""Pretrain config: shipped YAMLs load, overrides layer, typos and bad values are refused with a fix, the schedule."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from radpretrain.config import load_config
from radpretrain.errors import ConfigError
from radpretrain.models.encoders import build_encoder
from radpretrain.pretrain.config import PretrainConfig
from radpretrain.pretrain.loop import learning_rate
from radpretrain.pretrain.tasks import TASKS, build_objective

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "pretrain").glob("*.yaml"))


def test_shipped_configs_exist() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_builds_its_encoder_and_tasks(path: Path) -> None:
    cfg = load_config(PretrainConfig, path, ["data.shards=/somewhere"])
    assert cfg.data.shards == Path("/somewhere")
    encoder = build_encoder(cfg.encoder.name, img_size=cfg.data.image_size, **cfg.encoder.options)
    vocab = {"body_part": ["chest", "hand"], "age_bucket": ["0-1", "2-11"], "sex": ["M", "F"], "view": ["PA"]}
    objective = build_objective(encoder, cfg.tasks, cfg.task_options, vocab)  # task options are checked here
    assert set(objective.tasks) == set(cfg.tasks) and all(name in TASKS for name in cfg.tasks)


def test_file_and_overrides_layer(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 50\noptim: {lr: 3e-4, warmup: 5}\ntasks: {simclr: 1.0}\naugment: {strong: {gamma_p: 0}}\n")
    cfg = load_config(
        PretrainConfig, path, ["optim.lr=0.01", "tasks={metadata: 0.5}", "augment.plain.crop_scale=[0.9, 1]"]
    )
    assert cfg.steps == 50 and cfg.optim.warmup == 5 and cfg.optim.lr == pytest.approx(0.01)
    assert cfg.tasks == {"metadata": 0.5}
    assert cfg.augment.strong.gamma_p == 0 and cfg.augment.plain.crop_scale == (0.9, 1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], "Did you mean 'lr'"),
        (["stpes=10"], "Did you mean 'steps'"),
        (["augment.strong.gama_p=0.1"], "Did you mean 'gamma_p'"),
        (["steps=0"], "steps must be >= 1"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["optim.accumulation=0"], "accumulation must be >= 1"),
        (["tasks={simclr: -1}"], "tasks.simclr weight must be a positive number"),
        (["tasks={}"], "tasks is empty"),
        (["task_options={mae: {mask_ratio: 0.75}}"], "task_options given for mae"),
        (["precision=fp8"], "must be one of"),
        (["data.batch_size=0"], "data.batch_size must be > 0"),
    ],
)
def test_bad_values_are_refused_with_a_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, overrides)


def test_learning_rate_warmup_then_cosine_to_min() -> None:
    cfg = load_config(PretrainConfig, None, ["steps=110", "optim.lr=1.0", "optim.warmup=10", "optim.min_lr=0.1"])
    lrs = [learning_rate(step, cfg) for step in range(cfg.steps)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))  # rising through warmup
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # then never rising
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(cfg.steps, cfg) == pytest.approx(0.1)
    constant = load_config(PretrainConfig, None, ["optim.schedule=constant", "optim.warmup=0", "optim.lr=0.5"])
    assert {learning_rate(s, constant) for s in (0, 10, 999)} == {0.5}
