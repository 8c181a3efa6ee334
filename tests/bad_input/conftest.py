"""Bad-input fixtures: the pretrain and finetune tests' tiny shards, cohort and encoder, and a sandbox."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Reused, not copied: the session fixtures of the pretraining and finetuning tests.
from tests.finetune.conftest import lung_cohort, pretrained_encoder, synth_chest  # noqa: F401
from tests.pretrain.conftest import TINY, tiny_shards  # noqa: F401

from .helpers import UNSET, Sandbox, make_sandbox


@pytest.fixture()
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """HOME, TMPDIR and the working folder point at empty folders under tmp_path for this test."""
    box = make_sandbox(tmp_path)
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in box.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the folder it found first
    monkeypatch.chdir(box.cwd)
    return box


@pytest.fixture()
def tiny_run(tiny_shards: Path) -> Callable[..., list[str]]:  # noqa: F811 (the imported fixture)
    """tiny_run(out, "steps=3", ...) -> `pretrain` arguments of a seconds-long run on the shared tiny shards."""

    def overrides(out: Path, *extra: str, shards: Path | None = None) -> list[str]:
        return ["pretrain", *TINY, f"data.shards={shards or tiny_shards}", f"out={out}", *extra]

    return overrides
