"""Resume: an interrupted and resumed run repeats the uninterrupted one exactly; checkpoints swap atomically."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radpretrain.files import temp_path
from radpretrain.pretrain.checkpoint import CHECKPOINT, STATE_FILE, find_checkpoint
from radpretrain.pretrain.config import PretrainConfig
from radpretrain.pretrain.loop import pretrain
from radpretrain.shards.format import ShardSet

MakeConfig = Callable[..., PretrainConfig]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SIMCLR_PATCH_AE = ["tasks={simclr: 1.0, patch_ae: 0.5}", "task_options={patch_ae: {patch_size: 8}}"]
# a 64-key queue wraps every two steps; Shuffle-BN draws its order from the training RNG
MOCO = ["tasks={moco: 1.0}", "task_options={moco: {memory_bank_size: 64, output_dim: 16}}"]


@pytest.fixture(scope="module")
def one_shard(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny archive again with all its train samples in one shard: 2 loader workers then split its samples."""
    from radpretrain.shards.plan import ShardConfig
    from radpretrain.shards.run import shard

    root = tmp_path_factory.mktemp("one-shard")
    config = ShardConfig(size=64, shard_size=1000, val_fraction=0.2, test_fraction=0.1)
    shard(tiny_shards.parent / "src", root / "shards", config, key=tiny_shards.parent / "deid.key", progress=False)
    assert len(ShardSet.open(root / "shards").urls("train")) == 1
    return root / "shards"


@pytest.mark.parametrize(
    ("workers", "tasks", "split_samples"),
    [(0, SIMCLR_PATCH_AE, False), (1, SIMCLR_PATCH_AE, False), (2, SIMCLR_PATCH_AE, True), (0, MOCO, False)],
    ids=["simclr+patch_ae-0", "simclr+patch_ae-1", "simclr+patch_ae-2-split-samples", "moco-0"],
)
def test_resumed_run_repeats_the_uninterrupted_run(
    make_config: MakeConfig,
    tmp_path: Path,
    workers: int,
    tasks: list[str],
    split_samples: bool,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 16-sample batches of ~140 train samples: the 14 steps cross an epoch boundary, the stop at 5 is mid-epoch.
    # patch_ae draws its masks from the training RNG, which the checkpoint must restore too; moco's queue and
    # momentum encoder are state the checkpoint must hold. With `split_samples`, one train shard for two loader
    # workers: each reads every other sample of it.
    shards = [f"data.shards={request.getfixturevalue('one_shard')}"] if split_samples else []
    common = [
        *shards,
        "steps=14",
        "data.batch_size=16",
        f"data.workers={workers}",
        "data.log_samples=true",
        "probe.k=3",
        *tasks,
    ]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    with caplog.at_level(logging.INFO, logger="radpretrain.pretrain.stream"):
        pretrain(make_config(*common, out=whole))
    if split_samples:  # the start-up line says how many readers the shards feed whole, and that samples are split
        assert "1 train shard(s) feed up to 1 readers whole; 2 read them" in caplog.text
        assert "split samples: each reader takes one in 2 samples of its shard(s)" in caplog.text
    first = pretrain(make_config(*common, "stop_after=5", out=parts))
    assert first.step == 5 and first.stopped_by is None
    assert json.loads((parts / "checkpoint" / STATE_FILE).read_text())["step"] == 5
    second = pretrain(make_config(*common, "resume=true", out=parts))
    assert second.step == 14

    a, b = read_jsonl(whole / "log.jsonl"), read_jsonl(parts / "log.jsonl")
    assert [r["step"] for r in b] == list(range(1, 15))
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if key != "images_per_s":
                assert rb[key] == pytest.approx(value, abs=1e-6), (ra["step"], key)
    # the same samples in the same batches, epoch rollover included
    keys_a = read_jsonl(whole / "samples-rank0.jsonl")
    assert keys_a == read_jsonl(parts / "samples-rank0.jsonl")
    assert len({k for line in keys_a for k in line["keys"]}) < 14 * 16  # the second epoch repeats samples
    if split_samples:  # the saved position names the reader count that fixed the split
        saved = json.loads((parts / "checkpoint" / STATE_FILE).read_text())["positions"]
        assert [p["readers"] for p in saved] == [2]
    # and the same weights and probe scores at the end
    wa, wb = (
        load_file(str(whole / "checkpoint/model.safetensors")),
        load_file(str(parts / "checkpoint/model.safetensors")),
    )
    assert wa.keys() == wb.keys()
    if tasks is MOCO:
        assert "objective.tasks.moco.criterion.memory_bank.bank" in wa  # the queue is saved, not redrawn
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)
    assert second.probe == pytest.approx(json.loads((whole / "summary.json").read_text())["probe"])


def test_find_checkpoint_survives_a_crash_between_renames(tmp_path: Path) -> None:
    assert find_checkpoint(tmp_path) is None
    killed = temp_path(tmp_path / CHECKPOINT)  # a save that was killed: never used
    killed.mkdir()
    (killed / STATE_FILE).write_text('{"step": 12}')
    assert find_checkpoint(tmp_path) is None
    old = tmp_path / "checkpoint.old"
    old.mkdir()
    (old / STATE_FILE).write_text('{"step": 4}')
    assert find_checkpoint(tmp_path) == old  # killed after moving the previous one aside
    new = tmp_path / "checkpoint"
    new.mkdir()
    (new / STATE_FILE).write_text('{"step": 8}')
    assert find_checkpoint(tmp_path) == new


def test_another_reader_count_restarts_the_data_at_a_new_epoch(
    make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Which reader takes which shard or sample follows from the reader count: a saved position made with
    another count cannot be replayed, so the stream starts the next epoch (and says so)."""
    from radpretrain.pretrain.stream import BatchStream

    cfg = make_config("data.workers=2")
    urls = ShardSet.open(cfg.data.shards).urls("train")  # type: ignore[arg-type]

    def stream(position: dict[str, int]) -> BatchStream:
        return BatchStream(urls, lambda seed: dict, cfg, 0, torch.device("cpu"), position)

    assert stream({"epoch": 3, "batches": 5, "readers": 2}).position() == {"epoch": 3, "batches": 5, "readers": 2}
    # a checkpoint from before the reader count was saved: kept as it is
    assert stream({"epoch": 3, "batches": 5}).position() == {"epoch": 3, "batches": 5, "readers": 2}
    with caplog.at_level(logging.WARNING):
        other = stream({"epoch": 3, "batches": 5, "readers": 4})
    assert other.position() == {"epoch": 4, "batches": 0, "readers": 2}
    assert "read its shards with 4 readers and now has 2" in caplog.text
