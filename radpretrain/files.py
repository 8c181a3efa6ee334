"""Files written whole or not at all, and the check that a rerun keeps the settings of the run it continues."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: Temp files are hidden (leading dot) and carry this mark, so neither a reader nor a manifest ever lists
#: them and a rerun can find and remove them: `.NAME.tmp-HOST-PID`.
TMP_MARK = ".tmp-"


def temp_path(path: str | Path) -> Path:
    """The hidden temp sibling of `path`, unique per host and process (parts on several nodes may share a
    network file system)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


def target_of_temp(path: Path) -> str:
    """The file name a temp file stands in for (`.train-000001.tar.tmp-host-12` -> `train-000001.tar`)."""
    return path.name[1:].split(TMP_MARK, 1)[0]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write (a file or a folder); on success it replaces `path` in one rename, on an
    error it is removed, so `path` is always either the old whole thing or the new whole thing."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a binary file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def flatten(settings: Mapping[str, Any], prefix: str = "", keep: Iterable[str] = ()) -> dict[str, Any]:
    """Nested settings as `{"a.b": value}`; keys in `keep` stay whole (a mapping compared as one value)."""
    kept = set(keep)
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and key not in kept:
            flat.update(flatten(value, f"{prefix}{key}.", kept))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(
    old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None, keep: Iterable[str] = ()
) -> list[str]:
    """`"key: old -> new"` for every (dotted) setting that differs between a previous run and this one.

    Nested mappings are compared key by key; `keys` limits the comparison to those dotted keys (e.g. the
    settings a resumed run may not change); `keep` names mappings compared whole.
    """
    flat_old, flat_new = flatten(old, keep=keep), flatten(new, keep=keep)
    names = sorted(set(flat_old) | set(flat_new)) if keys is None else list(keys)
    return [
        f"{name}: {flat_old.get(name)!r} -> {flat_new.get(name)!r}"
        for name in names
        if flat_old.get(name) != flat_new.get(name)
    ]
