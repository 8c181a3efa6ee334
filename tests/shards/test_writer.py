"""The writer: stored values and offsets, windows in stored units, frames, per-file failures, parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from radpretrain import files
from radpretrain.errors import ShardError
from radpretrain.shards import deid, dicom, reader
from radpretrain.shards import sample as sample_module
from radpretrain.shards.format import ShardSet
from radpretrain.shards.index import build_index
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import remove_outputs, shard
from radpretrain.shards.sample import robust_range, stored_pixels
from radpretrain.shards.writer import clean_temp
from tests.shards.helpers import make_archive, make_radiograph

CONFIG = ShardConfig(size=48, shard_size=2, val_fraction=0.0, test_fraction=0.0)


def _samples(out: Path) -> dict[str, dict]:
    return {s["key"]: s for s in reader.build_pipeline(ShardSet.open(out).urls("train"), shuffle=0)}


def test_stored_pixels_offsets() -> None:
    image, offset = stored_pixels(np.array([[0, 4095]], dtype=np.uint16))
    assert offset == 0 and image.dtype == np.uint16 and image.tolist() == [[0, 4095]]
    image, offset = stored_pixels(np.array([[-1024.0, 3071.4]]))
    assert offset == -1024 and image.tolist() == [[0, 4095]]
    image, offset = stored_pixels(np.array([[-3.5, 2.5]]))
    assert offset == -4 and image.tolist() == [[0, 6]]  # round half to even of 0.5 and 6.5


def test_robust_range_is_numpys_percentile() -> None:
    rng = np.random.default_rng(0)
    for trial in range(100):
        shape = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
        image = rng.integers(0, int(rng.choice([1, 255, 4095, 65535])) + 1, shape).astype(np.uint16)
        if trial % 3 == 0:
            image //= 7  # gaps in the histogram
        assert np.allclose(robust_range(image), np.percentile(image, [0.5, 99.5]), rtol=0, atol=1e-9)
        assert np.allclose(robust_range(image, (10, 90)), np.percentile(image, [10, 90]), rtol=0, atol=1e-9)


def test_robust_range_of_images_too_large_for_opencvs_histogram(monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.random.default_rng(1).integers(0, 4096, (300, 200)).astype(np.uint16)
    fast = robust_range(image)
    monkeypatch.setattr(sample_module, "_CV_HIST_PIXELS", image.size - 1)  # the np.bincount path
    assert robust_range(image) == fast
    assert np.allclose(fast, np.percentile(image, [0.5, 99.5]), rtol=0, atol=1e-9)


def test_rescaled_ct_like_values_and_header_window(tmp_path: Path) -> None:
    make_radiograph(tmp_path / "src" / "a.dcm", "P1", rescale=(1.0, -1024.0), window=(40.0, 400.0), bits_stored=12)
    summary = shard(tmp_path / "src", tmp_path / "out", CONFIG, key=tmp_path / "k", progress=False)
    assert summary.complete
    [sample] = _samples(tmp_path / "out").values()
    meta = sample["meta"]
    assert meta["offset"] < 0
    assert meta["window_center"] == pytest.approx(40.0 - meta["offset"]) and meta["window_width"] == 400.0
    assert meta["intensity_low"] < meta["intensity_high"]
    assert meta["spacing_mm"] == pytest.approx([0.2 * 96 / 48, 0.2 * 80 / 40])


def test_window_from_the_robust_range_when_the_header_has_none(tmp_path: Path) -> None:
    # Negative modality-LUT values need an offset; the fallback window is already in stored units.
    make_radiograph(tmp_path / "src" / "a.dcm", "P1", rescale=(1.0, -1024.0), window=None, bits_stored=12)
    shard(tmp_path / "src", tmp_path / "out", CONFIG, key=tmp_path / "k", progress=False)
    [sample] = _samples(tmp_path / "out").values()
    meta, pixels = sample["meta"], sample["pixels"]
    assert meta["offset"] < 0
    low, high = meta["window_center"] - meta["window_width"] / 2, meta["window_center"] + meta["window_width"] / 2
    assert (low, high) == pytest.approx((meta["intensity_low"], meta["intensity_high"]))
    assert ((pixels >= low) & (pixels <= high)).mean() > 0.5


def _multiframe(path: Path, frames: int) -> str:
    ds = make_radiograph(path, "P9", shape=(32, 24))
    pixels = np.stack([np.full((32, 24), 100 * (i + 1), np.uint16) for i in range(frames)])
    ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


@pytest.mark.parametrize(("rule", "values"), [("all", [100, 200, 300]), ("middle", [200]), ("first", [100])])
def test_frame_rules(tmp_path: Path, rule: str, values: list[int]) -> None:
    sop = _multiframe(tmp_path / "src" / "cine.dcm", 3)
    config = ShardConfig(size=48, shard_size=2, val_fraction=0.0, test_fraction=0.0, frames=rule)  # type: ignore[arg-type]
    summary = shard(tmp_path / "src", tmp_path / "out", config, key=tmp_path / "k", progress=False)
    assert summary.manifest is not None
    assert summary.manifest["counts"]["written"] == 1 and summary.manifest["counts"]["samples"] == len(values)
    samples = _samples(tmp_path / "out")
    assert sorted(int(s["pixels"].max()) for s in samples.values()) == values
    assert all(deid.is_pseudonym(key) for key in samples)
    if rule != "all":
        assert list(samples) == [deid.Pseudonymizer(deid.load_key(tmp_path / "k"))("sop", sop)]


def test_a_crashing_file_is_recorded_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_archive(tmp_path / "src", 5)
    real = dicom.read_dicom_for

    def flaky(path: Path, *args: object, **kwargs: object) -> object:
        if Path(path).name == "img002.dcm":
            raise RuntimeError("codec bug with /secret/path/SMITH")
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dicom, "read_dicom_for", flaky)
    summary = shard(tmp_path / "src", tmp_path / "out", CONFIG, key=tmp_path / "k", progress=False)
    assert summary.manifest is not None
    assert summary.manifest["counts"]["written"] == 4
    assert summary.manifest["counts"]["failed"] == {"unexpected error (RuntimeError)": 1}
    errors = (tmp_path / "out" / "errors.jsonl").read_text()
    assert "SMITH" not in errors and "unexpected error (RuntimeError)" in errors


def test_parts_then_manifest(tmp_path: Path) -> None:
    make_archive(tmp_path / "src", 9, patients=9)
    key = tmp_path / "k"
    with pytest.raises(ShardError, match="run `radpretrain index SRC OUT` once first"):
        shard(tmp_path / "src", tmp_path / "out", CONFIG, key=key, part=(0, 2), progress=False)
    pseudonymize = deid.Pseudonymizer(deid.load_key(key))
    build_index(tmp_path / "src", tmp_path / "out", pseudonymize, CONFIG.index, progress=False)
    first = shard(tmp_path / "src", tmp_path / "out", CONFIG, key=key, part=(0, 2), progress=False)
    assert not first.complete and first.manifest is None and first.units_written == 3
    assert not (tmp_path / "out" / "manifest.json").exists()
    second = shard(tmp_path / "src", tmp_path / "out", CONFIG, key=key, part=(1, 2), progress=False)
    assert second.complete and second.units_written == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 9 and len(manifest["splits"]["train"]["shards"]) == 5
    final = shard(tmp_path / "src", tmp_path / "out", CONFIG, key=key, progress=False)
    assert final.units_written == 0 and final.complete
    assert len(_samples(tmp_path / "out")) == 9


def test_temp_files_of_killed_runs_are_removed_by_unit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    finished = ["train-000000.tar", "train-000000.stats.json", "plan.json", "index.jsonl"]
    in_flight = ["train-000001.tar", "train-000001.stats.json", "train-000002.tar", "plan.json", "manifest.json"]
    for name in finished:
        (out / name).write_text("x")
    temps = {name: files.temp_path(out / name) for name in in_flight}
    for temp in temps.values():
        temp.write_text("partial")
    # A part removes only the temp files of its own units: other parts write theirs into the same OUT.
    assert clean_temp(out, ["train-000001", "train-000009"]) == 2
    assert sorted(p.name for p in out.iterdir() if files.is_temp(p)) == sorted(
        temps[name].name for name in ("train-000002.tar", "plan.json", "manifest.json")
    )
    assert clean_temp(out) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(finished)
    temps["train-000002.tar"].write_text("partial")
    assert remove_outputs(out) == 4  # tar, stats, plan and the temp file; the index stays
    assert [p.name for p in out.iterdir()] == ["index.jsonl"]
