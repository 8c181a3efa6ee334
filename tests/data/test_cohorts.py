"""Cohorts: every layout loads (real public data and the synthetic generator's masks), errors are clear."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import nibabel
import nrrd
import numpy as np
import pytest
import torch

from radpretrain import intensity
from radpretrain.data import letterbox
from radpretrain.data.cohorts import load_cohort
from radpretrain.data.dataset import CohortDataset
from radpretrain.data.readers import read_case
from radpretrain.errors import CohortError

#: Real public samples; in CI at ../shared/data relative to the repo root.
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _write_table(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_lungseg_pairs_load_with_8bit_images_in_their_robust_window_as_shards_do() -> None:
    cohort = load_cohort(SHARED_DATA / "lungseg-2d")
    assert (cohort.kind, cohort.spatial_dims, cohort.layout) == ("seg2d", 2, "image/mask pairs")
    assert [(c.id, c.patient, c.image.name, c.target.name) for c in cohort.cases] == [
        (n, n, f"{n}.jpg", f"{n}-mask.png") for n in "1234"
    ]
    native = CohortDataset(cohort, cohort.cases[:1], size=512)[0]
    jpeg = cv2.imread(str(SHARED_DATA / "lungseg-2d" / "1.jpg"), cv2.IMREAD_GRAYSCALE)
    # 8-bit display images get the robust 0.5-99.5 % range like every image without a DICOM window
    # (not /255): the window the sharder writes for the same file.
    low, high = np.percentile(jpeg, (0.5, 99.5))
    assert (low, high) != (0, 255)  # the rule matters for this image
    expected = np.clip((jpeg.astype(np.float32) - low) / (high - low), 0, 1)
    torch.testing.assert_close(native["image"][0], torch.from_numpy(intensity.normalize(expected)))
    assert native["valid"].shape == (1, 512, 512) and bool(native["valid"].all())
    mask = cv2.imread(str(SHARED_DATA / "lungseg-2d" / "1-mask.png"), cv2.IMREAD_GRAYSCALE)
    assert torch.equal(native["target"][0], torch.from_numpy((mask > 0).astype(np.float32)))

    small = CohortDataset(cohort, size=64)
    assert len(small) == 4
    for item in small:
        assert item["image"].shape == item["target"].shape == (1, 64, 64)
        assert item["image"].dtype == item["target"].dtype == torch.float32
        assert set(item["target"].unique().tolist()) == {0.0, 1.0}
        assert 0.1 < item["target"].mean() < 0.6  # two lungs cover a good part of a chest film


def test_volume_pairs_load_in_both_naming_conventions_with_a_robust_window() -> None:
    cohort = load_cohort(SHARED_DATA / "volumes-3d")
    assert (cohort.kind, cohort.spatial_dims) == ("seg3d", 3)
    found = {c.id: (c.image.name, c.target.name) for c in cohort.cases}
    assert found == {
        "brain1": ("brain1_image.nrrd", "brain1_label.nrrd"),
        "brain2": ("brain2_image.nrrd", "brain2_label.nrrd"),
        "breast1": ("breast1_image.nrrd", "breast1_label.nrrd"),
        "prostate_phantom_subvolume": ("prostate_phantom_subvolume.nrrd", "prostate_phantom_subvolume-label.nrrd"),
    }
    case = next(c for c in cohort.cases if c.id == "prostate_phantom_subvolume")
    image01, mask, _ = read_case(case, 3, (13, 67, 82))  # native size: no resampling
    labels, _ = nrrd.read(str(case.target), index_order="C")
    assert np.array_equal(mask, labels != 0)  # labels 1, 7, 8, 9 are all foreground
    pixels, _ = nrrd.read(str(case.image), index_order="C")
    low, high = np.percentile(pixels.astype(np.float32), (0.5, 99.5))
    np.testing.assert_allclose(image01, np.clip((pixels - low) / (high - low), 0, 1), atol=1e-6)

    dataset = CohortDataset(cohort, size=16)
    for case, item in zip(dataset.cases, dataset, strict=True):
        assert item["image"].shape == item["target"].shape == item["valid"].shape == (1, 16, 16, 16)
        pixels, _ = nrrd.read(str(case.image), index_order="C")
        # The window is the decoded volume's robust range (not the resized one's), the plane keeps its
        # aspect ratio (depth takes its size on its own), and the padding is 0 in [0, 1].
        low, high = np.percentile(pixels, (0.5, 99.5))
        shape = letterbox.fit_shape(pixels.shape, (16, 16, 16))
        valid = item["valid"][0].numpy()
        assert valid.sum() == np.prod(shape) and valid[letterbox.box(shape, (16, 16, 16))].all()
        image01 = item["image"][0].numpy() * intensity.STD + intensity.MEAN
        expected = np.clip((letterbox.resize(pixels.astype(np.float32), shape) - low) / (high - low), 0, 1)
        np.testing.assert_allclose(image01[valid].reshape(shape), expected, atol=1e-5)
        assert np.all(image01[~valid] == 0.0) and not item["target"][0].numpy()[~valid].any()
        if case.id == "prostate_phantom_subvolume":  # 13 x 67 x 82: rows 67 * 16 / 82 -> 13, centred
            assert shape == (16, 13, 16) and valid[:, 1:14].all() and not valid[:, [0, 14, 15]].any()


def test_synthetic_masks_table_needs_one_structure_and_reads_dicom(tmp_path: Path) -> None:
    from radpretrain.synth.archive import generate

    out = tmp_path / "synth"
    generate(out, 6, seed=3, masks=True, min_size=64, max_size=80, body_parts=["chest"], progress=False)
    with pytest.raises(CohortError, match=r"several structures \(heart, lungs\); choose one with structure="):
        load_cohort(out)
    with pytest.raises(CohortError, match="Did you mean 'lungs'"):
        load_cohort(out, structure="lung")
    cohort = load_cohort(out / "masks.csv", structure="lungs", kind="seg2d")
    with (out / "masks.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["structure"] == "lungs"]
    assert [(c.image, c.target, c.patient) for c in cohort.cases] == [
        (out / r["image"], out / r["mask"], r["patient"]) for r in rows
    ]
    assert len(cohort.patients()) < len(cohort.cases)  # several images per patient: split by patient
    item = CohortDataset(cohort, size=32)[0]
    assert item["image"].shape == item["target"].shape == (1, 32, 32)
    assert 0.05 < item["target"].mean() < 0.7


def test_a_folder_table_is_found_by_its_image_column_whatever_its_name(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "a-seg.png"), np.zeros((8, 8), np.uint8))
    _write_table(tmp_path / "notes.csv", [{"case": "a", "comment": "not a cohort table: no image column"}])
    _write_table(tmp_path / "masks.csv", [{"image": "a.png", "mask": "a-seg.png", "patient": "p1"}])
    assert load_cohort(tmp_path).layout == "table masks.csv"
    (tmp_path / "masks.csv").rename(tmp_path / "my cohort.csv")
    cohort = load_cohort(tmp_path)
    assert (cohort.layout, [c.patient for c in cohort.cases]) == ("table my cohort.csv", ["p1"])
    # No table name is special: `masks.csv` beside another table is one of several, as any name would be.
    _write_table(tmp_path / "masks.csv", [{"image": "a.png", "mask": "a-seg.png"}])
    with pytest.raises(CohortError, match=r"several cohort tables \(masks\.csv, my cohort\.csv\)"):
        load_cohort(tmp_path)


def test_csv_labels_become_class_indices_and_16bit_png_gets_the_robust_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for n, label in enumerate(["pneumonia", "normal", "normal", "effusion", ""]):
        name = f"img{n}.png"
        cv2.imwrite(str(tmp_path / name), (rng.random((40, 48)) * 4000 + 1000).astype(np.uint16))
        rows.append({"image": name, "finding": label, "patient": f"p{n // 2}"})
    table = _write_table(tmp_path / "labels.csv", rows)
    cohort = load_cohort(tmp_path, label_column="finding")
    assert (cohort.kind, cohort.classes, cohort.layout) == (
        "cls2d",
        ["effusion", "normal", "pneumonia"],
        "table labels.csv",
    )
    assert [c.target for c in cohort.cases] == [2, 1, 1, 0, None]
    assert [c.patient for c in cohort.cases] == ["p0", "p0", "p1", "p1", "p2"]
    assert cohort.cases_of(["p1"]) == cohort.cases[2:4]

    with pytest.raises(CohortError, match="case img4 has no label"):
        CohortDataset(cohort, size=32)
    dataset = CohortDataset(cohort, cohort.cases[:4], size=(32, 40))
    item = dataset[0]
    assert item["image"].shape == (1, 32, 40) and item["target"].dtype == torch.long and item["target"] == 2
    # Letterboxed, not stretched: 40 x 48 fits (32, 40) as 32 x 38 (area-averaged), one padding column each
    # side; the window is the robust range of the decoded 16-bit image.
    image01 = (item["image"][0] * intensity.STD + intensity.MEAN).numpy()
    pixels = cv2.imread(str(tmp_path / "img0.png"), cv2.IMREAD_UNCHANGED)
    low, high = np.percentile(pixels, (0.5, 99.5))
    fitted = cv2.resize(pixels.astype(np.float32), (38, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(image01[:, 1:39], np.clip((fitted - low) / (high - low), 0, 1), atol=1e-5)
    assert np.all(image01[:, [0, 39]] == 0.0)
    assert item["valid"][0, :, 1:39].all() and not item["valid"][0, :, [0, 39]].any()

    _write_table(
        table, [{"image": r["image"], "finding": v} for r, v in zip(rows, ["2", "1", "2", "1", "1"], strict=True)]
    )
    numeric = load_cohort(table, label_column="finding")
    assert numeric.classes == ["1", "2"] and [c.target for c in numeric.cases] == [1, 0, 1, 0, 0]
    assert [c.patient for c in numeric.cases] == [f"img{n}" for n in range(5)]  # no patient column: the stem
    _write_table(
        table, [{"image": r["image"], "finding": v} for r, v in zip(rows, ["0.5", "1", "2.25", "3", "4"], strict=True)]
    )
    regression = load_cohort(table, label_column="finding")
    assert regression.classes == [] and regression.cases[0].target == 0.5
    assert CohortDataset(regression, size=32)[2]["target"].dtype == torch.float32


def test_nifti_pairs_are_read_as_depth_height_width(tmp_path: Path) -> None:
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # NIfTI axes (i, j, k)
    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    labels[1, 2, 3] = 2
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "case7.nii.gz")
    nibabel.save(nibabel.Nifti1Image(labels, np.eye(4)), tmp_path / "case7_seg.nii.gz")
    cohort = load_cohort(tmp_path, kind="seg3d")
    assert [(c.id, c.image.name, c.target.name) for c in cohort.cases] == [
        ("case7", "case7.nii.gz", "case7_seg.nii.gz")
    ]
    _, mask, _ = read_case(cohort.cases[0], 3, (6, 5, 4))
    assert mask.shape == (6, 5, 4) and mask[3, 2, 1] == 1 and mask.sum() == 1


def _write_slice(path: Path, pixels: np.ndarray, z: float, number: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.4.{number}"
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, f"1.2.3.4.{number}"
    ds.SeriesInstanceUID, ds.Modality = "1.2.3.9", "MR"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 300, 400
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_a_dicom_series_folder_is_a_volume_ordered_along_the_slice_normal(tmp_path: Path) -> None:
    series = tmp_path / "knee"
    series.mkdir()
    # Files named against the anatomical order; InstanceNumber disagrees too: position must win.
    for n, z in enumerate([3.0, 1.0, 0.0, 2.0]):
        _write_slice(series / f"f{n}.dcm", np.full((6, 8), 100 * (z + 1)), z, number=10 - n)
    labels = np.zeros((4, 6, 8), dtype=np.uint8)
    labels[2] = 1
    nrrd.write(str(tmp_path / "knee_label.nrrd"), labels, index_order="C")
    cohort = load_cohort(tmp_path)
    assert (cohort.kind, [c.id for c in cohort.cases]) == ("seg3d", ["knee"])
    image01, mask, _ = read_case(cohort.cases[0], 3, (4, 6, 8))
    # The header window (centre 300, width 400) maps 100..400 to 0..0.75.
    np.testing.assert_allclose(image01[:, 0, 0], [0.0, 0.25, 0.5, 0.75])
    assert mask[2].all() and mask.sum() == 48


def test_multiframe_dicom_files_are_volumes_in_a_3d_cohort(tmp_path: Path) -> None:
    for n in range(2):
        _write_slice(tmp_path / f"vol{n}.dcm", np.full((3, 6, 8), 200 + 100 * n), 0.0, number=n + 1)
    table = _write_table(tmp_path / "cohort.csv", [{"image": f"vol{n}.dcm", "label": n} for n in range(2)])
    cohort = load_cohort(table, kind="cls3d")
    assert (cohort.kind, [c.target for c in cohort.cases]) == ("cls3d", [0, 1])
    image01, mask, _ = read_case(cohort.cases[1], 3, (3, 6, 8))
    assert mask is None and image01.shape == (3, 6, 8) and np.allclose(image01, 0.5)  # 300 in window 300/400
    flat = load_cohort(table)
    assert flat.kind == "cls2d"
    with pytest.raises(CohortError, match="case vol0: multi-frame DICOM in a 2D cohort"):
        CohortDataset(flat, size=8)


def test_class_folders_give_a_classification_cohort(tmp_path: Path) -> None:
    for label, count in (("normal", 2), ("fracture", 1)):
        (tmp_path / label).mkdir()
        for n in range(count):
            cv2.imwrite(str(tmp_path / label / f"{label}{n}.png"), np.full((20, 20), 50 * n, np.uint8))
    cohort = load_cohort(tmp_path)
    assert (cohort.kind, cohort.classes, cohort.layout) == ("cls2d", ["fracture", "normal"], "class folders")
    assert [(c.id, c.target) for c in cohort.cases] == [("fracture0", 0), ("normal0", 1), ("normal1", 1)]


def test_augmentation_moves_image_and_mask_together_and_repeats_with_the_seed(tmp_path: Path) -> None:
    mask = np.zeros((48, 48), np.uint8)
    cv2.circle(mask, (20, 26), 10, 255, -1)
    cv2.imwrite(str(tmp_path / "a.png"), mask)  # the image is its own mask: alignment is visible
    cv2.imwrite(str(tmp_path / "a-mask.png"), mask)
    cohort = load_cohort(tmp_path)
    plain = CohortDataset(cohort, size=48)[0]
    seen = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        dataset = CohortDataset(cohort, size=48, augment=True)
        seen.append([dataset[0] for _ in range(4)])
    moved = [item for item in seen[1] if not torch.equal(item["target"], plain["target"])]
    assert moved, "the random affine never moved the mask"
    for item in seen[0] + seen[1]:
        assert set(item["target"].unique().tolist()) <= {0.0, 1.0}
        bright = item["image"][0] > 0  # above mid-grey, i.e. inside the disc after gamma and noise
        target = item["target"][0] > 0.5
        assert (bright & target).sum() / (bright | target).sum() > 0.8
    for first, again in zip(seen[0], seen[2], strict=True):
        assert torch.equal(first["image"], again["image"]) and torch.equal(first["target"], again["target"])


def test_arrays_are_decoded_once_per_size_and_shared_by_datasets(tmp_path: Path) -> None:
    shutil.copytree(SHARED_DATA / "lungseg-2d", tmp_path / "lungs")
    cohort = load_cohort(tmp_path / "lungs")
    first = CohortDataset(cohort, cohort.cases[:2], size=32)
    for path in (tmp_path / "lungs").glob("*.*"):
        path.unlink()  # the files are gone: a second dataset of the same size must not need them
    second = CohortDataset(cohort, cohort.cases[:2], size=32)
    assert torch.equal(first[1]["image"], second[1]["image"])
    with pytest.raises(CohortError, match="case 3: its image cannot be decoded"):
        CohortDataset(cohort, cohort.cases[2:], size=32)


def test_broken_cohorts_give_one_clear_error_without_paths(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="does not exist"):
        load_cohort(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CohortError, match="folder is empty; expected one of: a CSV with columns image and mask"):
        load_cohort(empty)
    (empty / "notes.txt").write_text("nothing here")
    with pytest.raises(CohortError, match="no cohort layout fits this folder; expected one of"):
        load_cohort(empty)

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    cv2.imwrite(str(pairs / "7.png"), np.zeros((32, 32), np.uint8))
    cv2.imwrite(str(pairs / "7-mask.png"), np.zeros((30, 32), np.uint8))
    cohort = load_cohort(pairs)
    with pytest.raises(CohortError, match=r"case 7: mask shape \(30, 32\) differs from image shape \(32, 32\)") as info:
        CohortDataset(cohort, size=16)
    assert str(tmp_path) not in str(info.value)
    cv2.imwrite(str(pairs / "8-mask.png"), np.zeros((32, 32), np.uint8))
    with pytest.raises(CohortError, match="case 8: its mask has no image beside it"):
        load_cohort(pairs)
    (pairs / "8-mask.png").unlink()
    with pytest.raises(CohortError, match="size must be a positive integer or 2 of them"):
        CohortDataset(load_cohort(pairs), size=(8, 8, 8))

    table = _write_table(tmp_path / "t.csv", [{"image": "missing/9.png", "mask": "missing/9-mask.png"}])
    with pytest.raises(CohortError, match="case 9: its image file is missing") as info:
        load_cohort(table)
    assert "missing/" not in str(info.value)
    _write_table(table, [{"picture": "9.png", "label": 1}])
    with pytest.raises(CohortError, match=r"t.csv has no 'image' column \(columns: picture, label\)"):
        load_cohort(table)
    _write_table(table, [{"image": "7.png", "label": 1}])
    with pytest.raises(CohortError, match="has no 'mask' column"):
        load_cohort(table, kind="seg2d")
    with pytest.raises(CohortError, match="Did you mean 'seg2d'"):
        load_cohort(table, kind="seg2")
    with pytest.raises(CohortError, match=r"asked for a .cls3d. cohort but this table t\.csv holds a .cls2d. cohort"):
        load_cohort(table, kind="cls3d")
    _write_table(table, [{"image": "pairs/7.png", "label": 1}, {"image": "v.nrrd", "label": 0}])
    with pytest.raises(CohortError, match="mixes 2D images and 3D volumes"):
        load_cohort(table)
