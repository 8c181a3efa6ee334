"""Truncated and foreign tars among the shards: a few bad records are skipped and named, an unreadable set fails."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from radpretrain.pretrain.checkpoint import CHECKPOINT, SUMMARY_FILE
from radpretrain.shards.reader import SOCKET_PATH_MAX

from .helpers import Sandbox, process_error, refused, run_main, run_process


def _train_tars(shards: Path) -> list[Path]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [shards / name for name in manifest["splits"]["train"]["shards"]]


def _truncate(tar: Path, keep: float = 0.5) -> None:
    """Cut a shard inside a member, as an interrupted copy leaves it (keep=0: inside the first member)."""
    data = tar.read_bytes()
    tar.write_bytes(data[: int(len(data) * keep) + 700])


def _foreign(tar: Path) -> None:
    """Replace a shard by a tar of something else (a report and a photo), as a mixed-up copy leaves it."""
    with tarfile.open(tar, "w") as sink:
        for name, data in (("report.txt", b"findings: none\n"), ("photo.jpg", b"\xff\xd8\xff\xe0" + bytes(200))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            sink.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards_copy(sandbox: Sandbox, tiny_shards: Path) -> Path:
    copy = sandbox.root / "shards"
    shutil.copytree(tiny_shards, copy)
    return copy


def test_a_truncated_and_a_foreign_shard_are_skipped_and_named(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    sandbox: Sandbox,
    shards_copy: Path,
    tiny_run: Callable[..., list[str]],
) -> None:
    tars = _train_tars(shards_copy)
    assert len(tars) >= 6
    _truncate(tars[1])
    _foreign(tars[4])
    run = sandbox.root / "run"
    # 20 steps of 8 pass every train shard at least once (about 140 samples).
    with sandbox.only_writes(run, watch=[shards_copy]):
        result = run_main(capsys, *tiny_run(run, "steps=20", "data.workers=0", shards=shards_copy))
    assert result.code == 0, result.err[-2000:]
    assert "Traceback" not in result.err
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping a bad shard record")]
    named = {message.split(" in ")[1].split(" ")[0] for message in warnings}
    assert named and named <= {tars[1].name, tars[4].name}, warnings
    assert json.loads((run / SUMMARY_FILE).read_text())["step"] == 20


def test_a_wholly_unreadable_train_split_fails_clearly(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, shards_copy: Path, tiny_run: Callable[..., list[str]]
) -> None:
    tars = _train_tars(shards_copy)
    for i, tar in enumerate(tars):
        if i % 2:
            _truncate(tar, keep=0)
        else:
            _foreign(tar)
    run = sandbox.root / "run"
    with sandbox.only_writes(run, watch=[shards_copy]):
        message = refused(capsys, *tiny_run(run, "data.workers=0", shards=shards_copy))
    assert message.startswith(f"no sample could be read from {', '.join(sorted(t.name for t in tars)[:5])} and ")
    assert "x ReadError" in message and "x not a radpretrain sample" in message
    assert message.endswith("they are truncated, empty or not radpretrain shards: re-shard them or check the paths")
    assert not (run / CHECKPOINT).exists()


def test_a_loader_worker_whose_shards_are_all_bad_fails_in_one_line(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, shards_copy: Path, tiny_run: Callable[..., list[str]]
) -> None:
    # Worker w of 2 reads train shards w, w+2, ...: worker 1 meets only bad ones, and says which.
    tars = _train_tars(shards_copy)
    bad = tars[1::2]
    for tar in bad:
        _foreign(tar)
    run = sandbox.root / "run"
    with sandbox.only_writes(run, watch=[shards_copy]):
        message = refused(capsys, *tiny_run(run, "steps=4", "data.workers=2", shards=shards_copy))
    names = ", ".join(t.name for t in bad[:5])
    assert message.startswith(f"no sample could be read from {names} (")
    assert "DataLoader" not in message


def test_the_bad_worker_fails_in_one_line_under_a_tmpdir_too_long_for_sockets(
    sandbox: Sandbox, shards_copy: Path, tiny_run: Callable[..., list[str]]
) -> None:
    # Loader workers hand their batches over through Unix sockets in multiprocessing's folder under TMPDIR. A
    # TMPDIR this long (an xdist worker's tmp_path is) made the good worker's batch vanish in its queue thread:
    # the main process waited for it forever and never reached the error of the bad worker behind it. A fresh
    # process, so no socket folder made earlier (under a shorter TMPDIR) hides the fault.
    long_tmp = sandbox.tmp / ("t" * max(1, SOCKET_PATH_MAX - len(str(sandbox.tmp))))
    long_tmp.mkdir()
    box = dataclasses.replace(sandbox, env={**sandbox.env, "TMPDIR": str(long_tmp)})
    tars = _train_tars(shards_copy)
    bad = tars[1::2]
    for tar in bad:
        _foreign(tar)
    run = sandbox.root / "run"
    done = run_process(box, *tiny_run(run, "steps=4", "data.workers=2", shards=shards_copy), timeout=240)
    message = process_error(done)
    assert done.returncode == 2
    assert message.startswith(f"no sample could be read from {', '.join(t.name for t in bad[:5])} (")
    assert "AF_UNIX" not in done.stderr


def test_inspect_reports_a_shard_folder_of_foreign_tars(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, shards_copy: Path
) -> None:
    for tar in shards_copy.glob("*.tar"):
        _foreign(tar)
    sheet = sandbox.root / "sheet.png"
    with sandbox.only_writes(watch=[shards_copy]):
        message = refused(capsys, "inspect", shards_copy, "--sheet", sheet, "--n", "4")
    assert message.startswith("no sample could be read from ") and "x not a radpretrain sample" in message
    assert not sheet.exists()
