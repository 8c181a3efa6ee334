"""Decoding at the resolution stored: when the reduced path is taken, how close it is, and --exact-decode."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from radpretrain import synth
from radpretrain.cli import main
from radpretrain.shards import dicom
from radpretrain.shards.format import ROBUST_PERCENTILES
from radpretrain.shards.plan import ShardConfig
from radpretrain.shards.run import shard
from radpretrain.shards.sample import stored_pixels
from radpretrain.synth.archive import transcode
from tests.shards.helpers import make_j2k, make_radiograph

SIZE = 48
#: Reduced decode + area resize vs full decode + area resize, in per mille of the image's robust window:
#: the mean and the 99th percentile of the absolute difference. Measured on these noisy 256 x 192 synthetic
#: images at 48 px: J2K level 2 7.7-9.4 and 40-63 (pixel noise is about 22 per mille), JPEG about 2 and 10.
MEAN_PER_MILLE, P99_PER_MILLE = 12.0, 80.0


def _radiographs(root: Path) -> list[Path]:
    # synth names files in several styles (IM000003.dcm, I0000009.DCM, IM000007, <uid>.dcm), as PACS do
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "synth.json")


@pytest.fixture(scope="module")
def j2k_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("j2k") / "src"
    synth.generate(root, 6, seed=3, shape=(256, 192), bits_stored=12, syntaxes=["JPEG2000Lossless"], progress=False)
    return root


def _per_mille(reduced: np.ndarray, full: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(full, ROBUST_PERCENTILES)
    difference = np.abs(reduced.astype(np.float64) - full.astype(np.float64)) * 1000.0 / max(high - low, 1.0)
    return float(difference.mean()), float(np.percentile(difference, 99))


def _compare(path: Path, size: int) -> tuple[str, float, float]:
    decoded = dicom.read_dicom_for(path, size)
    _, full = dicom.read_dicom(path)
    assert decoded.shape == full.shape[1:]
    reduced = dicom.resize_longest(decoded.frames, size, shape=decoded.shape)
    reference = dicom.resize_longest(full, size)
    assert reduced.shape == reference.shape and reduced.dtype == reference.dtype
    return (decoded.path, *_per_mille(reduced, reference))


def test_j2k_is_decoded_at_the_deepest_level_that_keeps_the_size(j2k_archive: Path) -> None:
    files = _radiographs(j2k_archive)
    assert len(files) >= 4
    for path in files:
        # 256 x 192 at 48 px: 64 x 48 at level 2 is the deepest that keeps the longest side >= 48.
        decode_path, mean, p99 = _compare(path, SIZE)
        assert decode_path == "j2k-reduce-2"
        assert mean <= MEAN_PER_MILLE and p99 <= P99_PER_MILLE, (path.name, mean, p99)
        assert _compare(path, 100)[0] == "j2k-reduce-1"


def test_the_low_band_is_moved_onto_the_area_grid(j2k_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _radiographs(j2k_archive)[0]
    _, with_shift, _ = _compare(path, SIZE)
    monkeypatch.setattr(dicom, "_on_area_grid", lambda arr, level: arr)
    _, without, _ = _compare(path, SIZE)
    assert with_shift < 0.6 * without, (with_shift, without)  # measured 26 vs 66 grey levels


def test_levels() -> None:
    assert dicom.reduced_level(2500, 2000, 512) == 2  # 625 x 500
    assert dicom.reduced_level(2500, 2000, 626) == 1
    assert dicom.reduced_level(2500, 2000, 2500) == 0
    assert dicom.reduced_level(1955, 1841, 128) == 0  # odd sides: no level divides them
    assert dicom.reduced_level(2048, 2048, 64, most=3) == 3
    assert dicom.reduced_level(2048, 2048, 64, backoff=1) == 4


@pytest.mark.parametrize(
    "case",
    ["exact", "small image", "odd size", "signed", "multi-frame", "rle", "uncompressed", "lut sequence"],
)
def test_full_decode_where_reduction_does_not_apply(tmp_path: Path, case: str) -> None:
    path, size = tmp_path / "a.dcm", SIZE
    if case == "exact":
        make_j2k(path)
        size = None  # type: ignore[assignment]
    elif case == "small image":
        make_j2k(path)
        size = 129  # 256 / 2 < 129: no level keeps the size
    elif case == "odd size":
        make_j2k(path, shape=(255, 192))
    elif case == "signed":
        make_j2k(path, signed=True)
    elif case == "multi-frame":
        make_j2k(path, frames=2)
    elif case == "rle":
        ds = make_radiograph(path, "P1", shape=(256, 192))
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
    elif case == "uncompressed":
        make_radiograph(path, "P1", shape=(256, 192))
    else:  # a non-linear Modality LUT Sequence does not commute with averaging
        make_j2k(path)
        ds = pydicom.dcmread(path)
        item = pydicom.Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.ModalityLUTType = "US"
        lut = (np.sqrt(np.arange(4096)) * 1000).astype("<u2")
        item["LUTData"] = pydicom.DataElement(0x00283006, "OW", lut.tobytes())
        ds.ModalityLUTSequence = [item]
        ds.save_as(path, enforce_file_format=True)
    decoded = dicom.read_dicom_for(path, size)
    _, full = dicom.read_dicom(path)
    assert decoded.path == dicom.FULL_DECODE
    np.testing.assert_array_equal(decoded.frames, full)


def test_undecodable_codestreams_fall_back_to_the_full_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_j2k(tmp_path / "a.dcm")

    def broken(*args: object) -> None:
        raise OSError("broken data stream when reading image file")

    monkeypatch.setattr(dicom, "_j2k_at_level", broken)
    decoded = dicom.read_dicom_for(path, SIZE)
    assert decoded.path == dicom.FULL_DECODE
    np.testing.assert_array_equal(decoded.frames, dicom.read_dicom(path)[1])


def test_jpeg_baseline_uses_dct_scaling(tmp_path: Path) -> None:
    synth.generate(tmp_path / "src", 3, seed=1, shape=(256, 192), bits_stored=8, syntaxes=["ExplicitVRLittleEndian"])
    for number, path in enumerate(_radiographs(tmp_path / "src")):
        out = tmp_path / f"jpeg{number}.dcm"
        transcode(path, out, "JPEGBaseline8Bit")
        decode_path, mean, p99 = _compare(out, SIZE)
        assert decode_path == "jpeg-draft-4"  # 64 x 48
        assert mean <= MEAN_PER_MILLE and p99 <= P99_PER_MILLE, (out.name, mean, p99)
        assert _compare(out, 20)[0] == "jpeg-draft-8"  # 1/8 is libjpeg's deepest scale


def _tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                data = tar.extractfile(member)
                assert data is not None
                samples.setdefault(key, {})[ext] = data.read()
    return samples


def test_exact_decode_gives_full_decode_pixels_and_the_manifest_says_how(j2k_archive: Path, tmp_path: Path) -> None:
    key = tmp_path / "k"
    exact = shard(j2k_archive, tmp_path / "exact", ShardConfig(size=SIZE, exact_decode=True), key=key, progress=False)
    reduced = shard(j2k_archive, tmp_path / "reduced", ShardConfig(size=SIZE), key=key, progress=False)
    assert exact.manifest is not None and reduced.manifest is not None
    written = exact.manifest["counts"]["written"]
    assert exact.manifest["decode"] == {"exact": True, "files": {"full": written}}
    radiographs = len(_radiographs(j2k_archive))
    assert reduced.manifest["decode"]["exact"] is False
    assert reduced.manifest["decode"]["files"].get("j2k-reduce-2") == radiographs
    assert sum(reduced.manifest["decode"]["files"].values()) == written

    exact_samples, reduced_samples = _tar_samples(tmp_path / "exact"), _tar_samples(tmp_path / "reduced")
    assert exact_samples.keys() == reduced_samples.keys()
    from radpretrain.shards.codecs import decode_png

    by_shape = {}
    for path in _radiographs(j2k_archive):
        _, full = dicom.read_dicom(path)
        stored, _ = stored_pixels(dicom.resize_longest(full[0], SIZE))
        by_shape[stored.tobytes()] = path
    matched = 0
    for key_, sample in exact_samples.items():
        meta, other = json.loads(sample["json"]), json.loads(reduced_samples[key_]["json"])
        assert meta["original_shape"] == other["original_shape"] and meta["spacing_mm"] == other["spacing_mm"]
        pixels = decode_png(sample["png"])
        assert pixels.shape == decode_png(reduced_samples[key_]["png"]).shape
        matched += pixels.tobytes() in by_shape  # exact decode = full decode + area resize, to the grey level
    assert matched == radiographs


def test_cli_flag(j2k_archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(j2k_archive), str(out), "--size", str(SIZE), "--key", str(tmp_path / "k"), "--no-progress"]
    assert main(["shard", *args, "--exact-decode"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["exact_decode"] is True and manifest["decode"]["exact"] is True
