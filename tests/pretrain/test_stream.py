"""The run's data stream: the manifest read once, the replay bar only on a resume that replays, stale temps removed."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from radpretrain.files import is_temp, temp_path
from radpretrain.pretrain.checkpoint import CHECKPOINT, STATE_FILE
from radpretrain.pretrain.config import PretrainConfig
from radpretrain.pretrain.loop import pretrain
from radpretrain.pretrain.stream import start_position
from radpretrain.shards.format import ShardSet

MakeConfig = Callable[..., PretrainConfig]


def test_a_run_reads_the_manifest_once(
    make_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Path] = []
    real_open = ShardSet.open.__func__  # type: ignore[attr-defined]

    def counting_open(cls: type[ShardSet], root: Any) -> ShardSet:
        opened.append(Path(root))
        return real_open(cls, root)

    monkeypatch.setattr(ShardSet, "open", classmethod(counting_open))
    run = tmp_path / "run"
    stale = temp_path(run / CHECKPOINT)  # a killed save's temp folder, from another process
    stale.mkdir(parents=True)
    (stale / STATE_FILE).write_text('{"step": 99}')
    # two probes and two checkpoints: the stream, each probe split and the summary all use the one ShardSet
    result = pretrain(make_config("steps=4", "probe_every=2", "checkpoint_every=2", out=run))
    assert result.step == 4 and len(json.loads((run / "summary.json").read_text())["probes"]) == 2
    assert opened == [make_config().data.shards]
    assert not [p.name for p in run.iterdir() if is_temp(p)]  # the stale temp is gone, the new one renamed


def test_the_replay_bar_shows_only_when_a_resume_replays(
    make_config: MakeConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Batches of 32, and a first session that opens three epochs and stops inside the third.
    per_epoch = ShardSet.open(make_config().data.shards).samples("train") // 32  # type: ignore[arg-type]
    common = [
        f"steps={2 * per_epoch + 2}",
        "data.batch_size=32",
        "probe.train_samples=32",
        "probe.val_samples=16",
        "probe.k=3",
    ]
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="radpretrain")
    capsys.readouterr()
    assert pretrain(make_config(*common, f"stop_after={2 * per_epoch + 1}", out=run)).step == 2 * per_epoch + 1
    state = json.loads((run / CHECKPOINT / STATE_FILE).read_text())
    (position,) = state["positions"]
    assert position == {"epoch": 2, "batches": 1, "readers": 1}
    assert "replaying" not in capsys.readouterr().err
    assert not [r for r in caplog.records if "replaying" in r.getMessage()]

    caplog.clear()
    assert pretrain(make_config(*common, "resume=true", out=run)).step == 2 * per_epoch + 2
    assert "data: replaying" in capsys.readouterr().err
    replays = [r.getMessage() for r in caplog.records if "replaying" in r.getMessage()]
    assert replays == ["data: replaying 1 batches of epoch 2 to reach the saved position"]


def test_start_position() -> None:
    saved = [{"epoch": 3, "batches": 5}, {"epoch": 4, "batches": 1}]
    assert start_position(None, 1, 2, 0) is None
    assert start_position(saved, 2, 2, 1) == {"epoch": 4, "batches": 1}
    assert start_position(saved, 2, 3, 2) == {"epoch": 5, "batches": 0}  # another process count: a new epoch
