"""`inspect`: the composition report and the contact sheet of a shard folder."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from radpretrain.errors import ShardError
from radpretrain.shards import inspect
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard
from tests.shards.helpers import make_archive, make_radiograph


def test_report_and_contact_sheet(tmp_path: Path) -> None:
    make_archive(tmp_path / "src", 9, patients=9)
    make_radiograph(tmp_path / "src" / "ct.dcm", "P0", modality="CT")
    config = ShardConfig(size=48, shard_size=4, val_fraction=0.0, test_fraction=0.0)
    shard(tmp_path / "src", tmp_path / "out", config, key=tmp_path / "k", progress=False)
    report = inspect.composition_report(tmp_path / "out")
    assert "files seen 10: written 9, duplicate 0, skipped 1, failed 0; samples 9" in report
    assert "split: train 9 (3 shards" in report
    assert "body_part: chest 3 (33%), hand 3 (33%), knee 3 (33%)" in report
    assert "skipped: modality not selected 1" in report
    assert "shard sizes: 3 shards, samples min 1 / median 4 / max 4" in report

    sheet = inspect.contact_sheet(tmp_path / "out", tmp_path / "sheet.png", n=6, columns=4)
    image = cv2.imread(str(sheet), cv2.IMREAD_UNCHANGED)
    assert image.shape == (2 * (inspect.TILE + inspect.CAPTION), 4 * inspect.TILE)
    assert image[: inspect.TILE, : inspect.TILE].std() > 5  # a radiograph, not an empty tile
    assert len(inspect.random_samples(tmp_path / "out", 50)) == 9

    with pytest.raises(ShardError, match="no manifest"):
        inspect.composition_report(tmp_path / "src")
