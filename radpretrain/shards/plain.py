"""Folders of PNG/JPEG radiographs with an optional metadata CSV: rows for the index, grey pixels for the writer."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radpretrain.errors import ConfigError, ShardError
from radpretrain.shards import deid, labels

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})
#: Fields a CSV may provide, mapped to column names. Every other column (notes, findings ...) is never read.
CSV_FIELDS: tuple[str, ...] = ("file", "patient", "study", "sex", "age", "view", "laterality", "body_part")
DEFAULT_CSV_COLUMNS: dict[str, str] = {
    "patient": "patientid",
    "sex": "sex",
    "age": "age",
    "view": "view",
    "body_part": "body_part",
    "laterality": "laterality",
}
#: Column names tried, in order, for the image file when the mapping names none.
FILE_COLUMN_GUESSES: tuple[str, ...] = ("filename", "file", "image", "image_id", "path", "imagename")
#: Colour images whose channels differ by at most this many grey levels (99.9th percentile, so JPEG
#: chroma noise passes) are grey images saved as RGB.
GREY_TOLERANCE = 8
UNREADABLE_IMAGE = "unreadable image"
COLOUR = "colour image"


class SkippedImage(ShardError):
    """A readable image that is not used (true colour); counted as skipped, not failed."""


@dataclass
class PlainOptions:
    """How PNG/JPEG folders are read; `csv` defaults to SRC/metadata.csv when that file exists."""

    csv: str | None = None
    csv_columns: dict[str, str] = field(default_factory=dict)
    body_part: str = labels.UNKNOWN
    modality: str = "DX"

    def validate(self) -> None:
        unknown = set(self.csv_columns) - set(CSV_FIELDS)
        if unknown:
            raise ConfigError(
                f"unknown CSV field(s) {sorted(unknown)}; the fields a CSV may give are {', '.join(CSV_FIELDS)}"
            )
        if self.body_part not in labels.BODY_PARTS:
            raise ConfigError(f"body part '{self.body_part}' is not one of {', '.join(labels.BODY_PARTS)}")
        if deid.modality_code(self.modality) == "other":
            raise ConfigError(f"modality '{self.modality}' is not a DICOM modality code such as DX or CR")

    def columns(self) -> dict[str, str]:
        return {**DEFAULT_CSV_COLUMNS, **self.csv_columns}


def parse_csv_columns(text: str) -> dict[str, str]:
    """`"file=filename,patient=PatientID"` -> {"file": "filename", "patient": "PatientID"}."""
    mapping: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, column = item.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise ConfigError(f"CSV column mapping '{item}' must look like field=column, e.g. patient=PatientID")
        mapping[name.strip()] = column.strip()
    return mapping


def load_metadata_table(src: Path, options: PlainOptions) -> tuple[dict[str, dict[str, str]], Path | None]:
    """Read the CSV into {file key: {field: value}} keeping only mapped fields; also return its path."""
    if options.csv:
        path = Path(options.csv).expanduser()
        if not path.is_absolute():
            path = src / path
        if not path.is_file():
            raise ShardError(f"metadata CSV {options.csv} not found; give an existing file with --csv")
    else:
        path = src / "metadata.csv"
        if not path.is_file():
            return {}, None
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    explicit_missing = [f"{n}={c}" for n, c in options.csv_columns.items() if c not in header]
    if explicit_missing:
        raise ShardError(
            f"metadata CSV {path.name} has no column(s) {', '.join(explicit_missing)} "
            f"(columns are: {', '.join(header)})"
        )
    columns = {name: col for name, col in options.columns().items() if col in header}
    if "file" not in columns:
        guess = next((c for c in FILE_COLUMN_GUESSES if c in header), None)
        if guess:
            columns["file"] = guess
        elif "patient" not in columns:
            raise ShardError(
                f"metadata CSV {path.name} has no column naming the image file; map one with "
                f"--csv-columns file=<column> (columns are: {', '.join(header)})"
            )
    table: dict[str, dict[str, str]] = {}
    # With no file column, the image is found by its stem in the patient column (figure1-style exports).
    key_column = columns.get("file", columns.get("patient"))
    for raw in reader:
        record = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        kept = {name: record.get(col, "") for name, col in columns.items()}
        key = record.get(key_column or "", "")
        if key:
            for alias in {key, Path(key).name, Path(key).stem}:
                table.setdefault(alias, kept)
    return table, path.resolve()


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # spreadsheets saved on Windows


def image_row(
    path: Path,
    relpath: str,
    pseudonymize: deid.Pseudonymizer,
    options: PlainOptions,
    table: dict[str, dict[str, str]],
    age_buckets: list[str],
) -> dict[str, Any]:
    """One PNG/JPEG file -> its index row; the sample key is a pseudonym of its content (dedupes copies)."""
    row: dict[str, Any] = {"file": pseudonymize("file", relpath), "kind": "image", "sop": None, "frames": 1}
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return {**row, "status": "failed", "reason": UNREADABLE_IMAGE}
    record = table.get(relpath) or table.get(Path(relpath).name) or table.get(Path(relpath).stem) or {}
    patient_id = record.get("patient", "")
    study_id = record.get("study", "")
    age = labels.cap_age(labels.parse_free_age(record.get("age")))
    body_part = labels.body_part_from_text(record.get("body_part"))
    row.update(
        sop=pseudonymize("image", digest),
        patient=pseudonymize("patient", patient_id) if patient_id else pseudonymize("patient-from-image", digest),
        study=pseudonymize("study", study_id) if study_id else None,
        body_part=body_part if body_part != labels.UNKNOWN else options.body_part,
        age_years=age,
        age_bucket=labels.AgeBuckets.parse(age_buckets).bucket(age),
        sex=labels.normalize_sex(record.get("sex")),
        view=labels.normalize_view(record.get("view")),
        laterality=labels.normalize_laterality(record.get("laterality")),
        modality=deid.modality_code(options.modality),
        manufacturer=None,
        bits_stored=None,
        transfer_syntax="PNG file" if path.suffix.lower() == ".png" else "JPEG file",
        status="ok",
        reason=None,
    )
    return row


def read_grey(path: Path) -> np.ndarray:
    """Decode a PNG/JPEG to one grey channel (uint8 or uint16); RGB copies of grey images are accepted.

    Raises SkippedImage("colour image") for true colour images and ShardError("unreadable image") otherwise.
    """
    import cv2

    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ShardError(UNREADABLE_IMAGE)
    if image.ndim == 3:
        channels = image[..., :3].astype(np.int32)
        if channels.shape[-1] == 1:
            return image[..., 0]
        sub = channels[::4, ::4]
        spread = float(np.percentile(sub.max(axis=-1) - sub.min(axis=-1), 99.9))
        if spread > GREY_TOLERANCE:
            raise SkippedImage(COLOUR)
        return np.round(channels.mean(axis=-1)).astype(image.dtype)
    if image.dtype not in (np.uint8, np.uint16):
        raise ShardError(UNREADABLE_IMAGE)
    return image
