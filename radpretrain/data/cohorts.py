"""Small labeled cohorts for finetuning: 2D images with masks or labels, 3D volumes with label volumes."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from radpretrain.data.readers import BITMAP_EXTS, IMAGE_EXTS, VOLUME_EXTS, CaseArrays, extension
from radpretrain.errors import CohortError
from radpretrain.registry import did_you_mean

log = logging.getLogger(__name__)

KINDS = ("seg2d", "cls2d", "seg3d", "cls3d")
#: A DICOM UID (digits and dots, e.g. 1.2.826.0.1.3680043...) used as a file or folder name.
UID_NAME = re.compile(r"^[0-9]+(\.[0-9]+){3,}$")
#: Name endings that mark a mask or label volume (`N-mask.png`, `X_label.nrrd`, `X_seg.nii.gz` ...).
LABEL_SUFFIXES = ("-mask", "_mask", "-label", "_label", "-seg", "_seg", "-labels", "_labels")
#: Name endings of the image beside its label (`X_image.nrrd` + `X_label.nrrd`).
IMAGE_SUFFIXES = ("-image", "_image")

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
    _arrays: dict[tuple[Case, tuple[int, ...]], CaseArrays] = field(default_factory=dict, repr=False, compare=False)

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

    Layouts (the first that fits wins):

    - A table: a CSV file, or a folder holding exactly one CSV whose header has an `image` column (any
      name; other CSVs without that column are ignored, several tables are refused). Columns: `image`,
      and `mask` (segmentation) or a label column (classification, `label_column`); optional `patient`,
      and `structure` when the table lists several masks per image, one row per image and structure.
      Paths are relative to the CSV; the patient id comes from `patient`, else the image's file stem.
    - Image/mask pairs by name: `N.jpg` + `N-mask.png`, `X_image.nrrd` + `X_label.nrrd`, `X.nrrd` +
      `X-label.nrrd`, `X.nii.gz` + `X_seg.nii.gz`, a DICOM series folder `X/` + `X_label.nii.gz`.
    - One subfolder of images or volumes per class.

    Masks are binary: every non-zero value is foreground (in JPEG masks, which smear edges, values above
    127). Classification labels become class indices into `Cohort.classes` (sorted numerically when all
    are integers, else alphabetically), or floats when they are numbers that are not all integers.

    Args:
        path: A cohort folder or CSV file.
        kind: "seg2d", "cls2d", "seg3d" or "cls3d" to insist on (or to choose the labels when a CSV has
            both a mask and a label column); default: what the layout holds.
        label_column: The CSV column holding classification labels.
        structure: With a `structure` column (e.g. lungs, heart), the structure whose masks are the
            targets; required when the table holds several.

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
        ext = extension(entry)
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
        folder.name: sorted(p for p in folder.iterdir() if p.is_file() and extension(p) in IMAGE_EXTS + VOLUME_EXTS)
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


def _stem(path: Path) -> str:
    ext = extension(path)
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
        3 if image.is_dir() or extension(image) in VOLUME_EXTS else 2 if extension(image) in BITMAP_EXTS else dicom_dims
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
