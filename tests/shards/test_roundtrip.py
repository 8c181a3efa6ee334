"""synth -> shard -> reader: counts, shapes, labels and splits match synth.json; every file is accounted for."""

from __future__ import annotations

import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from radpretrain import intensity, synth
from radpretrain.shards import deid, labels, reader
from radpretrain.shards.format import SAMPLE_FIELDS, ShardSet
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard

SIZE = 64

# What each hostile kind must become: (status, reason phrase) in errors.jsonl.
EXPECTED_REASONS = {
    "truncated": ("failed", {"truncated pixel data", "truncated file"}),
    "not_dicom": ("skipped", {"not a DICOM file"}),
    "dicomdir": ("skipped", {"not an image"}),
    "no_pixels": ("failed", {"no pixel data"}),
    "rgb": ("skipped", {"colour image (photometric RGB)"}),
    "burned_in": ("skipped", {"burned-in annotation"}),
    "empty": ("skipped", {"empty file"}),
    "absurd_dims": ("failed", {"absurd dimensions"}),
    "ct": ("skipped", {"modality not selected"}),
}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("roundtrip")
    truth = synth.generate(root / "src", 48, seed=3, hostile=0.25, min_size=48, max_size=160, progress=False)
    config = ShardConfig(size=SIZE, shard_size=7, val_fraction=0.2, test_fraction=0.2)
    # A fixed key makes the patient-level split draw repeatable: with a fresh random key, a dozen patients
    # all land in train now and then, and the assertion that several splits occur would be a coin toss.
    (root / "deid.key").write_text("5eed" * 16 + "\n")
    summary = shard(root / "src", root / "out", config, key=root / "deid.key", workers=2, progress=False)
    pseudonymize = deid.Pseudonymizer(deid.load_key(root / "deid.key"))
    return {"root": root, "truth": truth, "summary": summary, "pseudo": pseudonymize, "out": root / "out"}


def _all_samples(out: Path) -> list[dict[str, Any]]:
    samples = []
    for split in ("train", "val", "test"):
        try:
            urls = ShardSet.open(out).urls(split)
        except Exception:
            continue
        samples += list(reader.build_pipeline(urls, shuffle=0))
    return samples


def test_round_trip_matches_ground_truth(sharded: dict[str, Any]) -> None:
    truth, pseudo, out = sharded["truth"], sharded["pseudo"], sharded["out"]
    # Sample key = HMAC of the SOPInstanceUID that pydicom reads from each radiograph of the archive.
    expected = {}
    for rel, info in truth.files.items():
        if info["kind"] == "radiograph":
            uid = pydicom.dcmread(truth.root / rel, stop_before_pixels=True).SOPInstanceUID
            expected[pseudo("sop", uid)] = info
    samples = _all_samples(out)
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)), "a sample appears twice"
    assert set(keys) == set(expected), "the samples are not exactly the radiographs of the archive"

    split_of_patient: dict[str, set[str]] = defaultdict(set)
    with_spacing = 0
    for sample in samples:
        info, meta, pixels = expected[sample["key"]], sample["meta"], sample["pixels"]
        assert set(meta) == set(SAMPLE_FIELDS)
        assert pixels.dtype == np.uint16 and pixels.ndim == 2
        assert max(pixels.shape) == min(SIZE, max(info["rows"], info["cols"]))
        assert meta["original_shape"] == [info["rows"], info["cols"]]
        assert meta["patient"] == pseudo("patient", info["patient_id"])
        assert meta["study"] == pseudo("study", info["study_uid"])
        assert meta["body_part"] == (info["body_part"] if info["body_part_header"] else labels.UNKNOWN)
        assert meta["age_years"] == (min(info["age_years"], labels.AGE_CAP) if info["age_header"] else None)
        assert meta["age_bucket"] == labels.AgeBuckets.parse().bucket(meta["age_years"])
        assert meta["sex"] == (info["sex"] if info["sex_header"] else None)
        if info["view_header"]:
            assert meta["view"] == info["view"]
        assert meta["laterality"] == (info["laterality"] if info["laterality_header"] else None)
        assert meta["modality"] == info["modality"]
        assert meta["manufacturer"] == info["manufacturer"]
        assert meta["transfer_syntax"] == info["transfer_syntax"]
        assert meta["bits_stored"] == info["bits_stored"]
        if meta["spacing_mm"] is not None:  # None where the header gives no spacing (synth leaves some out)
            scale = info["rows"] / pixels.shape[0]
            assert meta["spacing_mm"] == pytest.approx([info["spacing_mm"][0] * scale] * 2, rel=0.05)
            with_spacing += 1
        assert meta["intensity_low"] <= meta["intensity_high"] and meta["window_width"] > 0
        image = sample["image"]
        assert image.dtype == np.float32 and image.shape == pixels.shape
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > image.min()
        split_of_patient[meta["patient"]].add(meta["split"])
    assert with_spacing >= len(samples) // 3
    assert all(len(splits) == 1 for splits in split_of_patient.values()), "a patient is in two splits"
    assert len({s for splits in split_of_patient.values() for s in splits}) >= 2


def test_manifest_accounts_for_every_file(sharded: dict[str, Any]) -> None:
    out, truth = sharded["out"], sharded["truth"]
    manifest = ShardSet.open(out).manifest
    counts = manifest["counts"]
    seen = sum(1 for p in (out.parent / "src").rglob("*") if p.is_file())
    assert counts["files_seen"] == seen  # synth.json included: it is a file of the source folder
    accounted = (
        counts["written"] + counts["duplicate"] + sum(counts["skipped"].values()) + sum(counts["failed"].values())
    )
    assert accounted == counts["files_seen"]
    assert counts["written"] == sum(1 for i in truth.files.values() if i["kind"] == "radiograph")
    assert counts["duplicate"] == sum(1 for i in truth.files.values() if i["kind"] == "duplicate")
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == sum(counts["skipped"].values()) + sum(counts["failed"].values())
    assert all(deid.is_pseudonym(e["file"]) and e["reason"] for e in errors)
    assert manifest["intensity_convention"] == intensity.CONVENTION
    assert manifest["size"] == SIZE
    assert sum(s["samples"] for s in manifest["splits"].values()) == counts["samples"] == counts["written"]
    assert manifest["vocab"]["age_bucket"] == list(labels.DEFAULT_AGE_BUCKETS)
    assert "unknown" not in manifest["vocab"]["body_part"]
    body_parts = Counter(i["body_part"] for i in truth.files.values() if i["kind"] == "radiograph")
    assert sum(manifest["composition"]["body_part"].values()) == sum(body_parts.values())


def test_every_hostile_kind_has_its_reason(sharded: dict[str, Any]) -> None:
    out, truth, pseudo = sharded["out"], sharded["truth"], sharded["pseudo"]
    errors = {e["file"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    kinds = Counter(i["kind"] for i in truth.files.values())
    assert set(EXPECTED_REASONS) <= set(kinds), "synth did not plant every hostile kind"
    for rel, info in truth.files.items():
        if info["kind"] in ("radiograph", "duplicate"):
            assert pseudo("file", rel) not in errors
            continue
        status, reasons = EXPECTED_REASONS[info["kind"]]
        error = errors[pseudo("file", rel)]
        assert error["status"] == status and error["reason"] in reasons, (info["kind"], error)


def test_shards_are_plain_webdataset_tars(sharded: dict[str, Any]) -> None:
    out = sharded["out"]
    manifest = ShardSet.open(out).manifest
    for split in manifest["splits"].values():
        for name in split["shards"]:
            with tarfile.open(out / name) as tar:
                names = tar.getnames()
            assert len(names) % 2 == 0
            assert {n.rsplit(".", 1)[1] for n in names} == {"png", "json"}  # the default codec
            stats = json.loads((out / name.replace(".tar", ".stats.json")).read_text())
            assert stats["samples"] == len(names) // 2
    assert not list(out.glob(".*tmp*"))
