"""The pretraining loop on real shards: logs, config, checkpoint, probes, guards, accumulation and SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from radpretrain.config import load_config, to_dict
from radpretrain.errors import ConfigError, NonFiniteLossError, RadPretrainError
from radpretrain.pretrain.config import PretrainConfig
from radpretrain.pretrain.loop import learning_rate, pretrain

MakeConfig = Callable[..., PretrainConfig]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_log_config_checkpoint_and_probes(make_config: MakeConfig, tmp_path: Path) -> None:
    cfg = make_config()
    result = pretrain(cfg)
    run = tmp_path / "run"
    assert result.step == 6 and result.stopped_by is None and result.main

    records = read_jsonl(run / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        for key in ("loss", "simclr/loss", "metadata/loss", "metadata/body_part/loss", "grad_norm", "lr"):
            assert math.isfinite(record[key]), key
        assert record["images_per_s"] > 0
        assert record["lr"] == pytest.approx(learning_rate(record["step"] - 1, cfg))
    # the total is the weighted sum of the task losses
    first = records[0]
    assert first["loss"] == pytest.approx(first["simclr/loss"] + 0.5 * first["metadata/loss"], rel=1e-5)

    assert to_dict(load_config(PretrainConfig, run / "config.yaml")) == to_dict(cfg)
    state = json.loads((run / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == 6 and state["images"] == 6 * 8
    assert list(run.glob("tensorboard/**/events.out.tfevents.*"))

    summary = json.loads((run / "summary.json").read_text())
    probe = summary["probe"]
    assert probe["step"] == 6 and probe == result.probe
    assert 0.0 <= probe["knn/body_part"] <= 1.0 and 0.0 <= probe["linear/body_part"] <= 1.0
    splits = json.loads((cfg.data.shards / "manifest.json").read_text())["splits"]  # type: ignore[operator]
    assert probe["val_samples"] == min(32, splits["val"]["samples"]) and probe["train_samples"] == 64
    assert summary["data"]["counts"]["written"] > 0 and "shards" not in json.dumps(summary["data"]["splits"])

    # the run folder is not overwritten by accident, and a checkpoint only continues its own model
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain(make_config())
    with pytest.raises(ConfigError, match="encoder was"):
        pretrain(make_config("resume=true", "encoder.name=cbr_tiny"))


def test_accumulation_counts_micro_batches(make_config: MakeConfig, tmp_path: Path) -> None:
    pretrain(make_config("steps=2", "optim.accumulation=3", "data.log_samples=true", "probe.train_samples=8"))
    lines = read_jsonl(tmp_path / "run" / "samples-rank0.jsonl")
    assert [line["step"] for line in lines] == [1, 1, 1, 2, 2, 2]
    keys = [k for line in lines for k in line["keys"]]
    assert len(keys) == 2 * 3 * 8 and len(set(keys)) == len(keys)  # 48 distinct samples of the ~140 in train
    state = json.loads((tmp_path / "run" / "checkpoint" / "train_state.json").read_text())
    assert state["images"] == 2 * 3 * 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.image_size=128"], "larger than the shards' stored size"),
        (["encoder.name=test_vit", "data.image_size=60"], "cannot take 60 px inputs"),
        (["data.shards=/nonexistent/shards"], "no manifest.json"),
    ],
)
def test_mismatches_fail_before_training(make_config: MakeConfig, overrides: list[str], message: str) -> None:
    with pytest.raises(RadPretrainError, match=message):
        pretrain(make_config(*overrides))


def test_foreign_intensity_convention_is_refused(make_config: MakeConfig, tiny_shards: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "intensity_convention": "raw-hu-v0"}))
    with pytest.raises(ConfigError, match="intensity convention 'raw-hu-v0'"):
        pretrain(make_config(f"data.shards={foreign}"))


def test_huge_learning_rate_stops_with_the_step_and_terms(make_config: MakeConfig, tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError) as info:
        pretrain(make_config("optim.lr=1e6", "optim.warmup=0", "optim.grad_clip=0", "steps=20"))
    err = info.value
    logged = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert err.step == len(logged) + 1  # the failing step is the first one not logged
    assert not math.isfinite(err.terms["loss"]) and "metadata/loss" in err.terms and "simclr/loss" in err.terms
    assert f"step {err.step}" in str(err) and "simclr/loss=" in str(err)


def test_poisoned_batch_stops_at_once(make_config: MakeConfig) -> None:
    good = {
        "view0": torch.randn(8, 1, 32, 32),
        "view1": torch.randn(8, 1, 32, 32),
        "plain": torch.randn(8, 1, 32, 32),
        **{name: torch.zeros(8, dtype=torch.long) for name in ("body_part", "age_bucket", "sex", "view")},
    }
    poisoned = {**good, "view0": good["view0"].clone()}
    poisoned["view0"][3, 0, 5, 5] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3") as info:
        pretrain(make_config("steps=5"), batches=[good, good, poisoned])
    assert math.isnan(info.value.terms["simclr/loss"])


def test_sigterm_writes_a_checkpoint_and_exits(tiny_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*tiny_overrides, f"out={run}", "steps=100000", "data.workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "radpretrain", "pretrain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = run / "log.jsonl"
    deadline = time.monotonic() + 180
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not log three steps in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in out and "--resume" in out
    state = json.loads((run / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == read_jsonl(log)[-1]["step"] >= 3
    assert state["positions"][0]["batches"] == state["step"]  # the data position came along
