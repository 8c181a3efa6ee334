"""PNG/JPEG folders with a metadata CSV: real figure1-cxr images -> shards, free text never passes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from radpretrain.errors import ConfigError, ShardError
from radpretrain.shards import deid, plain, reader
from radpretrain.shards.dicom import resize_longest
from radpretrain.shards.format import ShardSet
from radpretrain.shards.index import IndexOptions
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard

FIGURE1 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "figure1-cxr"


def _metadata() -> list[dict[str, str]]:
    text = (FIGURE1 / "metadata.csv").read_bytes().decode("latin-1")
    return list(csv.DictReader(text.splitlines()))


@pytest.mark.slow
def test_figure1_folder_to_shards_without_free_text(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "radpretrain", "shard", str(FIGURE1), str(tmp_path / "out"), "--key"]
    command += [str(tmp_path / "k"), "--size", "64", "--shard-size", "20", "--body-part", "chest", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    manifest = ShardSet.open(out).manifest
    images = sorted(p for p in (FIGURE1 / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    counts = manifest["counts"]
    assert counts["written"] + counts["duplicate"] == len(images)
    assert counts["failed"] == {}

    pseudo = deid.Pseudonymizer(deid.load_key(tmp_path / "k"))
    rows = {row["patientid"]: row for row in _metadata()}
    samples = []
    for split, entry in manifest["splits"].items():
        if entry["shards"]:
            samples += list(reader.build_pipeline(ShardSet.open(out).urls(split), shuffle=0))
    assert len(samples) == counts["written"]
    by_patient = {pseudo("patient", pid): row for pid, row in rows.items()}
    for sample in samples:
        meta = sample["meta"]
        row = by_patient[meta["patient"]]  # the patientid column matched the image by its file stem
        assert meta["body_part"] == "chest" and meta["modality"] == "DX"
        assert meta["sex"] == (row["sex"] or None)
        if row["age"] == "50+":
            assert meta["age_years"] == 50 and meta["age_bucket"] == "40-64"
        if row["view"] == "AP erect":
            assert meta["view"] == "AP"
        assert meta["transfer_syntax"] in ("JPEG file", "PNG file")
        assert meta["bits_stored"] == 8 and max(sample["pixels"].shape) == 64

    # Pixels: the grey decode of the image through the sharder's resize (8-bit values kept, offset 0).
    first = FIGURE1 / "images" / "COVID-00003a.jpg"
    [sample] = [s for s in samples if s["meta"]["patient"] == pseudo("patient", "COVID-00003a")]
    grey = cv2.imread(str(first), cv2.IMREAD_UNCHANGED)
    expected = resize_longest(grey, 64)
    assert np.abs(expected.astype(int) - sample["pixels"].astype(int)).max() <= 1

    # Free text, findings and raw IDs never reach an output or the terminal.
    needles = {row["notes"][:40] for row in rows.values() if len(row["notes"]) >= 12}
    needles |= {row["patientid"] for row in rows.values()} | {p.name for p in images}
    assert len(needles) > 60
    texts = [result.stdout + result.stderr]
    for path in out.iterdir():
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    texts.append(member.name)
                    if member.name.endswith(".json"):
                        data = tar.extractfile(member)
                        assert data is not None
                        texts.append(data.read().decode())
        elif path.is_file():
            texts.append(path.read_text())
    leaks = [n for n in needles for text in texts if n in text]
    assert not leaks, leaks[:5]


def test_csv_mapping_and_colour(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    grey = (np.arange(40 * 30).reshape(40, 30) % 251).astype(np.uint8)
    cv2.imwrite(str(src / "a.png"), grey)
    cv2.imwrite(str(src / "b.png"), np.dstack([grey, grey, grey]))  # grey saved as RGB: accepted
    colour = np.dstack([grey, np.flipud(grey), np.zeros_like(grey)])
    cv2.imwrite(str(src / "c.png"), colour)  # true colour: skipped
    (src / "meta.csv").write_bytes(
        "Image Name;ignored\n".replace(";", ",").encode() + "a.png,Müller notes\nb.png,x\nc.png,y\n".encode("latin-1")
    )
    options = IndexOptions(plain=plain.PlainOptions(csv="meta.csv", csv_columns={"file": "Image Name"}))
    config = ShardConfig(size=32, shard_size=10, val_fraction=0.0, test_fraction=0.0, index=options)
    summary = shard(src, tmp_path / "out", config, key=tmp_path / "k", progress=False)
    assert summary.manifest is not None
    counts = summary.manifest["counts"]
    assert counts["written"] == 2 and counts["skipped"] == {"colour image": 1}
    samples = list(reader.build_pipeline(ShardSet.open(tmp_path / "out").urls(), shuffle=0))
    assert all(np.array_equal(s["pixels"], cv2.resize(grey, (24, 32), interpolation=cv2.INTER_AREA)) for s in samples)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in errors] == ["colour image"]

    with pytest.raises(ShardError, match=r"no column\(s\) file=Name"):
        bad = IndexOptions(plain=plain.PlainOptions(csv="meta.csv", csv_columns={"file": "Name"}))
        shard(src, tmp_path / "out2", ShardConfig(index=bad), key=tmp_path / "k", progress=False)
    with pytest.raises(ConfigError, match="unknown CSV field"):
        plain.PlainOptions(csv_columns={"notes": "notes"}).validate()
    with pytest.raises(ConfigError, match="field=column"):
        plain.parse_csv_columns("file")
    assert plain.parse_csv_columns("file=Image Name, patient=PID") == {"file": "Image Name", "patient": "PID"}
