"""Warm the page cache so every benchmark contender starts with its files in memory."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def prime(paths: Iterable[Path | str]) -> None:
    """Read every file once."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 22):
                pass
