"""Real DICOM radiographs (pydicom test files, pydicom-data): sharded, and stored pixels match pydicom's decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from radpretrain.shards import deid, reader
from radpretrain.shards.dicom import resize_longest
from radpretrain.shards.format import ShardSet
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard

SIZE = 256
RADIOGRAPHS = ("CR", "DX", "MG", "RF", "XA", "DR")


def _candidates() -> list[Path]:
    """Every projection radiograph among the installed test files (found by reading headers, not by name)."""
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # pydicom-data

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if ds.get("Modality") in RADIOGRAPHS and ds.get("Rows"):
                found.append(path)
    return found


def _modality_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The modality-LUT image of the stored value range (rescale applies only when both tags are present)."""
    bits = int(ds.BitsStored)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return float(low), float(high)


def _reference(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's own decode + modality LUT, MONOCHROME1 inverted over the modality range (written here)."""
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        low, high = _modality_range(ds)
        values = low + high - values
    return values


@pytest.mark.slow
def test_real_radiographs_match_pydicom(tmp_path: Path) -> None:
    files = _candidates()
    names = {p.name for p in files}
    assert {"RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm"} <= names, "pydicom-data is not installed"
    key = tmp_path / "k"
    pseudo = deid.Pseudonymizer(deid.load_key(key))
    # RG1_* and RG3_* share one SOPInstanceUID (one instance in several syntaxes), which the sharder would
    # deduplicate; each file gets its own source folder so that every syntax is decoded and compared.
    for number, path in enumerate(files):
        src, out = tmp_path / f"src{number}", tmp_path / f"out{number}"
        src.mkdir()
        (src / "image").symlink_to(path)
        # Exact decode: the pixels must be full decode + area resize to the last grey level.
        config = ShardConfig(size=SIZE, shard_size=4, exact_decode=True)
        summary = shard(src, out, config, key=key, progress=False)
        assert summary.manifest is not None
        assert summary.manifest["decode"] == {"exact": True, "files": {"full": 1}}
        counts = summary.manifest["counts"]
        assert counts["written"] == 1, (path.name, counts)
        [split] = [name for name, entry in summary.manifest["splits"].items() if entry["shards"]]
        [sample] = list(reader.build_pipeline(ShardSet.open(out).urls(split), shuffle=0))

        ds = pydicom.dcmread(path)
        assert sample["key"] == pseudo("sop", ds.SOPInstanceUID)
        reference = _reference(ds)
        stored = sample["pixels"]
        assert max(stored.shape) == min(SIZE, max(reference.shape))
        resized = resize_longest(reference, SIZE)  # the same resize: pydicom's decode is the reference here
        assert resized.shape == stored.shape
        difference = np.abs(resized - (stored.astype(np.float64) + sample["meta"]["offset"]))
        assert difference.max() <= 1.0, (path.name, float(difference.max()))
        meta = sample["meta"]
        assert meta["original_shape"] == list(reference.shape)
        assert meta["transfer_syntax"] == ds.file_meta.TransferSyntaxUID.name
        assert meta["bits_stored"] == ds.BitsStored
        if "WindowCenter" in ds:  # the header window, moved into stored units (MONOCHROME1: mirrored)
            center = float(ds.WindowCenter if not isinstance(ds.WindowCenter, list) else ds.WindowCenter[0])
            if ds.PhotometricInterpretation == "MONOCHROME1":
                center = sum(_modality_range(ds)) - center
            assert meta["window_center"] == pytest.approx(center - meta["offset"], abs=1e-3)
