"""The demo runs the whole path on a tiny setting, and a second run reuses every finished stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from radpretrain.cli import main

TINY = [
    "files=160",
    "min_size=96",
    "max_size=160",
    "workers=1",
    "shard_size=64",
    "encoder=test_resnet",
    "image_size=32",
    "steps=3",
    "batch_size=16",
    "label_counts=[2]",
    "repeats=1",
    "strategies=[random, full]",
    "finetune_size=32",
    "finetune_epochs=1",
    "test_count=4",
]


@pytest.mark.slow
def test_demo_end_to_end_then_reuses_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", str(out), *TINY]) == 0
    first = capsys.readouterr().out
    for line in ("archive", "shards", "encoder", "model card", "sweep table", "plot", "| random |", "| full |"):
        assert line in first, f"summary lacks {line!r}"
    assert (out / "encoder" / "encoder.safetensors").is_file()
    assert (out / "encoder" / "README.md").is_file()
    assert (out / "sweep" / "report" / "learning_curve.png").is_file()
    results = (out / "sweep" / "results.jsonl").read_text().splitlines()
    assert len(results) == 2
    weights = (out / "encoder" / "encoder.safetensors").stat().st_mtime_ns

    assert main(["demo", str(out), *TINY]) == 0
    assert capsys.readouterr().out.count("| random |") == 1
    # nothing was trained or swept again
    assert (out / "encoder" / "encoder.safetensors").stat().st_mtime_ns == weights
    assert (out / "sweep" / "results.jsonl").read_text().splitlines() == results
