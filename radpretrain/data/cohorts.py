"""Small labeled cohorts for finetuning: 2D images with masks or labels, 3D volumes with label volumes."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from radpretrain import intensity
from radpretrain.errors import CohortError, DicomError
from radpretrain.registry import did_you_mean
from radpretrain.shards.format import ROBUST_PERCENTILES

log = logging.getLogger(__name__)

KINDS = ("seg2d", "cls2d", "seg3d", "cls3d")
#: A DICOM UID (digits and dots, e.g. 1.2.826.0.1.3680043...) used as a file or folder name.
UID_NAME = re.compile(r"^[0-9]+(\.[0-9]+){3,}$")
#: Files read as 2D images (8-bit PNG/JPEG are already display-windowed; 16-bit PNG and DICOM are not).
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
#: Files read as 3D volumes; a folder of DICOM files is also a volume (one series).
VOLUME_EXTS = (".nrrd", ".nhdr", ".nii", ".nii.gz")
#: Name endings that mark a mask or label volume (`N-mask.png`, `X_label.nrrd`, `X_seg.nii.gz` ...).
LABEL_SUFFIXES = ("-mask", "_mask", "-label", "_label", "-seg", "_seg", "-labels", "_labels")
#: Name endings of the image beside its label (`X_image.nrrd` + `X_label.nrrd`).
IMAGE_SUFFIXES = ("-image", "_image")
#: The table `radpretrain synth --masks` writes: image, mask, patient, structure.
SYNTH_MASKS = "masks.csv"
#: Robust intensity range for images without a display window (as the shards' intensity_low/high).

LAYOUTS = (
    "a CSV with columns image and mask, or image and a label column (optional patient, structure)",
    "N.png/N.jpg + N-mask.png pairs",
    "volume pairs X_image.nrrd + X_label.nrrd, X.nrrd + X-label.nrrd, X.nii.gz + X_seg.nii.gz / X_label.nii.gz "
    "(a DICOM series folder X/ + X_label.nrrd also works)",
    "one subfolder of images per class (classification)",
)


@dataclass(frozen=True)
class Case:
    """One labeled image or volume.

    `target` is the mask or label volume file (segmentation), the class index into `Cohort.classes` or a
    float regression target (classification), or None when the row had no label.
    """

    id: str
    patient: str
    image: Path
    target: Path | int | float | None


@dataclass
class Cohort:
    """The cases of a labeled cohort and what they are.

    Attributes:
        cases: Every case, in file order.
        kind: "seg2d", "cls2d", "seg3d" or "cls3d".
        classes: Class names by index (classification with named or integer labels), else empty.
        layout: Which layout was found (for logs and reports).
    """

    cases: list[Case]
    kind: str
    classes: list[str] = field(default_factory=list)
    layout: str = ""
    # Decoded, resized, windowed arrays by (case, size): shared by every dataset over this cohort.
    _arrays: dict[tuple[Case, tuple[int, ...]], tuple[np.ndarray, np.ndarray | None]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            _unknown_kind(self.kind)

    @property
    def spatial_dims(self) -> int:
        return 2 if self.kind.endswith("2d") else 3

    @property
    def task(self) -> str:
        """The task, "seg" or "cls"."""
        return self.kind[:3]

    def patients(self) -> list[str]:
        """The patient ids, sorted (split and subsample by these, never by case)."""
        return sorted({case.patient for case in self.cases})

    def cases_of(self, patients: Iterable[str]) -> list[Case]:
        """The cases of these patients, in cohort order."""
        wanted = set(patients)
        return [case for case in self.cases if case.patient in wanted]


def load_cohort(
    path: str | Path, *, kind: str | None = None, label_column: str = "label", structure: str | None = None
) -> Cohort:
    """Find a cohort's layout and list its cases; every file named is checked to exist.

    Layouts (the first that fits wins): a CSV file, or a folder holding `masks.csv` (the synthetic
    generator's) or one CSV with an `image` column; image/mask pairs by name (`N.jpg` + `N-mask.png`,
    `X_image.nrrd` + `X_label.nrrd`, `X.nrrd` + `X-label.nrrd`, `X.nii.gz` + `X_seg.nii.gz`, a DICOM
    series folder `X/` + `X_label.nii.gz`); one subfolder of images or volumes per class. CSV paths are
    relative to the CSV; the patient id comes from a `patient` column, else the image's file stem.

    Masks are binary: every non-zero value is foreground (in JPEG masks, which smear edges, values above
    127). Classification labels become class indices into `Cohort.classes` (sorted numerically when all
    are integers, else alphabetically), or floats when they are numbers that are not all integers.

    Args:
        path: A cohort folder or CSV file.
        kind: "seg2d", "cls2d", "seg3d" or "cls3d" to insist on (or to choose the labels when a CSV has
            both a mask and a label column); default: what the layout holds.
        label_column: The CSV column holding classification labels.
        structure: With a `structure` column (synthetic masks: lungs, heart, bones), the structure whose
            masks are the targets; required when the table holds several.

    Raises:
        CohortError: no layout fits (the message lists the expected ones), no cases, a missing file,
            images of mixed 2D/3D types, or a `kind` the files do not fit.
    """
    if kind is not None and kind not in KINDS:
        _unknown_kind(kind)
    root = Path(path)
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise CohortError("a cohort is a folder or a .csv file; give the folder that holds the images")
        cohort = _from_table(root, kind, label_column, structure)
    elif root.is_dir():
        cohort = _from_folder(root, kind, label_column, structure)
    else:
        raise CohortError("the cohort path does not exist; give a cohort folder or CSV file")
    if not cohort.cases:
        raise CohortError(f"the cohort holds no cases ({cohort.layout}); add images with their masks or labels")
    if kind is not None and cohort.kind != kind:
        raise CohortError(f"asked for a '{kind}' cohort but this {cohort.layout} holds a '{cohort.kind}' cohort")
    _check_files(cohort)
    return cohort


def _unknown_kind(kind: str) -> None:
    raise CohortError(f"Unknown cohort kind '{kind}'.{did_you_mean(kind, KINDS)} Known: {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------------------------
# Layouts.
# --------------------------------------------------------------------------------------------------------------


def _from_folder(root: Path, kind: str | None, label_column: str, structure: str | None) -> Cohort:
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    if (root / SYNTH_MASKS).is_file():
        return _from_table(root / SYNTH_MASKS, kind, label_column, structure)
    tables = [p for p in entries if p.suffix.lower() == ".csv" and p.is_file() and "image" in _columns(p)]
    if len(tables) > 1:
        names = ", ".join(p.name for p in tables)
        raise CohortError(f"the cohort folder holds several cohort tables ({names}); give the one to use as the path")
    if tables:
        return _from_table(tables[0], kind, label_column, structure)
    pairs = _from_pairs(entries, kind)
    if pairs is not None:
        return pairs
    classes = _from_class_folders(entries, kind)
    if classes is not None:
        return classes
    if not entries:
        raise CohortError("the cohort folder is empty; expected one of: " + "; ".join(LAYOUTS))
    raise CohortError("no cohort layout fits this folder; expected one of: " + "; ".join(LAYOUTS))


def _table_text(table: Path) -> str:
    """A cohort table's text (UTF-8, with or without the byte-order mark spreadsheets write)."""
    try:
        return table.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CohortError(
            f"{table.name} is not UTF-8 text (UTF-16, or not a CSV at all?); save it as 'CSV UTF-8 (comma delimited)'"
        ) from None


def _columns(table: Path) -> list[str]:
    return [name.strip() for name in next(csv.reader(io.StringIO(_table_text(table))), [])]


def _from_table(table: Path, kind: str | None, label_column: str, structure: str | None) -> Cohort:
    reader = csv.DictReader(io.StringIO(_table_text(table), newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    # Cells beyond the header (key None) are ignored; missing cells read as empty.
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)} for row in reader]
    shown = ", ".join(columns) or "none"
    if "image" not in columns:
        hint = "; its columns are separated by ';', save it with commas" if ";" in shown else ""
        raise CohortError(
            f"{table.name} has no 'image' column (columns: {shown}); a cohort CSV needs image and mask or label{hint}"
        )
    task = kind[:3] if kind else ("seg" if "mask" in columns else "cls")
    target_column = "mask" if task == "seg" else label_column
    if target_column not in columns:
        hint = " (set label_column to the column that holds the labels)" if task == "cls" else ""
        raise CohortError(f"{table.name} has no '{target_column}' column (columns: {shown}){hint}")
    line = {id(row): n for n, row in enumerate(rows, start=2)}  # the spreadsheet row, header = row 1
    if "structure" in columns and task == "seg":
        rows = _one_structure(rows, structure, table.name)
    layout = f"table {table.name}"

    numbers = [line[id(row)] for row in rows]
    images = [_resolve(table.parent, row["image"], n) for n, row in zip(numbers, rows, strict=True)]
    dims = _dims_of(images, layout, kind)
    ids = _unique_ids(_case_names(images, [f"row{n}" for n in numbers]))
    patients = [row.get("patient") or case_id for row, case_id in zip(rows, ids, strict=True)]
    if task == "seg":
        targets: list[Path | int | float | None] = [
            _resolve(table.parent, row["mask"], n) if row["mask"] else None
            for n, row in zip(numbers, rows, strict=True)
        ]
        classes: list[str] = []
    else:
        targets, classes = _encode_labels([row[target_column] for row in rows])
    cases = [Case(*fields) for fields in zip(ids, patients, images, targets, strict=True)]
    return Cohort(cases, f"{task}{dims}d", classes, layout)


def _one_structure(rows: list[dict[str, str]], structure: str | None, name: str) -> list[dict[str, str]]:
    found = sorted({row["structure"] for row in rows if row["structure"]})
    if structure is None:
        if len(found) > 1:
            raise CohortError(
                f"{name} holds masks of several structures ({', '.join(found)}); choose one with "
                f"structure=NAME (e.g. structure={found[0]})"
            )
        return rows
    if structure not in found:
        raise CohortError(
            f"{name} has no masks of structure '{structure}'.{did_you_mean(structure, found)} "
            f"Known: {', '.join(found) or 'none'}"
        )
    return [row for row in rows if row["structure"] == structure]


def _resolve(base: Path, value: str, row: int) -> Path:
    if not value:
        raise CohortError(f"row {row} of the cohort table has an empty image or mask cell; fill it or drop the row")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _encode_labels(values: list[str]) -> tuple[list[Path | int | float | None], list[str]]:
    present = [v for v in values if v]
    numbers = [_number(v) for v in present]
    if present and all(n is not None for n in numbers):
        if not all(float(n).is_integer() for n in numbers if n is not None):
            return [float(v) if v else None for v in values], []
        ordered = sorted({int(float(v)) for v in present})
        classes = [str(c) for c in ordered]
        index = {c: i for i, c in enumerate(ordered)}
        return [index[int(float(v))] if v else None for v in values], classes
    classes = sorted(set(present))
    by_name = {c: i for i, c in enumerate(classes)}
    return [by_name[v] if v else None for v in values], classes


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _from_pairs(entries: list[Path], kind: str | None) -> Cohort | None:
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    # Files first: a folder is an image (a DICOM series) only where no image file has its name.
    for entry in sorted(entries, key=lambda p: not p.is_file()):
        ext = _ext(entry)
        if entry.is_file() and ext not in IMAGE_EXTS + VOLUME_EXTS:
            continue
        base, is_label = _role(entry.name[: len(entry.name) - len(ext)] if ext else entry.name)
        if is_label and entry.is_file():
            if base in labels:
                raise CohortError(f"case {base} has two masks; keep one")
            labels[base] = entry
        elif entry.is_file():
            if base in images:
                raise CohortError(f"case {base} has two images; keep one")
            images[base] = entry
        elif entry.is_dir():
            images.setdefault(base, entry)
    if not labels:
        return None
    missing = sorted(set(labels) - set(images))
    if missing:
        raise CohortError(
            f"case {missing[0]}: its mask has no image beside it (expected e.g. {missing[0]}.png or .nrrd)"
        )
    unlabeled = sum(1 for base, p in images.items() if base not in labels and p.is_file())
    if unlabeled:
        log.info("%d images without a mask were left out of the cohort", unlabeled)
    order = sorted(labels)
    cases = [Case(base, base, images[base], labels[base]) for base in order]
    dims = _dims_of([c.image for c in cases], "image/mask pairs", kind)
    return Cohort(cases, f"seg{dims}d", [], "image/mask pairs")


def _role(stem: str) -> tuple[str, bool]:
    lowered = stem.lower()
    for suffix in LABEL_SUFFIXES:
        if lowered.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)], True
    for suffix in IMAGE_SUFFIXES:
        if lowered.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)], False
    return stem, False


def _from_class_folders(entries: list[Path], kind: str | None) -> Cohort | None:
    folders = [p for p in entries if p.is_dir()]
    members = {
        folder.name: sorted(p for p in folder.iterdir() if p.is_file() and _ext(p) in IMAGE_EXTS + VOLUME_EXTS)
        for folder in folders
    }
    members = {name: files for name, files in members.items() if files}
    if not members:
        return None
    classes = sorted(members)
    images = [p for name in classes for p in members[name]]
    targets: list[Path | int | float | None] = [i for i, name in enumerate(classes) for _ in members[name]]
    places = [f"{name}-{k}" for name in classes for k in range(1, len(members[name]) + 1)]
    ids = _unique_ids(_case_names(images, places))
    dims = _dims_of(images, "class folders", kind)
    cases = [Case(i, i, image, target) for i, image, target in zip(ids, images, targets, strict=True)]
    return Cohort(cases, f"cls{dims}d", classes, "class folders")


def _ext(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _stem(path: Path) -> str:
    ext = _ext(path)
    return path.name[: len(path.name) - len(ext)] if ext else path.name


def _case_names(images: Sequence[Path], places: Sequence[str]) -> list[str]:
    """File stems name the cases, except a stem that is a DICOM UID (PACS exports name files so): that case is
    named by its place (`row12` of the table, `fracture-3` of a class folder), so no UID reaches a message."""
    stems = [_stem(image) for image in images]
    return [place if UID_NAME.match(stem) else stem for stem, place in zip(stems, places, strict=True)]


def _unique_ids(stems: list[str]) -> list[str]:
    """File stems as case ids; a repeated stem gets -2, -3 ... (e.g. the same name in two folders)."""
    ids: list[str] = []
    taken: set[str] = set()
    for stem in stems:
        case_id, count = stem, 1
        while case_id in taken:
            count += 1
            case_id = f"{stem}-{count}"
        taken.add(case_id)
        ids.append(case_id)
    return ids


def _dims_of(images: Sequence[Path], layout: str, kind: str | None = None) -> int:
    # A folder is a DICOM series; a DICOM file is a 2D image unless a 3D kind asks for multi-frame volumes.
    dicom_dims = 3 if kind is not None and kind.endswith("3d") else 2
    dims = {
        3
        if image.is_dir() or _ext(image) in VOLUME_EXTS
        else 2
        if _ext(image) in (".png", ".jpg", ".jpeg")
        else dicom_dims
        for image in images
    }
    if len(dims) > 1:
        raise CohortError(f"the {layout} mixes 2D images and 3D volumes; keep one kind per cohort")
    return dims.pop() if dims else 2


def _check_files(cohort: Cohort) -> None:
    for case in cohort.cases:
        if not case.image.exists():
            raise CohortError(f"case {case.id}: its image file is missing")
        if isinstance(case.target, Path) and not case.target.is_file():
            raise CohortError(f"case {case.id}: its mask file is missing")


# --------------------------------------------------------------------------------------------------------------
# Reading: the shards' intensity convention (window to [0, 1], then normalise).
# --------------------------------------------------------------------------------------------------------------


def read_case(case: Case, spatial_dims: int, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one case, check its mask fits, resize to `size` and window to [0, 1].

    Returns:
        The float32 image in [0, 1] of shape `size`, and the uint8 {0, 1} mask of the same shape (None
        for classification). Windowing: the DICOM header window, else 8-bit PNG/JPEG divided by 255 (they
        are display images already), else the robust 0.5-99.5 percentile range of the resized image.
    """
    pixels, window = _read_pixels(case, spatial_dims)
    mask = _read_mask(case, spatial_dims) if isinstance(case.target, Path) else None
    if mask is not None and mask.shape != pixels.shape:
        raise CohortError(
            f"case {case.id}: mask shape {mask.shape} differs from image shape {pixels.shape}; masks must "
            "match their image pixel for pixel"
        )
    image = _resize(pixels.astype(np.float32), size)
    if window is None:
        # Not apply_window: it floors the width at one stored unit, too wide for float volumes in [0, 1].
        low, high = np.percentile(image, ROBUST_PERCENTILES)
        image01 = np.clip((image - low) / max(float(high - low), 1e-6), 0.0, 1.0).astype(np.float32)
    else:
        image01 = intensity.apply_window(image, *window)
    resized_mask = None if mask is None else (_resize(mask.astype(np.float32), size) >= 0.5).astype(np.uint8)
    return image01, resized_mask


def _read_pixels(case: Case, spatial_dims: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    path, ext = case.image, _ext(case.image)
    if path.is_dir():
        return _read_series(case)
    if ext in (".png", ".jpg", ".jpeg"):
        pixels = _read_bitmap(path, case.id, "image")
        return pixels, ((127.5, 255.0) if pixels.dtype == np.uint8 else None)
    if ext in (".nrrd", ".nhdr", ".nii", ".nii.gz"):
        return _read_volume(path, case.id, "image"), None
    return _read_dicom_file(case, spatial_dims)


def _read_mask(case: Case, spatial_dims: int) -> np.ndarray:
    assert isinstance(case.target, Path)
    ext = _ext(case.target)
    if spatial_dims == 2:
        if ext not in (".png", ".jpg", ".jpeg"):
            raise CohortError(f"case {case.id}: 2D masks must be PNG (or JPEG) images")
        mask = _read_bitmap(case.target, case.id, "mask")
        # JPEG smears edges: threshold at half range instead of taking every non-zero value.
        return mask > (127 if ext != ".png" else 0)
    if ext not in VOLUME_EXTS:
        raise CohortError(f"case {case.id}: label volumes must be NRRD or NIfTI files")
    labels = _read_volume(case.target, case.id, "mask")
    return labels > 0.5 if labels.dtype.kind == "f" else labels != 0


def _read_bitmap(path: Path, case_id: str, what: str) -> np.ndarray:
    import cv2

    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise CohortError(f"case {case_id}: its {what} cannot be decoded as PNG/JPEG")
    if pixels.ndim == 3:  # colour files of grey content; alpha is dropped
        code = cv2.COLOR_BGRA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        pixels = cv2.cvtColor(pixels, code)
    return pixels


def _read_volume(path: Path, case_id: str, what: str) -> np.ndarray:
    """(D, H, W): NRRD in C order (slowest axis first), NIfTI's (i, j, k) reversed to (k, j, i)."""
    try:
        if _ext(path) in (".nrrd", ".nhdr"):
            import nrrd

            data, _ = nrrd.read(str(path), index_order="C")
        else:
            import nibabel

            data = np.asanyarray(nibabel.load(str(path)).dataobj).T  # type: ignore[attr-defined]
    except Exception as exc:  # readers raise many types on damaged files; the case id is what helps
        raise CohortError(f"case {case_id}: its {what} volume cannot be read ({type(exc).__name__})") from None
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3:
        raise CohortError(f"case {case_id}: its {what} has {data.ndim} dimensions; volumes must be 3D (one channel)")
    return np.ascontiguousarray(data)


def _read_dicom_file(case: Case, spatial_dims: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    from radpretrain.shards.dicom import read_dicom, window_from_header

    try:
        ds, frames = read_dicom(case.image)
    except DicomError as exc:
        raise CohortError(f"case {case.id}: its DICOM image cannot be used ({exc})") from None
    if spatial_dims == 2 and frames.shape[0] != 1:
        raise CohortError(f"case {case.id}: multi-frame DICOM in a 2D cohort; give single-frame images")
    pixels = frames[0] if spatial_dims == 2 else frames
    return pixels, window_from_header(ds)


def _read_series(case: Case) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One DICOM series folder -> (D, H, W), slices ordered along the slice normal (else InstanceNumber)."""
    from radpretrain.shards.dicom import read_dicom, window_from_header

    slices = []
    for path in sorted(p for p in case.image.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds, frames = read_dicom(path)
        except DicomError as exc:
            if str(exc) == "not a DICOM file":
                continue
            raise CohortError(f"case {case.id}: a slice of its DICOM series cannot be used ({exc})") from None
        slices.append((_slice_position(ds), ds, frames))
    if not slices:
        raise CohortError(f"case {case.id}: its series folder holds no DICOM images")
    if len({str(ds.get("SeriesInstanceUID", "")) for _, ds, _ in slices}) > 1:
        raise CohortError(f"case {case.id}: its folder holds several DICOM series; keep one series per folder")
    if len({frames.shape[1:] for _, _, frames in slices}) > 1:
        raise CohortError(f"case {case.id}: the slices of its DICOM series differ in size")
    slices.sort(key=lambda item: item[0])
    volume = np.concatenate([frames.astype(np.float32) for _, _, frames in slices])
    return volume, window_from_header(slices[0][1])


def _slice_position(ds: Any) -> float:
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        return float(position @ np.cross(orientation[:3], orientation[3:]))
    except (AttributeError, ValueError, TypeError):
        return float(ds.get("InstanceNumber", 0) or 0)


def _resize(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Area averaging along the axes that shrink (as the shards' INTER_AREA), then linear along those that grow."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    shrunk = tuple(min(s, a) for s, a in zip(size, array.shape, strict=True))
    if shrunk != tuple(array.shape):
        tensor = torch.nn.functional.interpolate(tensor, size=shrunk, mode="area")
    if shrunk != tuple(size):
        mode = "bilinear" if array.ndim == 2 else "trilinear"
        tensor = torch.nn.functional.interpolate(tensor, size=tuple(size), mode=mode, align_corners=False)
    return tensor[0, 0].numpy()


# --------------------------------------------------------------------------------------------------------------
# The dataset.
# --------------------------------------------------------------------------------------------------------------


class CohortDataset(Dataset):
    """Cases of a cohort as encoder inputs and targets, decoded once and kept in memory.

    Items: {"image": (1, H, W) or (1, D, H, W) float32 in the intensity convention, "target": the mask as
    (1, ...) float32 in {0, 1} (segmentation), a long class index or a float (classification), "id",
    "patient"}. Every case is decoded, checked and resized when the dataset is made (errors come before
    any training); the arrays are cached on the cohort, so datasets over the same cohort share them.

    Augmentation (training only; MONAI, same for 2D and 3D, no flips since laterality matters): a random
    affine (rotation up to 10 degrees, scale 0.9-1.1, shift up to 5%) on image and mask, gamma 0.8-1.25,
    window/level jitter (intensity scale and shift 10%), light Gaussian noise. Random streams follow
    `torch.initial_seed()`, so DataLoader workers differ and a seeded run repeats.

    Args:
        cohort: The cohort.
        cases: The cases to serve (default: all), e.g. one patient-level split.
        size: Output side (int) or shape per spatial axis, e.g. 256 or (32, 128, 128).
        augment: Apply the training augmentation.
    """

    def __init__(
        self,
        cohort: Cohort,
        cases: Sequence[Case] | None = None,
        size: int | Sequence[int] = 224,
        augment: bool = False,
    ) -> None:
        self.cohort = cohort
        self.cases = list(cohort.cases if cases is None else cases)
        if not self.cases:
            raise CohortError("no cases to serve; give at least one case")
        self.size = _size(size, cohort.spatial_dims)
        for case in self.cases:
            if case.target is None:
                raise CohortError(f"case {case.id} has no label; label it or leave it out")
            if cohort.task == "seg" and not isinstance(case.target, Path):
                raise CohortError(f"case {case.id} has no mask file in a segmentation cohort")
        self._load()
        self.augment = augment
        self._transform = _augmentation(self.size, cohort.task == "seg") if augment else None
        self._seed: int | None = None

    def _load(self) -> None:
        from tqdm.auto import tqdm

        todo = [c for c in self.cases if (c, self.size) not in self.cohort._arrays]
        for case in tqdm(todo, desc="loading cohort", unit="case", leave=False, disable=len(todo) < 2):
            self.cohort._arrays[(case, self.size)] = read_case(case, self.cohort.spatial_dims, self.size)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        image01, mask = self.cohort._arrays[(case, self.size)]
        if self._transform is not None:
            image01, mask = self._augment(image01, mask)
        image = torch.from_numpy(intensity.normalize(image01)[None].copy())
        target: torch.Tensor
        if mask is not None:
            target = torch.from_numpy(mask[None].astype(np.float32))
        elif isinstance(case.target, float):
            target = torch.tensor(case.target, dtype=torch.float32)
        else:
            target = torch.tensor(case.target, dtype=torch.long)
        return {"image": image, "target": target, "id": case.id, "patient": case.patient}

    def _augment(self, image01: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        from monai.utils import convert_to_numpy

        assert self._transform is not None
        seed = torch.initial_seed() % 2**32
        if seed != self._seed:  # a new DataLoader worker or a reseeded process
            self._transform.set_random_state(seed=seed)
            self._seed = seed
        data = {"image": image01[None]}
        if mask is not None:
            data["mask"] = mask[None].astype(np.float32)
        out = self._transform(data)
        image = np.clip(convert_to_numpy(out["image"])[0], 0.0, 1.0).astype(np.float32)
        new_mask = None if mask is None else (convert_to_numpy(out["mask"])[0] >= 0.5).astype(np.uint8)
        return image, new_mask


def _size(size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    sides = (size,) * spatial_dims if isinstance(size, int) else tuple(size)
    if len(sides) != spatial_dims or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise CohortError(f"size must be a positive integer or {spatial_dims} of them for this cohort, got {size!r}")
    return sides


def _augmentation(size: tuple[int, ...], with_mask: bool) -> Any:
    from monai import transforms as T

    keys = ["image", "mask"] if with_mask else ["image"]
    spatial_dims = len(size)
    angles = (np.deg2rad(10.0),) * (1 if spatial_dims == 2 else 3)
    return T.Compose(
        [
            T.RandAffined(
                keys,
                prob=0.8,
                rotate_range=angles,
                scale_range=(0.1,) * spatial_dims,
                translate_range=tuple(0.05 * side for side in size),  # in pixels
                mode="bilinear",  # masks too: thresholded at 0.5 afterwards, smoother than nearest
                padding_mode="zeros",
            ),
            T.RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
            T.RandScaleIntensityd("image", factors=0.1, prob=0.5),
            T.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            T.RandGaussianNoised("image", prob=0.2, std=0.02),
        ]
    )
