"""Resume: a `radpretrain shard` killed part-way and rerun ends with exactly the samples of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from radpretrain import synth
from radpretrain.errors import ShardError
from radpretrain.shards.format import ShardSet
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard

ARGS = ("--size", "64", "--shard-size", "3", "--val", "0.2", "--test", "0.2")
CONFIG = ShardConfig(size=64, shard_size=3, val_fraction=0.2, test_fraction=0.2)


def _keys(out: Path) -> list[str]:
    manifest = ShardSet.open(out).manifest
    keys = []
    for split in manifest["splits"].values():
        for name in split["shards"]:
            with tarfile.open(out / name) as tar:
                keys += [m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


def _command(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "radpretrain", "shard", "src", out, "--key", "deid.key", *ARGS, *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_samples(tmp_path: Path) -> None:
    synth.generate(tmp_path / "src", 45, seed=5, hostile=0.1, min_size=96, max_size=192, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    process = subprocess.Popen(
        _command(tmp_path, "out", "--workers", "2", "--no-progress"),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(out.glob("*.stats.json"))) >= 2:
            break
        time.sleep(0.01)
    assert process.poll() is None, (
        "the run finished before it could be killed: " + process.stderr.read().decode()[-500:]
    )
    process.send_signal(signal.SIGKILL)  # only the parent: its workers must not outlive it
    process.wait()
    time.sleep(0.5)
    plan = json.loads((out / "plan.json").read_text())
    done = {p.name.split(".")[0] for p in out.glob("*.stats.json")}
    assert 2 <= len(done) < len(plan["units"]), "killed after some but not all units"
    assert not (out / "manifest.json").exists()
    for tar_path in out.glob("*.tar"):  # every visible tar is complete: temp names are hidden
        with tarfile.open(tar_path) as tar:
            assert all(tar.extractfile(m) is not None for m in tar.getmembers())
    with pytest.raises(ShardError, match="has not finished"):
        ShardSet.open(out)
    time.sleep(1.0)
    stats_mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.stats.json")}
    assert stats_mtimes == {p.name: p.stat().st_mtime_ns for p in out.glob("*.stats.json")}, "orphan workers write on"

    rerun = subprocess.run(_command(tmp_path, "out", "--no-progress"), cwd=tmp_path, env=env, capture_output=True)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert f"{len(plan['units']) - len(done)} unit(s) written, {len(done)} already done" in rerun.stderr.decode()
    assert not list(out.glob(".*")), "temp files left behind"

    reference = shard(tmp_path / "src", tmp_path / "ref", CONFIG, key=tmp_path / "deid.key", progress=False)
    assert reference.complete
    keys, expected = _keys(out), _keys(tmp_path / "ref")
    assert len(keys) == len(set(keys)), "duplicate samples after resume"
    assert sorted(keys) == sorted(expected)
    for name in plan["units"][0]["name"], plan["units"][-1]["name"]:
        resumed = (out / f"{name}.tar").read_bytes()
        assert resumed == (tmp_path / "ref" / f"{name}.tar").read_bytes(), "reruns are byte-identical"


def test_changed_settings_refused_unless_overwrite(tmp_path: Path) -> None:
    from tests.shards.helpers import make_archive

    make_archive(tmp_path / "src", 6)
    key = tmp_path / "deid.key"
    first = shard(tmp_path / "src", tmp_path / "out", CONFIG, key=key, progress=False)
    again = shard(tmp_path / "src", tmp_path / "out", CONFIG, key=key, progress=False)
    assert again.units_written == 0 and again.units_skipped == first.units_total
    bigger = ShardConfig(size=80, shard_size=3, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ShardError, match=r"different plan \(size: 64 -> 80\).*--overwrite"):
        shard(tmp_path / "src", tmp_path / "out", bigger, key=key, progress=False)
    other_key = tmp_path / "other.key"
    with pytest.raises(ShardError, match="another de-identification key"):
        shard(tmp_path / "src", tmp_path / "out", CONFIG, key=other_key, progress=False)
    replaced = shard(tmp_path / "src", tmp_path / "out", bigger, key=key, overwrite=True, progress=False)
    assert replaced.units_written == replaced.units_total
    assert ShardSet.open(tmp_path / "out").manifest["size"] == 80
