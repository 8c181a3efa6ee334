"""Synthetic PACS export: patient/study/series folders of CR/DX radiographs, real-world headers, hostile files."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import logging
import shutil
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radpretrain.errors import ConfigError
from radpretrain.files import write_text
from radpretrain.shards.format import SCHEMA_VERSION
from radpretrain.synth.phantoms import (
    BODY_PARTS,
    FINDINGS,
    MASK_STRUCTURES,
    SIDED,
    VIEWS,
    Body,
    check_body_parts,
    default_shape,
    field_of_view,
    make_radiograph,
)

log = logging.getLogger(__name__)

SYNTH_JSON = "synth.json"
#: The masks table, a cohort table in `radpretrain.data.cohorts.load_cohort`'s table layout (columns image, mask,
#: patient, structure; paths relative to the export), found there as the folder's one CSV with an image column.
MASKS_CSV = "masks.csv"
#: The findings table (`generate(findings=P)`): a classification cohort of the export's chest radiographs that
#: `load_cohort` and the pretraining probe (`probe.cohort`) read. Columns: image (relative to the export), label
#: ("abnormal" with a lung finding, else "normal"), finding (its kind, or "none") and patient, as in masks.csv.
FINDINGS_CSV = "findings.csv"
FINDINGS_COLUMNS = ("image", "label", "finding", "patient")
_PARTIAL = ".synth-partial.json"  # written first, replaced by synth.json when the export is complete

#: Hostile file kinds; with hostile > 0 every kind appears at least once.
HOSTILE_KINDS: tuple[str, ...] = (
    "truncated",  # a radiograph cut inside its pixel data (an interrupted copy)
    "not_dicom",  # text, thumbnails, database files, some named *.dcm
    "dicomdir",  # a DICOMDIR media index
    "no_pixels",  # a radiograph header without Pixel Data
    "rgb",  # an RGB secondary capture (a screenshot of a radiograph)
    "burned_in",  # a radiograph with BurnedInAnnotation=YES and text in the pixels
    "duplicate",  # the same instance (same bytes, same SOPInstanceUID) at a second path
    "empty",  # a zero-byte file
    "absurd_dims",  # Rows/Columns far larger than the pixel data
    "ct",  # a CT slice: not a projection radiograph, skipped by modality
)

#: Transfer syntaxes by pydicom keyword; compressed ones are used only when an encoder is installed.
SYNTAXES: tuple[str, ...] = (
    "ExplicitVRLittleEndian",
    "ImplicitVRLittleEndian",
    "DeflatedExplicitVRLittleEndian",
    "RLELossless",
    "JPEGLSLossless",
    "JPEG2000Lossless",
)
_SYNTAX_WEIGHTS = {
    "ExplicitVRLittleEndian": 0.35,
    "ImplicitVRLittleEndian": 0.15,
    "DeflatedExplicitVRLittleEndian": 0.05,
    "RLELossless": 0.15,
    "JPEGLSLossless": 0.15,
    "JPEG2000Lossless": 0.15,
}

_CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
_DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"
_CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
_SC_SOP = "1.2.840.10008.5.1.4.1.1.7"
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"

# How often each part is examined (children get more hands for bone age, fewer spines).
_PART_WEIGHTS_ADULT = {
    "chest": 0.34,
    "abdomen": 0.07,
    "pelvis": 0.1,
    "skull": 0.04,
    "lspine": 0.1,
    "shoulder": 0.09,
    "hand": 0.08,
    "knee": 0.11,
    "foot": 0.07,
}
_PART_WEIGHTS_CHILD = {**_PART_WEIGHTS_ADULT, "hand": 0.2, "lspine": 0.03, "skull": 0.08, "abdomen": 0.1}

# BodyPartExamined as written by different vendors and sites, and description phrases naming the part.
_PART_TAGS: dict[str, tuple[str, ...]] = {
    "chest": ("CHEST", "Chest", "THORAX", "Thorax", "CHEST_PA", "LUNG"),
    "abdomen": ("ABDOMEN", "Abdomen", "ABD", "KUB"),
    "pelvis": ("PELVIS", "Pelvis", "HIP", "BECKEN"),
    "skull": ("SKULL", "Skull", "HEAD", "Schädel"),
    "lspine": ("LSPINE", "L-SPINE", "LUMBAR SPINE", "LWS"),
    "shoulder": ("SHOULDER", "Shoulder", "SCHULTER"),
    "hand": ("HAND", "Hand", "HANDS"),
    "knee": ("KNEE", "Knee", "KNIE"),
    "foot": ("FOOT", "Foot", "FUSS", "Fuß"),
}
_PART_PHRASES: dict[str, tuple[str, ...]] = {
    "chest": ("XR CHEST", "Thorax", "CHEST 2 VIEWS", "Rontgen Thorax", "CXR"),
    "abdomen": ("XR ABDOMEN 1 VIEW", "Abdomen leer", "KUB"),
    "pelvis": ("XR PELVIS", "Becken", "HIPS"),
    "skull": ("XR SKULL", "SKULL 2 VIEWS", "Schädel"),
    "lspine": ("XR LUMBAR SPINE", "LWS", "L-SPINE 2V"),
    "shoulder": ("XR SHOULDER", "Schulter", "SHOULDER 3V"),
    "hand": ("XR HAND", "Hand", "BONE AGE HAND"),
    "knee": ("XR KNEE", "Knie", "KNEE 2 VIEWS"),
    "foot": ("XR FOOT", "Fuss", "FOOT 3 VIEWS"),
}
_VAGUE_PHRASES = ("XR 1 VIEW", "Aufnahme", "RX", "PORTABLE", "Radiograph", "XR OUTSIDE FILMS")
_FREE_TEXT = ("fell at home", "pain after fall", "follow-up", "trauma", "fever and cough", "rule out fracture")
_VIEWS = {"chest": ("PA", "AP"), "skull": ("PA", "AP")}  # other parts: AP (PA for the hand)
_LATERAL_TAGS = ("LL", "RL", "LAT", "LATERAL")  # how ViewPosition spells a lateral

# Every body-part table above names each drawable part as the label vocabulary does.
check_body_parts("_PART_WEIGHTS_ADULT", _PART_WEIGHTS_ADULT, complete=True)
check_body_parts("_PART_WEIGHTS_CHILD", _PART_WEIGHTS_CHILD, complete=True)
check_body_parts("_PART_TAGS", _PART_TAGS, complete=True)
check_body_parts("_PART_PHRASES", _PART_PHRASES, complete=True)
check_body_parts("_VIEWS", _VIEWS)

# (Manufacturer as written, normalised vendor as radpretrain.shards.labels names it).
_CR_VENDORS = (
    ("FUJIFILM Corporation", "fujifilm"),
    ("FUJI PHOTO FILM Co., ltd.", "fujifilm"),
    ("Agfa", "agfa"),
    ("AGFA", "agfa"),
    ("Carestream Health", "carestream"),
    ("KODAK", "carestream"),
    ("KONICA MINOLTA", "konica_minolta"),
)
_DX_VENDORS = (
    ("SIEMENS", "siemens"),
    ("Siemens Healthineers", "siemens"),
    ("GE Healthcare", "ge"),
    ("GE MEDICAL SYSTEMS", "ge"),
    ("Philips Medical Systems", "philips"),
    ("Canon Inc.", "canon"),
    ("Carestream Health", "carestream"),
    ("Samsung Electronics", "samsung"),
)

_FIRST_M = ("John", "Peter", "Ahmed", "Luis", "Kenji", "Marek", "Tom", "Ivan", "Jonas", "Samuel")
_FIRST_F = ("Mary", "Anna", "Fatima", "Sofia", "Yuki", "Elena", "Grace", "Olga", "Lena", "Ines")
_LAST = ("Doe", "Smith", "Müller", "Garcia", "Tanaka", "Novak", "Okafor", "Jensen", "Rossi", "Kowalski")
_STREETS = ("Oak Street", "Lindenweg", "Calle Mayor", "Station Road", "Rue Victor Hugo")
_CITIES = ("Springfield", "Neustadt", "Villanueva", "Riverton")
_HOSPITALS = ("St. Elsewhere Hospital", "Klinikum Neustadt", "Riverton General", "Hospital San Rafael")


@dataclass
class SynthSummary:
    """What `generate` wrote: counts, per-file ground truth and the identifiers it planted."""

    root: Path
    args: dict[str, Any]
    files: dict[str, dict[str, Any]]  # relative path -> ground truth
    masks: list[dict[str, str]] = field(default_factory=list)
    phi: dict[str, list[str]] = field(default_factory=dict)  # strings, markers, uids, dates

    @property
    def n_files(self) -> int:
        return len(self.files)

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(info["kind"] for info in self.files.values()).items()))

    @property
    def paths(self) -> list[Path]:
        return [self.root / rel for rel in self.files]

    def paths_of(self, kind: str) -> list[Path]:
        return [self.root / rel for rel, info in self.files.items() if info["kind"] == kind]

    @property
    def radiographs(self) -> list[Path]:
        return self.paths_of("radiograph")

    @property
    def phi_strings(self) -> list[str]:
        """Every planted identifying value (names, IDs, free text, UIDs, dates), to grep outputs for."""
        return sorted({*self.phi.get("strings", []), *self.phi.get("uids", []), *self.phi.get("dates", [])})

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "args": self.args,
            "counts": {"files": self.n_files, **self.counts},
            "files": self.files,
            "masks": self.masks,
            "phi": self.phi,
        }

    @classmethod
    def load(cls, root: str | Path) -> SynthSummary:
        root = Path(root)
        path = root / SYNTH_JSON
        if not path.is_file():
            raise ConfigError(f"{path} not found: this folder is not a finished `radpretrain synth` export")
        data = json.loads(path.read_text())
        return cls(root=root, args=data["args"], files=data["files"], masks=data["masks"], phi=data["phi"])


def available_syntaxes() -> list[str]:
    """The transfer syntaxes this installation can write (compressed ones need an encoder plugin)."""
    import pydicom.uid
    from pydicom.pixels import get_encoder

    found = []
    for name in SYNTAXES:
        uid = getattr(pydicom.uid, name)
        if not uid.is_compressed or get_encoder(uid).is_available:
            found.append(name)
    return found


#: Syntaxes `transcode` writes that pydicom cannot encode (and `generate` does not draw): baseline 8-bit
#: JPEG (lossy, via Pillow's libjpeg, 8-bit images only) and JPEG lossless SV1 (via GDCM), for benchmarks and
#: tests of the decoders.
TRANSCODE_SYNTAXES: tuple[str, ...] = ("JPEGBaseline8Bit", "JPEGLosslessSV1")


def transcode(src: str | Path, dst: str | Path, syntax: str, quality: int = 90) -> None:
    """Rewrite one uncompressed monochrome DICOM file `src` as `dst` in `syntax` (`TRANSCODE_SYNTAXES`).

    JPEGBaseline8Bit needs BitsAllocated 8 (`generate(..., bits_stored=8)`); `quality` is its JPEG quality.
    """
    import pydicom
    import pydicom.uid

    if syntax not in TRANSCODE_SYNTAXES:
        raise ConfigError(f"transcode writes {', '.join(TRANSCODE_SYNTAXES)}, got {syntax!r}")
    if syntax == "JPEGLosslessSV1":
        import gdcm

        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        writer = gdcm.ImageWriter()
        if not reader.Read():
            raise ConfigError(f"GDCM cannot read {src}")
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise ConfigError(f"GDCM cannot encode {src} as JPEG lossless")
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(dst))
        if not writer.Write():
            raise ConfigError(f"GDCM cannot write {dst}")
        return
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(src)
    if ds.BitsAllocated != 8 or ds.SamplesPerPixel != 1 or ds.get("PixelRepresentation", 0) != 0:
        raise ConfigError("JPEGBaseline8Bit needs unsigned 8-bit monochrome pixels (generate with bits_stored=8)")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(ds.pixel_array, dtype=np.uint8)).save(buffer, "JPEG", quality=quality)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    ds.save_as(dst, enforce_file_format=True)


def generate(
    out: str | Path,
    n: int,
    seed: int = 0,
    hostile: float = 0.0,
    masks: bool = False,
    min_size: int = 1000,
    max_size: int = 3000,
    syntaxes: Sequence[str] | None = None,
    workers: int = 1,
    phi_marker: str | None = None,
    body_parts: Sequence[str] | None = None,
    shape: tuple[int, int] | None = None,
    bits_stored: int | None = None,
    findings: float = 0.0,
    overwrite: bool = False,
    progress: bool = True,
) -> SynthSummary:
    """Write a synthetic PACS export of `n` files into `out`.

    Args:
        out: output folder; must be empty, new, or a previous synth export (see `overwrite`).
        n: number of files in the export, hostile ones included.
        seed: same seed and arguments give the same bytes (UIDs included), whatever `workers` is.
        hostile: share of hostile files (`HOSTILE_KINDS`); any value > 0 gives at least one of each kind.
        masks: write ground-truth masks (chest: lungs, heart; hand and knee: bones) beside the images and
            `masks.csv` (image, mask, patient, structure): a cohort table `load_cohort` reads, from the
            table path or from the export folder, as its only CSV with an image column.
        min_size, max_size: range of the long image side in pixels.
        syntaxes: transfer syntaxes to draw from (`SYNTAXES` keywords); default all available. A compressed
            syntax without an installed encoder falls back to ExplicitVRLittleEndian with a warning.
        workers: processes used to render and encode.
        phi_marker: when set, every identifying string (names, IDs, addresses, institution, physicians, free
            text, private tags, strings in sequences, comments, folder names from IDs) contains a token
            f"{phi_marker}{k:05d}"; the summary lists them with the UIDs and dates.
        body_parts: restrict radiographs to these parts (default: all of `BODY_PARTS`).
        shape: force every radiograph to (rows, cols), e.g. (2500, 2000) for benchmarks.
        bits_stored: force BitsStored (8..16) for every radiograph.
        findings: share of the chest radiographs (frontal and lateral) that show a lung finding, a nodule or a
            consolidation (`phantoms.FINDINGS`, each with equal chance), chosen at random whatever the patient's age and
            sex or the view. synth.json records each file's "finding" (kind or null) and `findings.csv` lists the
            chest radiographs as a classification cohort; with `masks`, the finding's mask is a "finding"
            structure in masks.csv. 0 (the default) writes exactly the export of a version without findings.
        overwrite: replace a previous synth export made with other arguments.
        progress: show a tqdm progress bar.

    Returns:
        The summary that is also written to `out/synth.json`.
    """
    args = _check_args(
        n=n,
        seed=seed,
        hostile=hostile,
        masks=masks,
        min_size=min_size,
        max_size=max_size,
        syntaxes=syntaxes,
        phi_marker=phi_marker,
        body_parts=body_parts,
        shape=shape,
        bits_stored=bits_stored,
        findings=findings,
    )
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    root = Path(out)
    previous = _prepare_folder(root, args, overwrite)
    if previous is not None:
        log.info("synth: %s already holds this export (same arguments); nothing to do", root)
        return previous
    specs, phi = _Planner(args).plan()  # before the folder exists: a plan can still be refused
    root.mkdir(parents=True, exist_ok=True)
    (root / _PARTIAL).write_text(json.dumps({"args": args}, indent=1))
    results = _render_all(root, specs, workers, progress)
    files: dict[str, dict[str, Any]] = {}
    mask_rows: list[dict[str, str]] = []
    for spec, truth in zip(specs, results, strict=True):
        if spec["kind"] == "duplicate":
            # Same instance exported twice: identical bytes at a second path.
            shutil.copyfile(root / spec["source"], root / spec["rel"])
            truth = {**files[spec["source"]], "kind": "duplicate", "duplicate": True, "duplicate_of": spec["source"]}
            truth.pop("masks", None)
        files[spec["rel"]] = truth
        for structure, mask_rel in truth.get("masks", {}).items():
            mask_rows.append(
                {"image": spec["rel"], "mask": mask_rel, "patient": truth["patient_id"], "structure": structure}
            )
    if masks:
        with open(root / MASKS_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "mask", "patient", "structure"])
            writer.writeheader()
            writer.writerows(mask_rows)
    if "findings" in args:
        _write_findings(root / FINDINGS_CSV, files)
    summary = SynthSummary(root=root, args=args, files=files, masks=mask_rows, phi=phi)
    write_text(root / SYNTH_JSON, json.dumps(summary.to_json(), indent=1, ensure_ascii=False))
    (root / _PARTIAL).unlink()
    return summary


def _write_findings(path: Path, files: dict[str, dict[str, Any]]) -> None:
    """The findings cohort: every chest radiograph of the export (not its duplicates), in file order."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FINDINGS_COLUMNS)
        writer.writeheader()
        for rel, truth in files.items():
            if truth["kind"] == "radiograph" and truth["body_part"] == "chest":
                finding = truth["finding"]
                writer.writerow(
                    {
                        "image": rel,
                        "label": "normal" if finding is None else "abnormal",
                        "finding": finding or "none",
                        "patient": truth["patient_id"],
                    }
                )


def _check_args(**args: Any) -> dict[str, Any]:
    n, hostile = args["n"], args["hostile"]
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (the number of files) must be a positive integer, got {n!r}")
    if not 0.0 <= float(hostile) <= 1.0:
        raise ConfigError(f"hostile must be a share between 0 and 1, got {hostile}")
    if hostile > 0 and n < len(HOSTILE_KINDS) + 1:
        raise ConfigError(
            f"hostile > 0 needs at least {len(HOSTILE_KINDS) + 1} files (one of each of the {len(HOSTILE_KINDS)} "
            f"hostile kinds plus a radiograph), got n={n}; raise --n or use --hostile 0"
        )
    lo, hi = args["min_size"], args["max_size"]
    if lo < 16 or hi < lo:
        raise ConfigError(f"sizes must satisfy 16 <= min_size <= max_size, got min_size={lo}, max_size={hi}")
    if args["shape"] is not None:
        shape = tuple(int(v) for v in args["shape"])
        if len(shape) != 2 or min(shape) < 16:
            raise ConfigError(f"shape must be (rows, cols) with at least 16 pixels per side, got {args['shape']}")
        args["shape"] = list(shape)
    bits = args["bits_stored"]
    if bits is not None and not 8 <= int(bits) <= 16:
        raise ConfigError(f"bits_stored must be between 8 and 16, got {bits}")
    if args["syntaxes"] is not None:
        wanted = list(args["syntaxes"])
        unknown = [s for s in wanted if s not in SYNTAXES]
        if unknown or not wanted:
            raise ConfigError(f"unknown transfer syntax {unknown or wanted}; known: {', '.join(SYNTAXES)}")
        args["syntaxes"] = wanted
    if args["body_parts"] is not None:
        parts = list(args["body_parts"])
        unknown = [p for p in parts if p not in BODY_PARTS]
        if unknown or not parts:
            raise ConfigError(f"unknown body part {unknown or parts}; known: {', '.join(BODY_PARTS)}")
        args["body_parts"] = parts
    marker = args["phi_marker"]
    if marker is not None and (not marker.isascii() or not marker.isalnum() or len(marker) > 6):
        raise ConfigError(f"phi_marker must be 1-6 ASCII letters or digits, got {marker!r}")
    args["hostile"] = float(hostile)
    findings = args.pop("findings")
    if not 0.0 <= float(findings) <= 1.0:
        raise ConfigError(f"findings must be a share between 0 and 1, got {findings}")
    if findings > 0:  # recorded only when used: an export without findings keeps its bytes, synth.json included
        if args["body_parts"] is not None and "chest" not in args["body_parts"]:
            raise ConfigError("findings are drawn in the lungs of chest radiographs; add chest to --body-parts")
        args["findings"] = float(findings)
    return args


def _prepare_folder(root: Path, args: dict[str, Any], overwrite: bool) -> SynthSummary | None:
    """Refuse to write into a folder that holds anything but a previous synth export."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise ConfigError(f"output {root} exists and is not a folder; choose a new folder")
    if not any(root.iterdir()):
        return None
    done, partial = root / SYNTH_JSON, root / _PARTIAL
    if not done.is_file() and not partial.is_file():
        raise ConfigError(
            f"output folder {root} is not empty and was not made by `radpretrain synth`; choose an empty or new folder"
        )
    marker = done if done.is_file() else partial
    try:
        previous_args = json.loads(marker.read_text())["args"]
    except (ValueError, KeyError):
        previous_args = None
    if previous_args == args:
        return SynthSummary.load(root) if done.is_file() else None
    if not overwrite:
        raise ConfigError(
            f"output folder {root} holds a synth export made with other arguments; pass --overwrite to replace it "
            "or choose another folder"
        )
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return None


# --- planning: every header value and file path, drawn in one process so output never depends on workers ---


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["radpretrain-synth", str(seed), *map(str, parts)]))


def _da(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _age_string(days: int) -> str:
    """DICOM AS for an age of `days` days, in the unit scanners use for that age."""
    years = int(days // 365.25)
    if years >= 2:
        return f"{min(years, 999):03d}Y"
    if days >= 31:
        return f"{int(days // (365.25 / 12)):03d}M"
    if days >= 14:
        return f"{days // 7:03d}W"
    return f"{days:03d}D"


class _Planner:
    """Draws the whole export (patients, studies, series, files, hostile extras) from one seeded generator."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.seed = int(args["seed"])
        self.rng = np.random.default_rng([self.seed, 0x5EED])
        self.marker: str | None = args["phi_marker"]
        self.tokens = 0
        self.phi: dict[str, list[str]] = {"strings": [], "markers": [], "uids": [], "dates": []}
        syntaxes = args["syntaxes"] or list(SYNTAXES)
        usable = available_syntaxes()
        missing = [s for s in syntaxes if s not in usable]
        if missing:
            log.warning("synth: no encoder installed for %s; those files are written uncompressed", ", ".join(missing))
        self.syntaxes = syntaxes
        weights = np.array([_SYNTAX_WEIGHTS[s] for s in syntaxes])
        self.syntax_p = weights / weights.sum()
        self.parts = args["body_parts"] or list(BODY_PARTS)
        self.used_paths: set[str] = set()
        self.used_ids: set[str] = set()

    def unique(self, rel: str) -> str:
        """Paths are unique in an export; a clash (rare random IDs, a source copied twice) gets a suffix."""
        stem, dot, ext = rel.rpartition(".") if "." in rel.rsplit("/", 1)[-1] else (rel, "", "")
        candidate, k = rel, 1
        while candidate in self.used_paths:
            candidate = f"{stem}_{k}{dot}{ext}"
            k += 1
        self.used_paths.add(candidate)
        return candidate

    # Identifying values: plain fakes, or carrying a marker token when asked.

    def _token(self) -> str:
        self.tokens += 1
        token = f"{self.marker}{self.tokens:05d}"
        self.phi["markers"].append(token)
        return token

    def phi_text(self, plain: str, template: str = "{plain} {token}") -> str:
        value = template.format(plain=plain, token=self._token()) if self.marker else plain
        self.phi["strings"].append(value)
        return value

    def uid(self, *parts: object) -> str:
        value = _uid(self.seed, *parts)
        self.phi["uids"].append(value)
        return value

    def date(self, day: dt.date) -> str:
        value = _da(day)
        self.phi["dates"].append(value)
        return value

    def pick(self, options: Sequence[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def name(self, sex: str | None) -> str:
        first = self.pick(_FIRST_F if sex == "F" else _FIRST_M)
        return self.phi_text(f"{self.pick(_LAST)}^{first}", "{token}^" + first)

    # The export.

    def plan(self) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
        n = self.args["n"]
        hostile = self.args["hostile"]
        n_hostile = max(round(hostile * n), len(HOSTILE_KINDS)) if hostile > 0 else 0
        n_hostile = min(n_hostile, n - 1)
        kinds = (
            list(HOSTILE_KINDS) + [str(k) for k in self.rng.choice(HOSTILE_KINDS, size=n_hostile - len(HOSTILE_KINDS))]
            if n_hostile
            else []
        )
        n_images = n - n_hostile
        specs: list[dict[str, Any]] = []
        self.hosts: list[dict[str, Any]] = []  # (patient, study) contexts hostile DICOMs may join
        patient_index = 0
        while len(specs) < n_images:
            specs.extend(self._patient(patient_index, n_images - len(specs)))
            patient_index += 1
        radiographs = [s for s in specs if s["kind"] == "radiograph"]
        extras = [self._hostile(kind, k, radiographs) for k, kind in enumerate(kinds)]
        if "findings" in self.args:
            self._findings([s for s in radiographs if s["part"] == "chest"])
        return specs + extras, self.phi

    def _findings(self, chest: list[dict[str, Any]]) -> None:
        """Give round(share x chest radiographs) of them a finding, drawn by a generator of their own so the
        rest of the export is the one planned without findings."""
        if not chest:
            raise ConfigError(
                f"findings need chest radiographs and none of the {self.args['n']} files is one; raise --n "
                "(or use --body-parts chest)"
            )
        rng = np.random.default_rng([self.seed, 0xF1D1])
        chosen = rng.choice(len(chest), size=round(self.args["findings"] * len(chest)), replace=False)
        for k in sorted(int(i) for i in chosen):
            chest[k]["finding"] = chest[k]["truth"]["finding"] = str(rng.choice(FINDINGS))

    def _patient(self, index: int, room: int) -> list[dict[str, Any]]:
        rng = self.rng
        sex = str(rng.choice(["M", "F", "O"], p=[0.49, 0.5, 0.01]))
        group = rng.choice(4, p=[0.06, 0.12, 0.42, 0.40])
        age0 = float([rng.uniform(0, 2), rng.uniform(2, 18), rng.uniform(18, 65), rng.uniform(65, 101)][group])
        first_study = dt.date(2005, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 18)))
        birth = first_study - dt.timedelta(days=int(age0 * 365.25))
        number = str(rng.integers(10**6, 10**8))
        while number in self.used_ids:
            number = str(rng.integers(10**6, 10**8))
        self.used_ids.add(number)
        pid = self.phi_text(number, "{token}")
        patient = {
            "index": index,
            "sex": sex,
            "birth": birth,
            "PatientID": pid,
            "PatientName": self.name(sex),
            "IssuerOfPatientID": self.phi_text(self.pick(("HOSP_MRN", "KIS", "RIS")), "{plain}{token}"),
            "PatientAddress": self.phi_text(
                f"{rng.integers(1, 200)} {self.pick(_STREETS)}, {self.pick(_CITIES)}", "{plain} {token}"
            ),
            "PatientTelephoneNumbers": self.phi_text(f"+1 555 {rng.integers(1000000, 9999999)}", "{token}"),
            "PatientMotherBirthName": self.name("F"),
            "OtherPatientID": self.phi_text(f"X{rng.integers(10**5, 10**6)}", "{token}"),
            "folder": pid if rng.random() < 0.6 else f"PAT{index:05d}",
        }
        specs: list[dict[str, Any]] = []
        day = first_study
        for s in range(int(rng.integers(1, 4))):
            if len(specs) >= room:
                break
            specs.extend(self._study(patient, s, day, room - len(specs)))
            day += dt.timedelta(days=int(rng.integers(1, 900)))
        return specs

    def _study(self, patient: dict[str, Any], s: int, day: dt.date, room: int) -> list[dict[str, Any]]:
        rng = self.rng
        age_days = (day - patient["birth"]).days
        age = age_days / 365.25
        table = _PART_WEIGHTS_CHILD if age < 18 else _PART_WEIGHTS_ADULT
        weights = np.array([table[p] for p in self.parts])
        part = str(rng.choice(self.parts, p=weights / weights.sum()))
        modality = str(rng.choice(["CR", "DX", "DR"], p=[0.35, 0.62, 0.03]))
        vendor = self.pick(_CR_VENDORS if modality == "CR" else _DX_VENDORS)
        pix = patient["index"] * 100 + s
        accession = self.phi_text(str(rng.integers(10**7, 10**9)), "A{token}")
        study = {
            "patient": patient,
            "index": s,
            "part": part,
            "day": day,
            "age_days": age_days,
            "modality": modality,
            "vendor": vendor if rng.random() > 0.04 else None,
            "StudyInstanceUID": self.uid("study", pix),
            "AccessionNumber": accession,
            "StudyID": self.phi_text(str(rng.integers(1000, 99999)), "{token}"),
            "InstitutionName": self.phi_text(self.pick(_HOSPITALS)),
            "InstitutionAddress": self.phi_text(f"{rng.integers(1, 99)} {self.pick(_STREETS)}, {self.pick(_CITIES)}"),
            "ReferringPhysicianName": self.name(self.pick(("M", "F"))),
            "folder": f"{_da(day)}_{accession}" if rng.random() < 0.5 else f"STU{s + 1:04d}",
            "age_mode": str(rng.choice(["age", "dates", "age_only", "none"], p=[0.6, 0.3, 0.05, 0.05])),
            "part_mode": str(rng.choice(["tag", "description", "protocol", "none"], p=[0.68, 0.17, 0.08, 0.07])),
            "free_text": bool(rng.random() < 0.3),
        }
        self.hosts.append(study)
        specs: list[dict[str, Any]] = []
        laterality = str(rng.choice(["L", "R"])) if part in SIDED else None
        for k in range(int(rng.integers(1, 3))):
            if len(specs) >= room:
                break
            # The usual pair: a frontal series, then a lateral one where the part has a lateral phantom.
            lateral = k == 1 and "LAT" in VIEWS[part] and rng.random() < 0.75
            series = {
                "index": k,
                "SeriesInstanceUID": self.uid("series", pix, k),
                "laterality": laterality,
                "view": "LAT" if lateral else None,
            }
            for i in range(int(rng.integers(1, 3))):
                if len(specs) >= room:
                    break
                specs.append(self._image(study, series, i, "radiograph"))
        return specs

    def _size(self, part: str) -> tuple[int, int]:
        if self.args["shape"] is not None:
            return int(self.args["shape"][0]), int(self.args["shape"][1])
        long_side = int(self.rng.integers(self.args["min_size"], self.args["max_size"] + 1))
        return default_shape(part, long_side)

    def _image(self, study: dict[str, Any], series: dict[str, Any], i: int, kind: str) -> dict[str, Any]:
        """One image's complete header plan plus what the worker needs to draw its pixels."""
        rng = self.rng
        patient = study["patient"]
        part = study["part"]
        index = len(self.phi["uids"])  # unique per call: UIDs are appended below
        sop = self.uid("image", patient["index"], study["index"], series["index"], i, kind, index)
        rows, cols = self._size(part)
        bits = int(self.args["bits_stored"] or self.pick((10, 12, 12, 12, 14, 15, 16)))
        mono1 = rng.random() < (0.35 if study["modality"] == "CR" else 0.12)
        syntax = str(rng.choice(self.syntaxes, p=self.syntax_p))
        if syntax == "JPEG2000Lossless" and min(rows, cols) < 32:
            syntax = "ExplicitVRLittleEndian"  # OpenJPEG's 6 wavelet levels need 32 pixels per side
        view = self.pick(_VIEWS.get(part, ("PA",) if part == "hand" else ("AP",)))
        if part == "chest" and study["age_days"] < 3 * 365:
            view = "AP"  # infants are imaged supine
        view = series.get("view") or view
        header: dict[str, Any] = {}
        # Descriptions: the body part may live in the tag, in a description, in the protocol, or nowhere.
        phrase = self.pick(_PART_PHRASES[part])
        vague = self.pick(_VAGUE_PHRASES)
        mode = study["part_mode"]
        named = mode == "description" or (mode == "tag" and rng.random() < 0.6)
        study_desc = phrase if named else vague
        free = self.pick(_FREE_TEXT)
        if self.marker or study["free_text"]:
            study_desc = self.phi_text(study_desc, "{plain} pt {token} " + free)
        header["StudyDescription"] = study_desc
        series_desc = f"{view}" if mode != "description" or rng.random() < 0.5 else f"{phrase} {view}"
        header["SeriesDescription"] = self.phi_text(series_desc, "{plain} {token}") if self.marker else series_desc
        protocol = phrase if mode == "protocol" else (vague if mode == "none" else self.pick((phrase, vague)))
        if rng.random() < 0.85 or mode == "protocol":
            header["ProtocolName"] = self.phi_text(protocol, "{plain} {token}") if self.marker else protocol
        if mode == "tag":
            header["BodyPartExamined"] = self.pick(_PART_TAGS[part]).strip()
        elif rng.random() < 0.3:
            header["BodyPartExamined"] = ""  # present but empty, as some modalities write it
        # Age: PatientAge, or birth and study dates, or both, or neither.
        age_mode = study["age_mode"]
        if age_mode in ("age", "age_only"):
            header["PatientAge"] = _age_string(study["age_days"])
        if age_mode in ("age", "dates"):
            header["PatientBirthDate"] = self.date(patient["birth"])
        study_date = self.date(study["day"]) if age_mode != "none" or rng.random() < 0.5 else None
        if age_mode == "age_only" and rng.random() < 0.5:
            study_date = None
        sex_tag = patient["sex"] if rng.random() > 0.03 else ""
        view_tag = (self.pick(_LATERAL_TAGS) if view == "LAT" else view) if rng.random() > 0.1 else None
        laterality = series["laterality"]
        lat_tags: dict[str, str] = {}
        if laterality is not None:
            where = self.pick(("Laterality", "ImageLaterality", "both", "none"))
            if where in ("Laterality", "both"):
                lat_tags["Laterality"] = laterality
            if where in ("ImageLaterality", "both"):
                lat_tags["ImageLaterality"] = laterality
        slope, intercept = self.pick(((1.0, 0.0),) * 6 + ((1.0, -1024.0), (2.0, 0.0), (1.0, 100.0)))
        rescale_tags = rng.random() < 0.5 or (slope, intercept) != (1.0, 0.0)
        # A few devices store signed pixels with an intercept that shifts them back (uncompressed or RLE here).
        signed = syntax in ("ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "RLELossless") and rng.random() < 0.1
        window = str(rng.choice(["single", "multi", "voi_lut", "none"], p=[0.45, 0.12, 0.13, 0.3]))
        if window == "voi_lut" and (signed or intercept < 0 or slope * (2**bits - 1) + intercept > 65535):
            window = "single"  # a VOI LUT's first mapped value is an unsigned 16-bit number here
        spacing_tag = self.pick(("ImagerPixelSpacing", "PixelSpacing", "both", "none"))
        series_number = series["index"] + 1
        name_style = self.pick(("IM{n:06d}.dcm", "IM{n:06d}.dcm", "IM{n:06d}", "I{n:07d}.DCM", "{uid}.dcm"))
        n_global = len(self.phi["markers"]) + len(self.phi["uids"])
        filename = name_style.format(n=n_global, uid=sop)
        series_folder = f"SER{series_number:04d}" if rng.random() < 0.7 else f"S{series_number:03d}_{view}"
        rel = self.unique("/".join([patient["folder"], study["folder"], series_folder, filename]))
        field_mm = field_of_view(part, Body(study["age_days"] / 365.25, patient["sex"])) * rng.uniform(0.93, 1.07)
        truth = {
            "body_part": part,
            "body_part_header": {"tag": "tag", "description": "description", "protocol": "description"}.get(mode),
            "age_years": int(study["age_days"] // 365.25),
            "age_header": {"age": "age", "age_only": "age", "dates": "dates"}.get(age_mode),
            "sex": patient["sex"],
            "sex_header": bool(sex_tag),
            "view": view,
            "view_header": view_tag is not None,
            "laterality": laterality,
            "laterality_header": bool(lat_tags),
            "modality": study["modality"],
            "manufacturer": study["vendor"][1] if study["vendor"] else None,
            "patient_id": patient["PatientID"],
            "study_uid": study["StudyInstanceUID"],
            "sop_instance_uid": sop,
        }
        if "findings" in self.args:
            truth["finding"] = None  # `_findings` picks the chest radiographs that get one
        return {
            "kind": kind,
            "rel": rel,
            "pixel_seed": [self.seed, n_global, 0xB0DE],
            "part": part,
            "age_years": study["age_days"] / 365.25,
            "sex": patient["sex"],
            "laterality": laterality,
            "rows": rows,
            "cols": cols,
            "field_mm": field_mm,
            "bits_stored": bits,
            "mono1": bool(mono1),
            "syntax": syntax,
            "slope": slope,
            "intercept": intercept,
            "rescale_tags": bool(rescale_tags or signed),
            "signed": bool(signed),
            "window": window,
            "spacing_tag": spacing_tag,
            "masks": bool(self.args["masks"]) and kind == "radiograph" and part in MASK_STRUCTURES,
            "header": header,
            "study_date": study_date,
            "sex_tag": sex_tag,
            "view": view,
            "view_tag": view_tag,
            "lat_tags": lat_tags,
            "sop": sop,
            "study": self._study_header(study),
            "series": {
                "SeriesInstanceUID": series["SeriesInstanceUID"],
                "SeriesNumber": series_number,
                "InstanceNumber": i + 1,
            },
            "finding": None,
            "truth": truth,
        }

    def _study_header(self, study: dict[str, Any]) -> dict[str, Any]:
        """Study-level identifying values, planned once per study and shared by its files."""
        if "header" in study:
            return dict(study["header"])
        patient = study["patient"]
        rng = self.rng
        pix = patient["index"] * 100 + study["index"]
        header = {
            "PatientName": patient["PatientName"],
            "PatientID": patient["PatientID"],
            "IssuerOfPatientID": patient["IssuerOfPatientID"],
            "PatientAddress": patient["PatientAddress"],
            "PatientTelephoneNumbers": patient["PatientTelephoneNumbers"],
            "PatientMotherBirthName": patient["PatientMotherBirthName"],
            "OtherPatientID": patient["OtherPatientID"],
            "StudyInstanceUID": study["StudyInstanceUID"],
            "AccessionNumber": study["AccessionNumber"],
            "StudyID": study["StudyID"],
            "InstitutionName": study["InstitutionName"],
            "InstitutionAddress": study["InstitutionAddress"],
            "ReferringPhysicianName": study["ReferringPhysicianName"],
            "Modality": study["modality"],
            "Manufacturer": study["vendor"][0] if study["vendor"] else None,
            "ManufacturerModelName": self.pick(
                ("DigitalDiagnost", "Ysio Max", "Definium 8000", "FCR Capsula", "DX-D 300")
            ),
            "StationName": self.phi_text(f"XR{rng.integers(1, 20):02d}", "XR{token}"),
            "InstitutionalDepartmentName": self.phi_text(self.pick(("Radiology", "Emergency", "Orthopaedics"))),
            "PerformingPhysicianName": self.name(self.pick(("M", "F"))),
            "OperatorsName": self.name(self.pick(("M", "F"))),
            "DeviceSerialNumber": self.phi_text(str(rng.integers(10**5, 10**7)), "{token}"),
            "AdditionalPatientHistory": self.phi_text(self.pick(_FREE_TEXT), "{plain}, seen by {token}"),
            "PatientComments": self.phi_text("allergic to contrast", "{plain}; contact {token}"),
            "ImageComments": self.phi_text("repeat exposure", "{plain} {token}"),
            "RequestedProcedureID": self.phi_text(str(rng.integers(10**5, 10**6)), "{token}"),
            "ScheduledProcedureStepID": self.phi_text(str(rng.integers(10**5, 10**6)), "{token}"),
            "RequestedProcedureDescription": self.phi_text("XR as ordered", "XR ordered by {token}"),
            "ReasonForTheRequestedProcedure": self.phi_text(
                f"{self.pick(_FREE_TEXT)} - {patient['PatientName'].replace('^', ' ')}", "{plain} {token}"
            ),
            "ReferencedStudyUID": self.uid("refstudy", pix),
            "RequestingPhysician": self.name(self.pick(("M", "F"))),
            "PrivateNote": self.phi_text(f"export for {patient['PatientName'].replace('^', ' ')}", "{plain} {token}"),
            "PrivateID": self.phi_text(str(rng.integers(10**5, 10**6)), "{token}"),
            "ReferringPhysicianInstitution": self.phi_text(self.pick(_HOSPITALS)),
        }
        study["header"] = header
        return dict(header)

    def _hostile(self, kind: str, k: int, radiographs: list[dict[str, Any]]) -> dict[str, Any]:
        rng = self.rng
        if kind == "duplicate":
            source = radiographs[int(rng.integers(len(radiographs)))]
            parts = source["rel"].split("/")
            rel = self.unique("/".join([*parts[:-2], parts[-2] + "_COPY", parts[-1]]))
            return {"kind": kind, "rel": rel, "source": source["rel"]}
        if kind == "dicomdir":
            # The first index sits at the top of the export, as on a disc; later ones in patient folders.
            first = k == HOSTILE_KINDS.index("dicomdir")
            folder = "" if first else self.pick(self.hosts)["patient"]["folder"] + "/"
            if f"{folder}DICOMDIR" in self.used_paths:
                folder += f"DISC{k:03d}/"  # a second disc's index
            rel = self.unique(f"{folder}DICOMDIR")
            chosen = radiographs[: int(rng.integers(1, 4))]
            records = [{"rel": r["rel"], "sop": r["sop"], "study": r["study"]} for r in chosen]
            return {"kind": kind, "rel": rel, "records": records}
        if kind in ("not_dicom", "empty"):
            host = self.pick(self.hosts)
            base = f"{host['patient']['folder']}/{host['folder']}"
            if kind == "empty":
                return {"kind": kind, "rel": self.unique(f"{base}/IM{k:06d}.dcm")}
            flavour = self.pick(("text", "jpeg", "thumbs", "html"))
            if k == HOSTILE_KINDS.index("not_dicom"):
                flavour = "text"
            name = {
                "text": "README.TXT",
                "jpeg": f"{base}/IM{k:06d}.dcm",
                "thumbs": f"{base}/Thumbs.db",
                "html": f"{base}/INDEX.HTM",
            }[flavour]
            return {"kind": kind, "rel": self.unique(name), "flavour": flavour, "pixel_seed": [self.seed, k, 0x0BAD]}
        # DICOM kinds that belong to a patient: a new series in an existing study.
        host = self.pick(self.hosts)
        series = {
            "index": 50 + k,
            "SeriesInstanceUID": self.uid("series", host["patient"]["index"] * 100 + host["index"], 50 + k),
            "laterality": str(rng.choice(["L", "R"])) if host["part"] in SIDED else None,
        }
        spec = self._image(host, series, 0, kind)
        if kind in ("absurd_dims", "rgb", "ct"):
            spec["syntax"] = "ExplicitVRLittleEndian"  # encoders would reject these; real files are often raw too
        if kind == "ct":
            spec["truth"]["modality"] = "CT"
        return spec


# --- rendering: one file per call, in worker processes ---


def _render_all(root: Path, specs: list[dict[str, Any]], workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    jobs = [(str(root), spec) for spec in specs]
    bar = tqdm(total=len(jobs), desc="synth", unit="file", disable=not progress)
    results: list[dict[str, Any]] = []
    if workers == 1:
        for job in jobs:
            results.append(_render_one(job))
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: workers start clean whatever the parent imported (threads, CUDA, tqdm monitors).
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(_render_one, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 4)))):
                results.append(result)
                bar.update()
    bar.close()
    return results


def _render_one(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    root, spec = Path(job[0]), job[1]
    path = root / spec["rel"]
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = spec["kind"]
    if kind == "duplicate":
        return {}  # copied by the parent once its source exists
    if kind == "empty":
        path.write_bytes(b"")
        return {"kind": kind, "duplicate": False}
    if kind == "not_dicom":
        path.write_bytes(_not_dicom_bytes(spec))
        return {"kind": kind, "duplicate": False}
    if kind == "dicomdir":
        with _lenient_writing():
            _write_dicomdir(path, spec)
        return {"kind": kind, "duplicate": False}
    return _write_image(root, path, spec)


def _not_dicom_bytes(spec: dict[str, Any]) -> bytes:
    rng = np.random.default_rng(spec["pixel_seed"])
    flavour = spec["flavour"]
    if flavour == "text":
        return b"PACS export\r\nThis disc contains medical images. Open DICOMDIR with a DICOM viewer.\r\n"
    if flavour == "html":
        return b"<html><head><title>Image index</title></head><body><p>Export index</p></body></html>\n"
    if flavour == "jpeg":
        import cv2

        thumb = (rng.random((32, 32)) * 255).astype(np.uint8)
        return bytes(cv2.imencode(".jpg", thumb)[1].tobytes())
    return bytes(rng.integers(0, 256, size=int(rng.integers(512, 4096)), dtype=np.uint8).tobytes())


def _write_dicomdir(path: Path, spec: dict[str, Any]) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import UID, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(_DICOMDIR_SOP)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(_uid(0, "dicomdir", spec["rel"]))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = "EXPORT"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    records = []
    for ref in spec["records"]:
        study = ref["study"]
        patient = Dataset()
        patient.DirectoryRecordType = "PATIENT"
        patient.PatientName = study["PatientName"]
        patient.PatientID = study["PatientID"]
        image = Dataset()
        image.DirectoryRecordType = "IMAGE"
        image.ReferencedFileID = ref["rel"].upper().split("/")[-4:]
        image.ReferencedSOPInstanceUIDInFile = ref["sop"]
        image.ReferencedSOPClassUIDInFile = _DX_SOP
        records += [patient, image]
    ds.DirectoryRecordSequence = DicomSequence(records)
    ds.save_as(path, enforce_file_format=True)


def _write_image(root: Path, path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Draw, encode and write one DICOM image (radiograph or a hostile image kind); returns its ground truth."""
    import cv2

    rng = np.random.default_rng(spec["pixel_seed"])
    kind = spec["kind"]
    bits = spec["bits_stored"]
    truth = dict(spec["truth"])
    truth.update(kind=kind, duplicate=False)
    masks: dict[str, np.ndarray] = {}
    with _lenient_writing():
        if kind == "ct":
            ds, written = _ct_dataset(spec, rng)
        else:
            finding = spec["finding"]
            image, masks = make_radiograph(
                spec["part"],
                spec["age_years"],
                spec["sex"],
                (spec["rows"], spec["cols"]),
                rng,
                bits_stored=bits,
                laterality=spec["laterality"],
                field_mm=spec["field_mm"],
                view=spec["view"],
                finding=finding,
                finding_rng=None if finding is None else np.random.default_rng([*spec["pixel_seed"], 0xF1D]),
            )
            if kind == "rgb":
                ds, written = _rgb_dataset(spec, image, bits)
            else:
                if kind == "burned_in":
                    _burn_in_text(image, spec, bits)
                ds, written = _radiograph_dataset(spec, image, rng)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    if kind == "truncated":
        data = _truncate(data, rng)
    path.write_bytes(data)
    truth.update(written)
    if spec["masks"]:
        truth["masks"] = {}
        for structure, mask in masks.items():
            stem = path.name[:-4] if path.name.lower().endswith(".dcm") else path.name
            mask_path = path.with_name(f"{stem}_{structure}.png")
            cv2.imwrite(str(mask_path), mask, [cv2.IMWRITE_PNG_COMPRESSION, 6])
            truth["masks"][structure] = mask_path.relative_to(root).as_posix()
    return truth


@contextlib.contextmanager
def _lenient_writing() -> Iterator[None]:
    """Write values as real devices do (lower-case CS, over-long strings) instead of warning about them."""
    from pydicom import config

    with config.disable_value_validation():
        yield


def _truncate(data: bytes, rng: np.random.Generator) -> bytes:
    """Cut inside the pixel data, as an interrupted copy leaves a file."""
    start = data.rfind(b"\xe0\x7f\x10\x00")
    start = start + 12 if start > 0 else len(data) // 2
    return data[: start + int((len(data) - start) * rng.uniform(0.1, 0.9))]


def _burn_in_text(image: np.ndarray, spec: dict[str, Any], bits: int) -> None:
    import cv2

    rows, cols = image.shape
    canvas = np.zeros(image.shape, np.uint8)
    text = spec["study"]["PatientName"].replace("^", " ")[:24]
    scale = max(rows, cols) / 900.0
    cv2.putText(
        canvas, text, (int(cols * 0.05), int(rows * 0.08)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(int(2 * scale), 1)
    )
    image[canvas > 0] = 2**bits - 1


def _base_dataset(spec: dict[str, Any], sop_class: str) -> Any:
    """Patient, study, series and equipment modules with every identifying value a real header carries."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import UID

    study = spec["study"]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = spec["sop"]
    ds.file_meta.SourceApplicationEntityTitle = "PACS_EXPORT"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = spec["sop"]
    if spec["study_date"] is not None:
        for tag in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            setattr(ds, tag, spec["study_date"])
    ds.StudyTime = "101530"
    ds.AccessionNumber = study["AccessionNumber"]
    ds.Modality = study["Modality"]
    if study["Manufacturer"] is not None:
        ds.Manufacturer = study["Manufacturer"]
    ds.InstitutionName = study["InstitutionName"]
    ds.InstitutionAddress = study["InstitutionAddress"]
    ds.ReferringPhysicianName = study["ReferringPhysicianName"]
    referring = Dataset()
    referring.InstitutionName = study["ReferringPhysicianInstitution"]
    referring.PersonTelephoneNumbers = study["PatientTelephoneNumbers"]
    ds.ReferringPhysicianIdentificationSequence = DicomSequence([referring])
    ds.StationName = study["StationName"]
    for key in (
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "BodyPartExamined",
        "PatientAge",
        "PatientBirthDate",
    ):
        if key in spec["header"]:
            setattr(ds, key, spec["header"][key])
    ds.InstitutionalDepartmentName = study["InstitutionalDepartmentName"]
    ds.PerformingPhysicianName = study["PerformingPhysicianName"]
    ds.OperatorsName = study["OperatorsName"]
    ds.ManufacturerModelName = study["ManufacturerModelName"]
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = study["ReferencedStudyUID"]
    ds.ReferencedStudySequence = DicomSequence([ref_study])
    ds.PatientName = study["PatientName"]
    ds.PatientID = study["PatientID"]
    ds.IssuerOfPatientID = study["IssuerOfPatientID"]
    if spec["sex_tag"]:
        ds.PatientSex = spec["sex_tag"]
    other = Dataset()
    other.PatientID = study["OtherPatientID"]
    other.IssuerOfPatientID = study["IssuerOfPatientID"]
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = DicomSequence([other])
    ds.PatientAddress = study["PatientAddress"]
    ds.PatientTelephoneNumbers = study["PatientTelephoneNumbers"]
    ds.PatientMotherBirthName = study["PatientMotherBirthName"]
    ds.AdditionalPatientHistory = study["AdditionalPatientHistory"]
    ds.PatientComments = study["PatientComments"]
    ds.DeviceSerialNumber = study["DeviceSerialNumber"]
    ds.SoftwareVersions = "5.2.1"
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.SeriesInstanceUID = spec["series"]["SeriesInstanceUID"]
    ds.StudyID = study["StudyID"]
    ds.SeriesNumber = spec["series"]["SeriesNumber"]
    ds.InstanceNumber = spec["series"]["InstanceNumber"]
    ds.ImageComments = study["ImageComments"]
    ds.RequestingPhysician = study["RequestingPhysician"]
    request = Dataset()
    request.RequestedProcedureID = study["RequestedProcedureID"]
    request.ScheduledProcedureStepID = study["ScheduledProcedureStepID"]
    request.RequestedProcedureDescription = study["RequestedProcedureDescription"]
    request.ReasonForTheRequestedProcedure = study["ReasonForTheRequestedProcedure"]
    ds.RequestAttributesSequence = DicomSequence([request])
    block = ds.private_block(0x0029, "RADSYNTH PACS 1.0", create=True)
    block.add_new(0x10, "LO", study["PrivateNote"])
    block.add_new(0x11, "SH", study["PrivateID"])
    block.add_new(0x12, "LT", f"{study['PatientName']} {study['PatientAddress']}")
    return ds


def _radiograph_dataset(spec: dict[str, Any], image: np.ndarray, rng: np.random.Generator) -> tuple[Any, dict]:
    import pydicom.uid
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.pixels import get_encoder
    from pydicom.sequence import Sequence as DicomSequence

    modality = spec["study"]["Modality"]
    ds = _base_dataset(spec, _CR_SOP if modality == "CR" else _DX_SOP)
    bits = spec["bits_stored"]
    top = 2**bits - 1
    # Stored values: MONOCHROME1 inverts; rescale maps stored -> modality output (slope * stored + intercept).
    slope, intercept = spec["slope"], spec["intercept"]
    values = image if slope == 1.0 else image // np.uint16(slope)  # slopes are whole numbers here
    stored = np.subtract(np.uint16(top), values) if spec["mono1"] else values
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if spec["mono1"] else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    allocated = 8 if bits <= 8 else 16  # 8-bit images are stored in single bytes, as devices do
    ds.BitsAllocated = allocated
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    pixels = stored.astype(np.uint8) if allocated == 8 else stored
    if spec["signed"]:
        shift = 2 ** (bits - 1)
        pixels = (stored.astype(np.int32) - shift).astype(np.int8 if allocated == 8 else np.int16)
        ds.PixelRepresentation = 1
        intercept += shift * slope  # same modality output as the unsigned values
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if spec["mono1"] else "IDENTITY"
    if spec["view_tag"] is not None:
        ds.ViewPosition = spec["view_tag"]
    for key, value in spec["lat_tags"].items():
        setattr(ds, key, value)
    ds.BurnedInAnnotation = "YES" if spec["kind"] == "burned_in" else "NO"
    ds.KVP = float(rng.choice([55, 60, 70, 81, 90, 102, 125]))
    ds.ExposureTime = int(rng.integers(3, 40))
    ds.XRayTubeCurrent = int(rng.integers(100, 500))
    if spec["rescale_tags"]:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
    mm = spec["field_mm"] / max(spec["rows"], spec["cols"])
    spacing = (mm, mm)
    spacing_values = [f"{spacing[0]:.4f}", f"{spacing[1]:.4f}"]
    if spec["spacing_tag"] in ("ImagerPixelSpacing", "both"):
        ds.ImagerPixelSpacing = spacing_values
    if spec["spacing_tag"] in ("PixelSpacing", "both"):
        ds.PixelSpacing = spacing_values
    # Window in modality-output units from the tissue range, as the modality would pick it.
    step = (max(1, pixels.shape[0] // 128), max(1, pixels.shape[1] // 128))
    lo, hi = np.percentile(pixels[:: step[0], :: step[1]], [1, 99])
    lo, hi = lo * slope + intercept, hi * slope + intercept
    center = float((lo + hi) / 2 * rng.uniform(0.95, 1.05))
    width = float(max(hi - lo, 2.0) * rng.uniform(0.8, 1.2))
    window: dict[str, Any] = {"window": spec["window"]}
    if spec["window"] in ("single", "multi"):
        centers, widths = [round(center)], [round(width)]
        if spec["window"] == "multi":
            centers.append(round(center * 1.1))
            widths.append(round(width * 0.6))
        ds.WindowCenter = centers if len(centers) > 1 else centers[0]
        ds.WindowWidth = widths if len(widths) > 1 else widths[0]
        if rng.random() < 0.3:
            ds.WindowCenterWidthExplanation = ["DEFAULT", "BONE"][: len(centers)]
        window.update(window_center=centers[0], window_width=widths[0])
    elif spec["window"] == "voi_lut":
        first, last = int(max(lo, 0)), int(max(hi, lo + 2))
        entries = min(last - first + 1, 65535)
        ramp = 1.0 / (1.0 + np.exp(-8.0 * (np.arange(entries) / max(entries - 1, 1) - 0.5)))
        lut = Dataset()
        lut.LUTDescriptor = [entries, first, 12]
        lut.LUTExplanation = "NORMAL"
        lut["LUTData"] = DataElement(0x00283006, "OW", np.rint(ramp * 4095).astype("<u2").tobytes())
        ds.VOILUTSequence = DicomSequence([lut])
        window.update(voi_lut_first=first, voi_lut_entries=entries)
    syntax = spec["syntax"]
    uid = getattr(pydicom.uid, syntax)
    if uid.is_compressed and not get_encoder(uid).is_available:
        syntax, uid = "ExplicitVRLittleEndian", pydicom.uid.ExplicitVRLittleEndian
    if spec["kind"] == "no_pixels":
        uid = pydicom.uid.ExplicitVRLittleEndian if uid.is_compressed else uid
        ds.file_meta.TransferSyntaxUID = uid
    elif uid.is_compressed:
        ds.compress(uid, pixels, encoding_plugin=_encoder_plugin(uid), generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = uid
        ds.PixelData = pixels.tobytes()
    if spec["kind"] == "absurd_dims":
        ds.Rows, ds.Columns = 48000, 52000
    written = {
        "photometric": ds.PhotometricInterpretation,
        "bits_stored": bits,
        "transfer_syntax": str(uid.name),
        "rows": int(stored.shape[0]),
        "cols": int(stored.shape[1]),
        "spacing_mm": [round(spacing[0], 4), round(spacing[1], 4)],
        "rescale": [slope, intercept],
        "pixel_representation": int(ds.PixelRepresentation),
        **window,
    }
    return ds, written


def _encoder_plugin(uid: Any) -> str:
    """The encoder to use: GDCM's RLE encoder aborts the whole process on some 8-bit images (a C++
    terminate, not a Python error), so RLE prefers pylibjpeg-rle, then pydicom's own encoder."""
    from pydicom.pixels import get_encoder

    plugins = get_encoder(uid).available_plugins
    for name in ("pylibjpeg", "pyjpegls", "pydicom"):
        if name in plugins:
            return name
    return ""  # let pydicom choose


def _rgb_dataset(spec: dict[str, Any], image: np.ndarray, bits: int) -> tuple[Any, dict]:
    """A colour screenshot of the radiograph with a coloured annotation, as secondary capture."""
    import cv2
    import pydicom.uid

    gray = (image.astype(np.float32) * (255.0 / (2**bits - 1))).astype(np.uint8)
    rgb = np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    rows, cols = gray.shape
    cv2.circle(rgb, (cols // 2, rows // 2), max(rows, cols) // 6, (255, 40, 40), max(rows // 100, 1))
    ds = _base_dataset(spec, _SC_SOP)
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    # No BurnedInAnnotation tag: one reason to skip per hostile kind (colour), as many screenshots carry none.
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PixelData = rgb.tobytes()
    return ds, {
        "photometric": "RGB",
        "bits_stored": 8,
        "transfer_syntax": "Explicit VR Little Endian",
        "rows": rows,
        "cols": cols,
    }


def _ct_dataset(spec: dict[str, Any], rng: np.random.Generator) -> tuple[Any, dict]:
    """An axial CT slice (Hounsfield units via rescale): a torso with lungs and a spine."""
    import cv2
    import pydicom.uid

    size = int(min(512, max(spec["rows"], spec["cols"])))
    hu = np.full((size, size), -1000.0, np.float32)
    c = size // 2
    cv2.ellipse(hu, (c, c), (int(size * 0.42), int(size * 0.3)), 0, 0, 360, 40.0, -1)
    for side in (-1, 1):
        cv2.ellipse(hu, (c + side * size // 6, c - size // 30), (size // 9, size // 6), 0, 0, 360, -850.0, -1)
    cv2.circle(hu, (c, c + size // 5), max(size // 20, 1), 700.0, -1)
    hu += rng.normal(0, 12, hu.shape).astype(np.float32)
    stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.int16)
    ds = _base_dataset(spec, _CT_SOP)
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = size, size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.SliceThickness = "1.25"
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-180, -180, float(rng.uniform(-300, 0))]
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PixelData = stored.tobytes()
    return ds, {
        "photometric": "MONOCHROME2",
        "bits_stored": 16,
        "transfer_syntax": "Explicit VR Little Endian",
        "rows": size,
        "cols": size,
    }


def iter_files(root: str | Path) -> Iterator[Path]:
    """Every file of the export itself in a stable order: not synth.json, masks.csv or the mask PNGs."""
    skip = {SYNTH_JSON, MASKS_CSV, _PARTIAL}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.name not in skip and not path.name.endswith(".png"):
            yield path


def checksum(root: str | Path) -> int:
    """CRC32 over every file's relative path and bytes (for determinism checks)."""
    value = 0
    root = Path(root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        value = zlib.crc32(path.relative_to(root).as_posix().encode(), value)
        value = zlib.crc32(path.read_bytes(), value)
    return value
