"""Few shards, many readers: 2 real gloo processes x 2 loader workers read every sample exactly once per pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from radpretrain.shards.format import ShardSet
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard
from tests.pretrain.test_distributed import free_port
from tests.shards.helpers import make_archive

N = 24
SCRIPT = Path(__file__).with_name("read_keys.py")


@pytest.fixture(scope="module")
def passes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Any]:
    """(shards, shuffle) -> the passes of one torchrun launch: [[(key, "rank:worker"), ...] per pass]."""
    root = tmp_path_factory.mktemp("split")
    make_archive(root / "src", N, patients=12)
    cases = []
    for shards in (1, 3):
        config = ShardConfig(size=32, shard_size=N // shards, val_fraction=0.0, test_fraction=0.0)
        shard(root / "src", root / f"out{shards}", config, key=root / "deid.key", progress=False)
        urls = ShardSet.open(root / f"out{shards}").urls("train")
        assert len(urls) == shards
        cases += [{"urls": urls, "shuffle": shuffle} for shuffle in (0, 8)]
    (root / "cases.json").write_text(json.dumps(cases))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(SCRIPT),
        str(root / "keys.json"),
        str(root / "cases.json"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((root / "keys.json").read_text())
    return {(len(case["urls"]), case["shuffle"]): result for case, result in zip(cases, results, strict=True)}


@pytest.mark.parametrize("shuffle", [0, 8])
@pytest.mark.parametrize("shards", [1, 3])
def test_every_sample_once_per_pass(passes: dict[tuple[int, int], Any], shards: int, shuffle: int) -> None:
    """1 shard (or 3) for 2 processes x 2 workers: 4 readers, each with its own share, none read twice."""
    for seen in passes[shards, shuffle]:
        keys = Counter(key for key, _ in seen)
        assert len(keys) == N and set(keys.values()) == {1}, keys.most_common(3)
        readers = Counter(reader for _, reader in seen)
        assert sorted(readers) == ["0:0", "0:1", "1:0", "1:1"]  # every reader had a share to read
        assert max(readers.values()) - min(readers.values()) <= N // 4, readers
    first, second = passes[shards, shuffle]
    assert {k: r for k, r in first} == {k: r for k, r in second}  # the same share in every pass
