"""The write pass at file granularity: every worker busy within one unit, the same bytes whatever the count."""

from __future__ import annotations

import concurrent.futures
import json
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from radpretrain import synth
from radpretrain.shards import deid, pool, writer
from radpretrain.shards.format import ERRORS, MANIFEST, STATS_SUFFIX
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard
from radpretrain.shards.sample import WriterSettings
from tests.shards.helpers import make_archive

CONFIG = ShardConfig(size=48, shard_size=7, val_fraction=0.2, test_fraction=0.1)


def _outputs(out: Path) -> dict[str, Any]:
    """Every output file's bytes; stats files without their timing."""
    found: dict[str, Any] = {}
    for path in sorted(out.iterdir()):
        if path.name.endswith(STATS_SUFFIX):
            stats = json.loads(path.read_text())
            stats.pop("seconds")
            found[path.name] = stats
        elif path.is_file():
            found[path.name] = path.read_bytes()
    return found


def test_one_and_two_workers_write_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hostile files put failures and skips between the written ones, so errors keep plan order too.
    synth.generate(tmp_path / "src", 30, seed=4, hostile=0.2, min_size=64, max_size=128, progress=False)
    monkeypatch.setattr(pool, "CHUNK_FILES", 2)  # chunks are cut in this process: several per unit
    key = tmp_path / "k"
    one = shard(tmp_path / "src", tmp_path / "one", CONFIG, key=key, workers=1, progress=False)
    two = shard(tmp_path / "src", tmp_path / "two", CONFIG, key=key, workers=2, progress=False)
    assert one.complete and two.complete and one.units_total >= 3
    first, second = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name
    manifest = json.loads(first[MANIFEST])
    assert manifest["counts"]["failed"] and first[ERRORS]


class _ThreadPool:
    """A stand-in for `pool.WorkerPool` whose workers are threads, so the test can see who ran what."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers)


def test_one_unit_keeps_every_worker_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_archive(tmp_path / "src", 24, shape=(64, 48))
    files = [(f"f{i:02d}", str(p.relative_to(tmp_path / "src")), _row(i)) for i, p in enumerate(_paths(tmp_path))]
    task = writer.UnitTask("train-000000", "train", files)
    out = tmp_path / "out"
    settings = WriterSettings(src=str(tmp_path / "src"), out=str(out), size=32, fingerprint="x", age_buckets=[])
    (tmp_path / "out").mkdir()
    ran: dict[int, set[str]] = {}
    gate = threading.Barrier(2, timeout=30)  # the first two chunks must run at the same time
    real = writer.process_files

    def recording(chunk: list[tuple[str, str, dict[str, Any]]], split: str, settings: WriterSettings) -> list:
        if chunk[0][0] in ("f00", "f04"):
            gate.wait()
        ran.setdefault(threading.get_ident(), set()).update(f for f, _, _ in chunk)
        return real(chunk, split, settings)

    monkeypatch.setattr(pool, "process_files", recording)
    monkeypatch.setattr(pool, "CHUNK_FILES", 4)
    [stats] = list(pool._write_chunked([task], settings, _ThreadPool(2), lambda count: None))  # type: ignore[arg-type]
    assert len(ran) == 2, "both workers took chunks of the one unit"
    assert stats["files"] == 24 and stats["files_written"] == 24
    reference = tmp_path / "reference"
    reference.mkdir()
    writer.write_unit(task, WriterSettings(**{**vars(settings), "out": str(reference)}))
    assert (tmp_path / "out" / "train-000000.tar").read_bytes() == (reference / "train-000000.tar").read_bytes()


def test_a_stopped_run_leaves_no_partial_tar(tmp_path: Path) -> None:
    make_archive(tmp_path / "src", 12, shape=(64, 48))
    files = [(f"f{i:02d}", str(p.relative_to(tmp_path / "src")), _row(i)) for i, p in enumerate(_paths(tmp_path))]
    tasks = [writer.UnitTask("train-000000", "train", files[:6]), writer.UnitTask("train-000001", "train", files[6:])]
    out = tmp_path / "out"
    out.mkdir()
    settings = WriterSettings(src=str(tmp_path / "src"), out=str(out), size=32, fingerprint="x", age_buckets=[])
    original = pool.CHUNK_FILES
    try:
        pool.CHUNK_FILES = 2
        stream = pool._write_chunked(tasks, settings, _ThreadPool(2), lambda count: None)  # type: ignore[arg-type]
        first = next(stream)
        stream.close()  # as when the run stops with the second unit in flight
    finally:
        pool.CHUNK_FILES = original
    # Units finish in any order (their chunks run side by side); the one yielded is whole, the other left nothing.
    name = first["unit"]
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.stats.json", f"{name}.tar"]
    with tarfile.open(out / f"{name}.tar") as tar:
        assert len(tar.getmembers()) == 2 * 6


def _paths(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "src").rglob("*.dcm"))


def _row(number: int) -> dict[str, Any]:
    return {
        "kind": "dicom",
        "sop": f"{number:0{deid.PSEUDONYM_CHARS}d}",
        "patient": "0" * deid.PSEUDONYM_CHARS,
        "body_part": "chest",
        "bits_stored": 12,
        "transfer_syntax": "Explicit VR Little Endian",
    }
