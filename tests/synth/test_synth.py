from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from radpretrain.cli import main
from radpretrain.errors import ConfigError
from radpretrain.shards import labels
from radpretrain.synth.archive import (
    HOSTILE_KINDS,
    SynthSummary,
    available_syntaxes,
    checksum,
    generate,
    iter_files,
)
from radpretrain.synth.phantoms import BODY_PARTS, MASK_STRUCTURES, VIEWS, check_body_parts, make_radiograph

MARKER = "ZQX"

# String elements a real header carries that identify nobody (device, coding and display terms).
NOT_PHI = {
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "BodyPartExamined",
    "LUTExplanation",
    "WindowCenterWidthExplanation",
    "FileSetID",
    "ImplementationVersionName",
    "SourceApplicationEntityTitle",
    "PatientAge",
    "RescaleType",
}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    out = tmp_path_factory.mktemp("synth") / "export"
    return generate(
        out, 90, seed=3, hostile=0.15, masks=True, min_size=48, max_size=160, phi_marker=MARKER, progress=False
    )


def _read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def test_folder_tree_and_counts(export: SynthSummary) -> None:
    on_disk = {p.relative_to(export.root).as_posix() for p in iter_files(export.root)}
    assert on_disk == set(export.files)
    masks_on_disk = {p.relative_to(export.root).as_posix() for p in export.root.rglob("*.png")}
    assert masks_on_disk == {row["mask"] for row in export.masks}
    assert export.n_files == 90
    counts = export.counts
    assert set(HOSTILE_KINDS) <= set(counts)
    assert sum(counts[k] for k in HOSTILE_KINDS) == round(0.15 * 90)
    radiographs = [rel for rel, info in export.files.items() if info["kind"] == "radiograph"]
    assert all(len(rel.split("/")) == 4 for rel in radiographs)  # patient/study/series/file
    assert any(not rel.lower().endswith(".dcm") for rel in radiographs)
    patients = Counter(export.files[rel]["patient_id"] for rel in radiographs)
    studies = Counter(export.files[rel]["study_uid"] for rel in radiographs)
    assert len(patients) > 5 and max(patients.values()) >= 3 and max(studies.values()) >= 2
    assert {export.files[rel]["body_part"] for rel in radiographs} >= {"chest", "hand", "knee", "pelvis"}
    ages = [export.files[rel]["age_years"] for rel in radiographs]
    assert min(ages) < 18 and max(ages) >= 65
    assert {export.files[rel]["sex"] for rel in radiographs} >= {"M", "F"}
    assert SynthSummary.load(export.root).files == export.files


def test_every_hostile_kind_is_what_it_claims(export: SynthSummary) -> None:
    files = export.files
    for path in export.paths_of("truncated"):
        # Any failure will do (a deflated file fails inside zlib, others when pixels are decoded).
        try:
            _ = _read(path).pixel_array
        except Exception:
            continue
        pytest.fail(f"truncated file {path.name} decoded")
    for path in export.paths_of("not_dicom"):
        with pytest.raises(InvalidDicomError):
            _read(path)
    for path in export.paths_of("empty"):
        assert path.stat().st_size == 0
    for path in export.paths_of("dicomdir"):
        assert path.name == "DICOMDIR"
        assert _read(path).file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    for path in export.paths_of("no_pixels"):
        ds = _read(path)
        assert "PixelData" not in ds and ds.Modality in ("CR", "DX", "DR")
    for path in export.paths_of("rgb"):
        ds = _read(path)
        assert ds.PhotometricInterpretation == "RGB" and ds.pixel_array.shape[-1] == 3
        assert "BurnedInAnnotation" not in ds  # skipped for its colour, not for a flag
    for path in export.paths_of("burned_in"):
        ds = _read(path)
        assert ds.BurnedInAnnotation == "YES" and ds.pixel_array.ndim == 2
    for path in export.paths_of("absurd_dims"):
        ds = _read(path)
        assert ds.Rows * ds.Columns * 2 > 100 * len(ds.PixelData)
    for path in export.paths_of("ct"):
        assert _read(path).Modality == "CT"
    for rel, info in files.items():
        if info["kind"] == "duplicate":
            source = export.root / info["duplicate_of"]
            assert (export.root / rel).read_bytes() == source.read_bytes()
            assert _read(export.root / rel).SOPInstanceUID == files[info["duplicate_of"]]["sop_instance_uid"]
            assert files[info["duplicate_of"]]["kind"] == "radiograph"
    for path in export.paths_of("radiograph"):
        assert _read(path).BurnedInAnnotation == "NO"


def test_radiographs_decode_and_match_their_ground_truth(export: SynthSummary) -> None:
    for path in export.radiographs:
        info = export.files[path.relative_to(export.root).as_posix()]
        ds = _read(path)
        pixels = ds.pixel_array
        assert pixels.shape == (info["rows"], info["cols"]) == (ds.Rows, ds.Columns)
        assert 48 <= max(pixels.shape) <= 160
        assert int(pixels.max()) < 2**ds.BitsStored and pixels.std() > 0
        assert ds.PhotometricInterpretation == info["photometric"]
        assert ds.file_meta.TransferSyntaxUID.name == info["transfer_syntax"]
        assert ds.Modality == info["modality"]
        assert ds.SOPInstanceUID == info["sop_instance_uid"]
        assert ("PatientAge" in ds) == (info["age_header"] == "age")
        if info["age_header"] == "dates":
            assert "PatientBirthDate" in ds and "StudyDate" in ds
        if info["body_part_header"] == "tag":
            assert ds.BodyPartExamined.strip()
        else:
            assert not ds.get("BodyPartExamined", "")
        assert ("ViewPosition" in ds) == info["view_header"]
        assert (ds.get("PatientSex", "") == info["sex"]) == info["sex_header"]


def test_header_variety(export: SynthSummary) -> None:
    headers = [_read(p) for p in export.radiographs]
    assert {ds.PhotometricInterpretation for ds in headers} == {"MONOCHROME1", "MONOCHROME2"}
    syntaxes = {ds.file_meta.TransferSyntaxUID.keyword for ds in headers}
    assert len(syntaxes) >= 4 and set(syntaxes) <= set(available_syntaxes())
    assert any(s.startswith(("JPEGLS", "JPEG2000", "RLE")) for s in syntaxes)
    assert len({ds.BitsStored for ds in headers}) >= 3
    assert any("PatientAge" not in ds for ds in headers) and any("PatientAge" in ds for ds in headers)
    assert any(not ds.get("BodyPartExamined") for ds in headers)
    assert len({ds.BodyPartExamined for ds in headers if ds.get("BodyPartExamined")}) >= 6
    assert any("VOILUTSequence" in ds for ds in headers) and any("WindowCenter" in ds for ds in headers)
    assert any(float(ds.get("RescaleIntercept", 0)) != 0 or float(ds.get("RescaleSlope", 1)) != 1 for ds in headers)
    assert {ds.Modality for ds in headers} >= {"CR", "DX"}
    assert {ds.PixelRepresentation for ds in headers} == {0, 1}
    views = {export.files[p.relative_to(export.root).as_posix()]["view"] for p in export.radiographs}
    assert {"AP", "PA", "LAT"} <= views
    assert {ds.ViewPosition for ds in headers if "ViewPosition" in ds} & {"LL", "RL", "LAT", "LATERAL"}
    assert any("ImagerPixelSpacing" in ds for ds in headers) and any("PixelSpacing" in ds for ds in headers)
    assert len({ds.get("Manufacturer") for ds in headers}) >= 4
    assert any("Laterality" in ds or "ImageLaterality" in ds for ds in headers)


def test_phi_marker_is_in_every_identifying_string(export: SynthSummary) -> None:
    phi = export.phi
    assert phi["strings"] and all(MARKER in s for s in phi["strings"])
    assert len(phi["uids"]) > 50 and len(phi["dates"]) > 20
    checked = 0
    for path in export.radiographs[:10] + export.paths_of("dicomdir"):
        ds = _read(path)
        for elem in ds.iterall():
            if elem.VR in ("PN", "LO", "SH", "ST", "LT", "UT") and elem.keyword not in NOT_PHI:
                if elem.tag.is_private_creator:
                    continue
                values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
                for value in values:
                    if str(value).strip():
                        assert MARKER in str(value), f"{elem.keyword or elem.tag} carries no marker"
                        checked += 1
    assert checked > 200
    assert any(part.startswith(MARKER) for rel in export.files for part in rel.split("/")[:1])
    in_headers = {str(v) for p in export.radiographs[:5] for v in (_read(p).PatientID, _read(p).StudyInstanceUID)}
    assert in_headers <= set(export.phi_strings)


def test_masks_align_with_images(export: SynthSummary) -> None:
    with open(export.root / "masks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and set(rows[0]) == {"image", "mask", "patient", "structure"}
    structures = {row["structure"] for row in rows}
    assert {"lungs", "heart", "bones"} <= structures
    per_image: dict[str, dict[str, np.ndarray]] = {}
    for row in rows:
        ds = _read(export.root / row["image"])
        mask = cv2.imread(str(export.root / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (ds.Rows, ds.Columns)
        assert set(np.unique(mask)) == {0, 255}
        assert row["patient"] == ds.PatientID
        assert row["structure"] in MASK_STRUCTURES[export.files[row["image"]]["body_part"]]
        per_image.setdefault(row["image"], {})[row["structure"]] = mask > 0
    for image, masks in per_image.items():
        ds = _read(export.root / image)
        pixels = ds.pixel_array.astype(np.float64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = pixels.max() - pixels
        if "lungs" in masks:  # air in the lungs attenuates less than the heart
            assert pixels[masks["lungs"]].mean() < pixels[masks["heart"]].mean()
            assert not (masks["lungs"] & masks["heart"]).any()
        if "bones" in masks:
            assert pixels[masks["bones"]].mean() > pixels[~masks["bones"]].mean()


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    kwargs = {"seed": 11, "hostile": 0.3, "masks": True, "min_size": 32, "max_size": 64, "progress": False}
    first = generate(tmp_path / "a", 24, **kwargs)
    second = generate(tmp_path / "b", 24, workers=2, **kwargs)
    other = generate(tmp_path / "c", 24, **{**kwargs, "seed": 12})
    assert first.files == second.files
    assert checksum(first.root) == checksum(second.root)
    assert checksum(first.root) != checksum(other.root)
    uids = {info["sop_instance_uid"] for info in first.files.values() if "sop_instance_uid" in info}
    assert uids.isdisjoint(info.get("sop_instance_uid") for info in other.files.values())


def test_rerun_overwrite_and_foreign_folders(tmp_path: Path) -> None:
    kwargs = {"seed": 1, "min_size": 32, "max_size": 48, "progress": False}
    out = tmp_path / "x"
    generate(out, 6, **kwargs)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = generate(out, 6, **kwargs)  # same arguments: already done
    assert again.n_files == 6 and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    with pytest.raises(ConfigError, match="--overwrite"):
        generate(out, 7, **kwargs)
    assert generate(out, 7, overwrite=True, **kwargs).n_files == 7
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        generate(foreign, 3, overwrite=True, **kwargs)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "positive"),
        ({"n": 5, "hostile": 0.5}, "at least 11"),
        ({"n": 5, "min_size": 100, "max_size": 50}, "min_size"),
        ({"n": 5, "syntaxes": ["JPEGBaseline"]}, "unknown transfer syntax"),
        ({"n": 5, "body_parts": ["elbw"]}, "unknown body part"),
        ({"n": 5, "bits_stored": 20}, "bits_stored"),
        ({"n": 5, "phi_marker": "a b"}, "phi_marker"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", [8, 16])
def test_extreme_bit_depths_decode(tmp_path: Path, bits: int) -> None:
    summary = generate(tmp_path / "x", 30, seed=bits, bits_stored=bits, min_size=32, max_size=48, progress=False)
    for path in summary.radiographs:
        ds = _read(path)
        pixels = ds.pixel_array.astype(np.int64)
        assert ds.BitsStored == bits and pixels.shape == (ds.Rows, ds.Columns)
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if ds.PixelRepresentation else (0, 2**bits)
        assert low <= pixels.min() and pixels.max() < high


def test_forced_shape_depth_and_syntax_for_benchmarks(tmp_path: Path) -> None:
    summary = generate(
        tmp_path / "bench",
        2,
        shape=(2500, 2000),
        bits_stored=12,
        syntaxes=["ExplicitVRLittleEndian"],
        body_parts=["chest"],
        progress=False,
    )
    for path in summary.radiographs:
        ds = _read(path)
        assert (ds.Rows, ds.Columns, ds.BitsStored) == (2500, 2000, 12)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.BodyPartExamined.upper() in ("CHEST", "THORAX", "CHEST_PA", "LUNG") or not ds.BodyPartExamined
        assert path.stat().st_size > 2500 * 2000 * 2


def test_phantoms_differ_by_part_and_show_age() -> None:
    images = {}
    for part in BODY_PARTS:
        image, masks = make_radiograph(part, 40, "F", 96, np.random.default_rng(0))
        assert image.dtype == np.uint16 and max(image.shape) == 96 and int(image.max()) < 4096
        assert set(masks) == set(MASK_STRUCTURES.get(part, ()))
        images[part] = cv2.resize(image.astype(np.float32), (64, 64))
    # Every pair of body parts looks clearly different (same seed, same age, same sex).
    for a in BODY_PARTS:
        for b in BODY_PARTS:
            if a < b:
                corr = np.corrcoef(images[a].ravel(), images[b].ravel())[0, 1]
                assert corr < 0.9, (a, b, corr)
    # Same generator state gives the same pixels.
    again, _ = make_radiograph("hand", 40, "F", 96, np.random.default_rng(0))
    first, _ = make_radiograph("hand", 40, "F", 96, np.random.default_rng(0))
    assert np.array_equal(again, first)
    # A child's hand: smaller bones in a field of view that is not much smaller, and fewer carpal bones.
    child = make_radiograph("hand", 3, "M", 128, np.random.default_rng(1), collimate=False)[1]["bones"]
    adult = make_radiograph("hand", 30, "M", 128, np.random.default_rng(1), collimate=False)[1]["bones"]
    assert child.mean() < 0.7 * adult.mean()
    # Lateral projections exist for some parts and look unlike the frontal ones.
    for part in ("chest", "knee", "lspine", "skull"):
        assert VIEWS[part] == ("PA", "AP", "LAT")
        lateral = make_radiograph(part, 40, "F", 96, np.random.default_rng(0), view="LAT")[0]
        small = cv2.resize(lateral.astype(np.float32), (64, 64))
        assert np.corrcoef(small.ravel(), images[part].ravel())[0, 1] < 0.9, part
    with pytest.raises(ValueError, match="no lateral view"):
        make_radiograph("hand", 3, "M", 64, np.random.default_rng(0), view="LAT")
    with pytest.raises(ValueError, match="unknown body part"):
        make_radiograph("tail", 3, "M", 64, np.random.default_rng(0))


def test_the_phantoms_draw_body_parts_of_the_label_vocabulary(export: SynthSummary) -> None:
    # The drawable parts are labels.BODY_PARTS entries, in its order; every drawn image's truth names one.
    assert tuple(p for p in labels.BODY_PARTS if p in BODY_PARTS) == BODY_PARTS
    assert labels.UNKNOWN not in BODY_PARTS
    drawn = {truth["body_part"] for truth in export.files.values() if "body_part" in truth}
    assert drawn and drawn <= set(BODY_PARTS)
    # The label parser reads every BodyPartExamined variant written back as the part that was drawn.
    tagged = [(p, export.files[p.relative_to(export.root).as_posix()]) for p in export.radiographs]
    pairs = {
        (labels.body_part_from_text(_read(p).BodyPartExamined), info["body_part"])
        for p, info in tagged
        if info["body_part_header"] == "tag"
    }
    assert len(pairs) >= 4 and all(parsed == part for parsed, part in pairs)
    # A table naming a part outside the vocabulary, or one without a phantom, is refused (as at import).
    check_body_parts("views", {"chest": 1, "knee": 2})
    with pytest.raises(ValueError, match=r"synth tags: thorax not in the body-part vocabulary"):
        check_body_parts("tags", ["chest", "thorax"])
    with pytest.raises(ValueError, match=r"synth weights: no phantom for elbow, no entry for none"):
        check_body_parts("weights", [*BODY_PARTS, "elbow"])
    with pytest.raises(ValueError, match=r"no phantom for none, no entry for foot"):
        check_body_parts("weights", BODY_PARTS[:-1], complete=True)


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0
    assert "hostile" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(tmp_path / "o"), "--n", "-3"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err
    out = tmp_path / "cli"
    args = ["synth", str(out), "--n", "14", "--seed", "2", "--hostile", "0.5", "--min-size", "32", "--max-size", "40"]
    assert main([*args, "--syntaxes", "RLELossless,ExplicitVRLittleEndian", "--body-parts", "knee,foot"]) == 0
    summary = SynthSummary.load(out)
    assert summary.n_files == 14 and summary.counts["radiograph"] == 14 - len(HOSTILE_KINDS)
    assert {info["body_part"] for info in summary.files.values() if "body_part" in info} <= {"knee", "foot"}
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("x")
    assert main(["synth", str(tmp_path / "full"), "--n", "3"]) == 2
    assert "not empty" in capsys.readouterr().err
