"""Runs that fail part-way: a diverging loss, and a full disk (a real file-size limit in a fresh process).

Each ends with one line and a non-zero exit, keeps what was finished before, and a rerun goes on from there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from radpretrain.pretrain.checkpoint import CHECKPOINT, LOG_FILE, MODEL_FILE, STATE_FILE, SUMMARY_FILE

from .helpers import Sandbox, process_error, refused, run_main, run_process

FULL = (
    "file too large for the file system or the file-size limit (ulimit -f); free space (or raise the limit) and "
    "run the same command again to resume"
)


def _digests(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under `paths` (files or folders), keyed by path."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _step(run: Path) -> int:
    return int(json.loads((run / CHECKPOINT / STATE_FILE).read_text())["step"])


def test_a_diverging_loss_names_the_step_and_terms_and_keeps_the_last_checkpoint(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, tiny_shards: Path, tiny_run: Callable[..., list[str]]
) -> None:
    run = sandbox.root / "run"
    diverging = ["tasks={simclr: 1.0}", "optim.lr=1e9", "optim.warmup=0", "optim.grad_clip=0", "checkpoint_every=1"]
    with sandbox.only_writes(run, watch=[tiny_shards]):
        message = refused(capsys, *tiny_run(run, *diverging, "steps=10"))
    match = re.fullmatch(
        r"non-finite loss at step (\d+) \(loss=(\S+), simclr/loss=(\S+), simclr/pos_cosine=\S+, grad_norm=\S+\); "
        r"lower the learning rate, enable gradient clipping or check the input data, then resume from the last "
        r"checkpoint",
        message,
    )
    assert match, message
    step = int(match.group(1))
    assert match.group(2) in ("nan", "inf", "-inf") and match.group(3) in ("nan", "inf", "-inf")
    # The first step starts from finite weights; the checkpoint of the step before the failure is kept whole.
    assert step >= 2 and _step(run) == step - 1
    assert (run / CHECKPOINT / MODEL_FILE).stat().st_size > 0
    logged = [json.loads(line)["step"] for line in (run / LOG_FILE).read_text().splitlines()]
    assert logged == list(range(1, step))


def test_a_full_disk_during_pretraining_keeps_the_checkpoint_and_a_rerun_resumes(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, tiny_shards: Path, tiny_run: Callable[..., list[str]]
) -> None:
    run = sandbox.root / "run"
    assert run_main(capsys, *tiny_run(run, "steps=2")).code == 0
    kept = _digests(run / CHECKPOINT)
    # Room for the logs, not for the next checkpoint's weights: its write fails with EFBIG, as with ENOSPC.
    limit = (run / CHECKPOINT / MODEL_FILE).stat().st_size // 2
    with sandbox.only_writes(run, watch=[tiny_shards]):
        done = run_process(sandbox, *tiny_run(run, "steps=4", "--resume"), file_size_limit=limit)
    assert process_error(done) == FULL
    assert done.returncode == 1
    assert _digests(run / CHECKPOINT) == kept and _step(run) == 2

    result = run_main(capsys, *tiny_run(run, "steps=4", "--resume"))
    assert result.code == 0, result.err[-2000:]
    assert _step(run) == 4
    assert json.loads((run / SUMMARY_FILE).read_text())["step"] == 4
    logged = [json.loads(line)["step"] for line in (run / LOG_FILE).read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_a_full_disk_while_sharding_keeps_finished_units_and_a_rerun_completes(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, synth_chest: Path
) -> None:
    out, key = sandbox.root / "shards", sandbox.root / "keys" / "deid.key"
    args = ["shard", synth_chest, out, "--key", key, "--size", "64", "--shard-size", "4", "--no-progress"]
    assert run_main(capsys, "index", synth_chest, out, "--key", key, "--no-progress").code == 0
    assert run_main(capsys, *args, "--part", "0/2").code == 0  # an earlier job wrote half of the units
    finished = sorted(out.glob("*.tar"))
    assert finished and not (out / "manifest.json").exists()
    kept = _digests(*finished, *out.glob("*.stats.json"))
    limit = min(tar.stat().st_size for tar in finished) // 2
    with sandbox.only_writes(out, sandbox.root / "shards.private", watch=[synth_chest]):
        done = run_process(sandbox, *args, file_size_limit=limit)
    assert process_error(done) == FULL
    assert done.returncode == 1
    assert _digests(*finished, *out.glob("*.stats.json")) == kept
    assert not (out / "manifest.json").exists()

    assert run_main(capsys, *args).code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {name for split in manifest["splits"].values() for name in split["shards"]}
    assert {tar.name for tar in finished} < listed == {tar.name for tar in out.glob("*.tar")}
    assert _digests(*finished) == {k: v for k, v in kept.items() if k.endswith(".tar")}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file of the failed write is left


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Lower this process's soft RLIMIT_FSIZE for a moment (Python ignores SIGXFSZ: writes fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _failure_of(write: Callable[[], object]) -> BaseException:
    with _file_size_limit(4096), pytest.raises(Exception) as info:
        write()
    return info.value


def test_every_way_a_library_reports_a_failed_write_becomes_one_message(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from radpretrain.cli import describe_os_error, write_failure

    big = torch.zeros(10_000)
    plain = _failure_of(lambda: (tmp_path / "a.bin").write_bytes(bytes(10_000)))
    rust = _failure_of(lambda: save_file({"w": big}, str(tmp_path / "b.safetensors")))
    zipped = _failure_of(lambda: torch.save({"w": big}, tmp_path / "c.pt"))
    assert isinstance(plain, OSError) and not isinstance(rust, OSError) and not isinstance(zipped, OSError)
    for exc in (plain, rust):
        failure = write_failure(exc)
        assert failure is not None and failure.errno == errno.EFBIG
        assert describe_os_error(failure) == FULL
    failure = write_failure(zipped)  # torch.save's zip writer says neither the errno nor the file
    assert failure is not None
    assert describe_os_error(failure) == (
        "torch.save could not write its file (a full disk or a file-size limit?); free space and run the same "
        "command again to resume"
    )
    assert write_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug stays a bug
    assert describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))).startswith("no space left on device; ")
    assert describe_os_error(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))).startswith("disk quota exceeded; ")
