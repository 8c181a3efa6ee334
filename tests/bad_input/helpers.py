"""Run the real CLI on bad input and check the three promises: one error line, non-zero exit, no stray writes."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from radpretrain.cli import main

PREFIX = "radpretrain: error: "

#: What libraries write outside any output folder on their own, relative to HOME or TMPDIR: matplotlib's font
#: cache (the first time a plot is drawn), the empty cache folder torch's inductor makes when timm imports it,
#: and the socket folder of multiprocessing (DataLoader workers), removed when the process exits. None holds
#: anything from the data.
LIBRARY_CACHES = (
    "home/.cache",
    "home/.cache/matplotlib",
    "home/.cache/matplotlib/fontlist-*.json",
    "home/.config",
    "home/.config/matplotlib",
    "tmp/torchinductor_*",
    "tmp/pymp-*",
)


#: Variables that would send library caches or the key somewhere other than HOME.
UNSET = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "RADPRETRAIN_KEY_FILE")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The one `radpretrain: error:` line (asserts there is exactly one, last, and no traceback)."""
        return error_line(self.code, self.out, self.err)


def error_line(code: int, out: str, err: str) -> str:
    assert code != 0, f"expected a failure, got exit code 0\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in out + err, f"a traceback reached the user:\n{err[-4000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(PREFIX)]
    assert len(errors) == 1, f"expected one error line, got {len(errors)}:\n{err[-3000:]}"
    assert lines[-1] == errors[0], f"the error line is not the last thing printed:\n{err[-3000:]}"
    return errors[0][len(PREFIX) :]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> Result:
    """`radpretrain ARGV` in this process (fast: torch is imported once per session)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def refused(capsys: pytest.CaptureFixture[str], *argv: str | Path, code: int = 2) -> str:
    """Run a command that must fail with `code`; returns its one error line (without the prefix)."""
    result = run_main(capsys, *argv)
    message = result.error
    assert result.code == code, f"exit code {result.code}, expected {code}: {message}"
    return message


# What a command wrote: snapshots of folders before and after.

State = dict[Path, tuple[bool, int, int]]


def snapshot(*roots: Path) -> State:
    """Every path under `roots`: (is a folder, size, mtime); folders are compared by existence only."""
    state: State = {}
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            folder = stat.S_ISDIR(info.st_mode)
            state[path] = (True, 0, 0) if folder else (False, info.st_size, info.st_mtime_ns)
    return state


def changes(before: State, after: State) -> list[Path]:
    """Paths added, removed or rewritten between two snapshots."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


@dataclass
class Sandbox:
    """An empty HOME, TMPDIR and working folder inside the test's tmp_path; outputs go to `root`/<name>."""

    root: Path
    home: Path
    tmp: Path
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)

    @contextlib.contextmanager
    def only_writes(self, *allowed: Path, watch: Sequence[Path] = ()) -> Iterator[None]:
        """Assert that the block writes nothing under the sandbox or `watch` except below `allowed` paths
        (and library caches in HOME/TMPDIR, see LIBRARY_CACHES)."""
        roots = [self.root, *watch]
        before = snapshot(*roots)
        yield
        stray = [p for p in changes(before, snapshot(*roots)) if not self._allowed(p, allowed)]
        assert not stray, "written outside the output folder: " + ", ".join(str(p) for p in stray[:10])

    def _allowed(self, path: Path, allowed: Sequence[Path]) -> bool:
        if any(path == a or a in path.parents for a in allowed):
            return True
        if self.root in path.parents:
            rel = path.relative_to(self.root).as_posix()
            return any(fnmatch.fnmatch(rel, pattern) for pattern in LIBRARY_CACHES)
        return False


def make_sandbox(root: Path) -> Sandbox:
    home, tmp, cwd = root / "home", root / "tmp", root / "cwd"
    for folder in (home, tmp, cwd):
        folder.mkdir(parents=True, exist_ok=True)
    return Sandbox(root, home, tmp, cwd, {"HOME": str(home), "TMPDIR": str(tmp)})


def run_process(
    sandbox: Sandbox, *argv: str | Path, file_size_limit: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m radpretrain ARGV` in a fresh process with the sandbox's HOME, TMPDIR and working folder.

    `file_size_limit` (bytes) sets RLIMIT_FSIZE in the child before radpretrain starts: a write past it
    fails with EFBIG (Python ignores SIGXFSZ from startup), as a full disk fails with ENOSPC.
    """
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(sandbox.env, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    args = [str(a) for a in argv]
    if file_size_limit is None:
        command = [sys.executable, "-m", "radpretrain", *args]
    else:
        code = (
            "import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit})); "
            "sys.argv = ['radpretrain', *sys.argv[1:]]; "
            "runpy.run_module('radpretrain', run_name='__main__', alter_sys=True)"
        )
        command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, cwd=sandbox.cwd, env=env, capture_output=True, text=True, timeout=timeout)


def process_error(done: subprocess.CompletedProcess[str]) -> str:
    return error_line(done.returncode, done.stdout, done.stderr)
