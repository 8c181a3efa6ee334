"""Shared fixtures of the pretraining tests: one tiny synthetic archive sharded at 64 px, and run configs on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from radpretrain.config import load_config
from radpretrain.pretrain.config import PretrainConfig

#: A run that takes a second or two on one CPU core: timm's tiny test ResNet at 32 px.
TINY = [
    "encoder.name=test_resnet",
    "data.image_size=32",
    "data.batch_size=8",
    "data.workers=0",
    "data.shuffle=32",
    "steps=6",
    "checkpoint_every=0",
    "log_every=1",
    "optim.warmup=2",
    "probe.train_samples=64",
    "probe.val_samples=32",
    "probe.k=5",
    "tasks={simclr: 1.0, metadata: 0.5}",
]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synth -> shard: ~200 radiographs at 64 px in 16-sample shards (about 10 train shards)."""
    from radpretrain.shards.plan import ShardConfig
    from radpretrain.shards.run import shard
    from radpretrain.synth.archive import generate

    root = tmp_path_factory.mktemp("tiny-archive")
    generate(
        root / "src",
        200,
        seed=1,
        min_size=64,
        max_size=96,
        syntaxes=["ExplicitVRLittleEndian"],
        workers=2,
        progress=False,
    )
    config = ShardConfig(size=64, shard_size=16, val_fraction=0.2, test_fraction=0.1)
    result = shard(root / "src", root / "shards", config, key=root / "deid.key", workers=2, progress=False)
    assert result.complete
    return root / "shards"


@pytest.fixture()
def tiny_overrides(tiny_shards: Path) -> list[str]:
    """The tiny run's `key=value` list (for runs started as subprocesses)."""
    return [*TINY, f"data.shards={tiny_shards}"]


@pytest.fixture()
def make_config(tiny_shards: Path, tmp_path: Path) -> Callable[..., PretrainConfig]:
    """make_config("steps=10", out=...) -> a tiny PretrainConfig on the shared shards (out defaults to tmp/run)."""

    def make(*overrides: str, out: Path | None = None) -> PretrainConfig:
        base = [*TINY, f"data.shards={tiny_shards}", f"out={out or tmp_path / 'run'}"]
        return load_config(PretrainConfig, None, [*base, *overrides])

    return make
