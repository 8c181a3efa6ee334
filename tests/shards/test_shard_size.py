"""The default shard size: at least 64 train shards when 100-1,000 files per shard allow it; inspect says so."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from radpretrain.cli import build_parser
from radpretrain.shards import deid, inspect
from radpretrain.shards.plan import ShardConfig, auto_shard_size, make_plan
from radpretrain.shards.run import shard
from tests.shards.helpers import make_archive
from tests.shards.test_plan import _index


def _train_shards(files: int, **config: object) -> Counter[int]:
    """Files per train shard -> how many shards have that many, for an index of `files` files."""
    pseudo = deid.Pseudonymizer(b"k" * 32)
    plan = make_plan(_index(pseudo, files // 2), ShardConfig(**config), pseudo)  # type: ignore[arg-type]
    return Counter(len(u.files) for u in plan.units if u.split == "train")


def test_auto_gives_64_train_shards_when_the_archive_allows_it() -> None:
    assert ShardConfig().shard_size == "auto"
    assert [auto_shard_size(n) for n in (0, 99, 6_399, 10_000, 64_000, 500_000)] == [100, 100, 100, 156, 1000, 1000]
    big = _train_shards(20_000)  # ~18,000 train files: shards of ~281
    assert sum(big.values()) >= 64 and 100 <= max(big) <= 1000
    small = _train_shards(1_200)  # ~1,080: shards of 100, the smallest that stays fast to read
    assert max(small) == 100 and sum(small.values()) == -(-sum(n * c for n, c in small.items()) // 100)
    assert _train_shards(1_200, shard_size=0) == small  # 0 means auto too
    explicit = _train_shards(1_200, shard_size=1000)  # an explicit size is kept: one shard of 1,000 and the rest
    assert max(explicit) == 1000 and sum(explicit.values()) == 2


def test_the_cli_defaults_to_auto() -> None:
    parser = build_parser()
    assert parser.parse_args(["shard", "src", "out"]).shard_size == "auto"
    assert parser.parse_args(["shard", "src", "out", "--shard-size", "AUTO"]).shard_size == "auto"
    assert parser.parse_args(["shard", "src", "out", "--shard-size", "250"]).shard_size == 250
    with pytest.raises(SystemExit):
        parser.parse_args(["shard", "src", "out", "--shard-size", "0"])


def test_inspect_says_how_many_readers_the_shards_feed_whole(tmp_path: Path) -> None:
    make_archive(tmp_path / "src", 9, patients=9)
    config = ShardConfig(size=48, shard_size=4, val_fraction=0.0, test_fraction=0.0)
    shard(tmp_path / "src", tmp_path / "out", config, key=tmp_path / "k", progress=False)
    report = inspect.composition_report(tmp_path / "out")
    assert "readers: 3 train shard(s) feed up to 3 readers whole (processes x loader workers); more split samples" in (
        report
    )
