"""Header-only pass over a source folder -> one row per file (pseudonyms, labels, a status and a reason)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from radpretrain import files
from radpretrain.config import build, to_dict
from radpretrain.errors import ConfigError, ShardError
from radpretrain.shards import deid, labels
from radpretrain.shards.format import SCHEMA_VERSION
from radpretrain.shards.plain import IMAGE_SUFFIXES, PlainOptions, image_row, load_metadata_table
from radpretrain.shards.pool import WorkerPool, setup_process

log = logging.getLogger(__name__)

INDEX_FILE = "index.jsonl"
INDEX_META = "index.json"
PATHS_FILE = "paths.jsonl"
#: Below this many files the pool's start-up (a second or two per worker) costs more than it saves.
POOL_MIN_FILES = 64
#: Files per task sent to a pool worker: large enough that the per-task pickling is noise (~1 ms of
#: headers per file), small enough that the progress bar moves and the workers finish together.
POOL_CHUNK = 64
PROJECTION_MODALITIES: tuple[str, ...] = ("CR", "DX", "MG", "RF", "XA", "DR")

# Reasons are fixed identifiers (never header text): they name why a file is not a sample.
# The phrases match those of `dicom.read_dicom` where both name the same thing.
NOT_DICOM = "not a DICOM file"
UNREADABLE_HEADER = "unreadable DICOM header"
MISSING_UID = "missing SOPInstanceUID"
NOT_AN_IMAGE = "not an image"
EMPTY = "empty file"
UNREADABLE_FILE = "unreadable file"
MODALITY = "modality not selected"
BURNED_IN = "burned-in annotation"
_COLOUR_NAMES = frozenset(
    {"RGB", "ARGB", "CMYK", "HSV", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
    | {"YBR_PARTIAL_420", "YBR_PARTIAL_422"}
)

#: Header elements the index needs; reading only these makes the pass several times faster.
HEADER_TAGS: tuple[str, ...] = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "PatientAge",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "Manufacturer",
    "BurnedInAnnotation",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsStored",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SpecificCharacterSet",
)


@dataclass
class IndexOptions:
    """What the index selects and how it labels; part of the plan, so changing it means a new plan."""

    modalities: list[str] = field(default_factory=lambda: list(PROJECTION_MODALITIES))
    include_burned_in: bool = False
    #: PNG/JPEG files: sharded when the source holds no DICOM file ("auto"), always ("yes") or never ("no");
    #: otherwise they count as "not a DICOM file" (thumbnails and screenshots in a PACS export).
    images: Literal["auto", "yes", "no"] = "auto"
    age_buckets: list[str] = field(default_factory=lambda: list(labels.DEFAULT_AGE_BUCKETS))
    plain: PlainOptions = field(default_factory=PlainOptions)

    def validate(self) -> None:
        labels.AgeBuckets.parse(self.age_buckets)
        self.modalities = [m.strip().upper() for m in self.modalities if m.strip()]
        if not self.modalities:
            raise ConfigError("no modality to shard; give at least one, e.g. --modalities CR,DX")


@dataclass
class Index:
    """An index as read back: its meta block and its rows (in source order)."""

    meta: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def options(self) -> IndexOptions:
        return build(IndexOptions, self.meta["options"])


def private_dir_for(out: str | Path, private_dir: str | Path | None = None) -> Path:
    """The private folder of a run: `private_dir` when given, else `OUT.private/` beside OUT."""
    return (
        Path(private_dir).expanduser().resolve()
        if private_dir
        else default_private_dir(Path(out).expanduser().resolve())
    )


def default_private_dir(out: str | Path) -> Path:
    """`OUT.private/` beside OUT: holds the file-path lookup that must not travel with the shards."""
    out = Path(out).expanduser().resolve()
    return out.parent / f"{out.name}.private"


def list_files(src: Path, skip: set[Path] | None = None) -> list[str]:
    """Every regular file under `src` as a sorted POSIX relative path (sorted so plans are reproducible)."""
    skip = skip or set()
    found: list[str] = []
    unreadable: list[OSError] = []
    for root, dirs, filenames in os.walk(src, onerror=unreadable.append):
        dirs.sort()
        for name in sorted(filenames):
            path = Path(root) / name
            # A broken link is kept: it is a file of the export that cannot be read, and is counted as such.
            if path in skip or not (path.is_file() or path.is_symlink()):
                continue
            found.append(path.relative_to(src).as_posix())
    if unreadable:
        # The folder names may hold patient names, so only the count is reported.
        log.warning(
            "warning: %d folder(s) under the source could not be listed (permissions?); their files are not "
            "indexed and not counted",
            len(unreadable),
        )
    found.sort()
    return found


def check_source(src: str | Path, out: str | Path) -> Path:
    src_path = Path(src).expanduser().resolve()
    if not src_path.exists():
        raise ShardError(f"source folder {src} does not exist; give the folder of your DICOM export")
    if not src_path.is_dir():
        raise ShardError(f"source {src} is not a folder; give the folder of your DICOM export")
    if deid.is_inside(Path(out), src_path):
        raise ShardError("the output folder is inside the source folder; choose an output folder elsewhere")
    return src_path


def build_index(
    src: str | Path,
    out: str | Path,
    pseudonymize: deid.Pseudonymizer,
    options: IndexOptions | None = None,
    *,
    private_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    pool: WorkerPool | None = None,
) -> Index:
    """Read every file's header under `src`; write OUT/index.jsonl + index.json and the private path table.

    With `workers` > 1 the headers are read by `pool` (shared with the write pass) or by a pool started here.
    """
    options = options or IndexOptions()
    src_path = check_source(src, out)
    out_path = Path(out).expanduser().resolve()
    private = Path(private_dir).expanduser().resolve() if private_dir else default_private_dir(out_path)
    if deid.is_inside(private, out_path):
        raise ShardError("the private folder must not be inside the output folder; choose --private-dir elsewhere")
    if deid.is_inside(private, src_path):  # a later index of SRC would read the lookup as part of the export
        raise ShardError("the private folder must not be inside the source folder; choose --private-dir elsewhere")
    table, csv_path = load_metadata_table(src_path, options.plain)
    relpaths = list_files(src_path, skip={csv_path} if csv_path else None)
    if not relpaths:
        raise ShardError(f"source folder {src} holds no files; give the folder of your DICOM export")

    rows = list(_index_rows(src_path, relpaths, pseudonymize, options, table, workers, progress, pool))
    has_dicom = any(r["kind"] == "dicom" and r["reason"] not in (NOT_DICOM, EMPTY) for r in rows)
    if options.images == "no" or (options.images == "auto" and has_dicom):
        rows = [{**r, "status": "skipped", "reason": NOT_DICOM} if r["kind"] == "image" else r for r in rows]
    if not any(r["reason"] not in (NOT_DICOM, EMPTY) for r in rows):
        raise ShardError(
            f"source folder {src} holds {len(rows)} files but none is a DICOM file or a PNG/JPEG image; check the path"
        )

    out_path.mkdir(parents=True, exist_ok=True)
    private.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(private, 0o700)
    _write_jsonl(private / PATHS_FILE, ({"file": r["file"], "path": p} for r, p in zip(rows, relpaths, strict=True)))
    _write_json(private / "source.json", {"source": str(src_path)})
    counts: Counter[str] = Counter(f"{r['status']}:{r['reason']}" if r["reason"] else r["status"] for r in rows)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "files": len(rows),
        "source": pseudonymize("source", str(src_path)),
        "key": pseudonymize.fingerprint,
        "options": to_dict(options),
        "counts": dict(sorted(counts.items())),
    }
    _write_jsonl(out_path / INDEX_FILE, rows)
    _write_json(out_path / INDEX_META, meta)  # written last: its presence marks a complete index
    return Index(meta=meta, rows=rows)


def read_index(out: str | Path) -> Index | None:
    """The index in OUT, or None when there is none (or only a partial one)."""
    out_path = Path(out)
    meta_path, rows_path = out_path / INDEX_META, out_path / INDEX_FILE
    if not meta_path.is_file() or not rows_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ShardError(f"the index in {out} is unreadable ({exc}); rerun with --reindex") from None
    if len(rows) != meta.get("files"):
        raise ShardError(f"the index in {out} is incomplete; rerun with --reindex")
    return Index(meta=meta, rows=rows)


def current_index(
    src: str | Path,
    out: str | Path,
    options: IndexOptions,
    pseudonymize: deid.Pseudonymizer,
    *,
    private_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    part: tuple[int, int] | None = None,
    overwrite: bool = False,
    reuse: bool = True,
    pool: WorkerPool | None = None,
) -> Index:
    """The index of `src` in OUT made with this key and these options: the one OUT holds when `reuse` and it
    matches, else built (`build_index`).

    An index in OUT made from another source folder, another key or other options is refused unless
    `overwrite` (then it is replaced), so the shards and the index beside them never disagree. A part of a
    plan (`part=(i, N)`) never builds: all parts must share one index, made first (`radpretrain index`).
    Without `reuse` an unreadable index in OUT counts as none, since it is replaced anyway.
    """
    src_path = check_source(src, out)
    out_path = Path(out).expanduser().resolve()
    existing = None
    if reuse:
        existing = read_index(out_path)
    elif part is None:  # the settings of the index about to be replaced are checked all the same
        with contextlib.suppress(ShardError):
            existing = read_index(out_path)
    if existing is not None:
        problems = _differences(existing, src_path, options, pseudonymize)
        if reuse and not problems:
            log.info(
                "using the index in the output folder (%d files); --reindex reads the headers again", len(existing.rows)
            )
            return existing
        if problems and (part is not None or not overwrite):
            raise ShardError(
                f"the output folder holds an index made from {' and '.join(problems)}; use the same settings, "
                "or rerun with --overwrite to replace it (or choose another output folder)"
            )
    if part is not None:
        raise ShardError(
            "--part needs the index that all parts share: run `radpretrain index SRC OUT` once first "
            "(with the same options), then the parts"
        )
    return build_index(
        src_path,
        out_path,
        pseudonymize,
        options,
        private_dir=private_dir,
        workers=workers,
        progress=progress,
        pool=pool,
    )


def index_source(
    src: str | Path,
    out: str | Path,
    options: IndexOptions,
    *,
    key: str | Path | None = None,
    private_dir: str | Path | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Index:
    """`radpretrain index`: read every header of `src` again into OUT (an index made with other settings is
    refused unless `overwrite`), with the pseudonym key at `key` (created when missing)."""
    out_path = Path(out).expanduser().resolve()
    check_source(src, out_path)  # before the key file is created for a run that cannot start
    pseudonymize = deid.Pseudonymizer(deid.load_key(key, out=out_path))
    return current_index(
        src,
        out_path,
        options,
        pseudonymize,
        private_dir=private_dir_for(out_path, private_dir),
        workers=workers,
        progress=progress,
        overwrite=overwrite,
        reuse=False,
    )


def _differences(index: Index, src: Path, options: IndexOptions, pseudonymize: deid.Pseudonymizer) -> list[str]:
    """What differs between the settings `index` was made with and these ("another source folder", ...)."""
    problems = []
    if index.meta.get("source") != pseudonymize("source", str(src)):
        problems.append("another source folder")
    if index.meta.get("key") != pseudonymize.fingerprint:
        problems.append("another de-identification key")
    old, new = index.meta.get("options") or {}, to_dict(options)
    if old != new:
        changes = files.changed_settings(old, new, keep=("csv_columns",))
        problems.append("other index options" + (f" ({'; '.join(changes)})" if changes else ""))
    return problems


def read_private_paths(private_dir: str | Path) -> tuple[Path, dict[str, str]]:
    """The source folder and the file-pseudonym -> relative-path table kept outside OUT."""
    private = Path(private_dir)
    try:
        source = Path(json.loads((private / "source.json").read_text())["source"])
        lines = (private / PATHS_FILE).read_text().splitlines()
    except (OSError, ValueError, KeyError):
        raise ShardError(
            f"the private path table in {private} is missing or unreadable; rerun with --reindex "
            "(and the same --private-dir as when the index was made)"
        ) from None
    table = {}
    for line in lines:
        if line.strip():
            entry = json.loads(line)
            table[entry["file"]] = entry["path"]
    return source, table


#: A deflated file (PS3.5 A.5) is one deflate stream after its file meta, pixels last: its header is inflated
#: this many compressed bytes at a time until the pixel data element starts, not whole (pydicom inflates the
#: whole file, 40 ms of a 2500 x 2000 image that the index never looks at).
INFLATE_CHUNK = 1 << 16
_PIXEL_DATA = (b"\xe0\x7f\x10\x00OW", b"\xe0\x7f\x10\x00OB")


def read_deflated_header(path: Path) -> Any:
    """The HEADER_TAGS of a Deflated Explicit VR Little Endian file from the inflated bytes before its pixel
    data, with its file meta; None for any other file or anything unexpected (then the caller reads it whole)."""
    import zlib

    from pydicom import uid
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset, read_file_meta_info
    from pydicom.tag import Tag

    with open(path, "rb") as handle:
        head = handle.read(144)
        # Preamble, "DICM", then (0002,0000) UL 4: the file meta group's length, which must be there.
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
            return None
        meta_end = 144 + int.from_bytes(head[140:144], "little")
        if uid.DeflatedExplicitVRLittleEndian.encode() not in handle.read(meta_end - 144):
            return None
        inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), bytearray()
        while chunk := handle.read(INFLATE_CHUNK):
            inflated += inflater.decompress(chunk)
            ends = [at for at in (inflated.find(tag) for tag in _PIXEL_DATA) if at >= 0]
            if ends:
                del inflated[min(ends) :]
                break
        else:
            return None
    try:
        meta = read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") != uid.DeflatedExplicitVRLittleEndian:
            return None
        stream = cast(BinaryIO, DicomBytesIO(bytes(inflated)))
        ds = read_dataset(stream, False, True, specific_tags=[Tag(name) for name in HEADER_TAGS])
    except Exception:  # a damaged stream: the whole read decides what it is
        return None
    ds.file_meta = meta
    return ds


def dicom_row(path: Path, relpath: str, pseudonymize: deid.Pseudonymizer, options: IndexOptions) -> dict[str, Any]:
    """One DICOM file's header -> its index row; any failure becomes a status and a fixed reason."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    row: dict[str, Any] = {"file": pseudonymize("file", relpath), "kind": "dicom", "sop": None}
    try:
        if path.stat().st_size == 0:
            return {**row, "status": "skipped", "reason": EMPTY}
        try:
            ds = read_deflated_header(path) or dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
        except InvalidDicomError:
            # Old exports sometimes lack the 128-byte preamble; accept them only if they look like images.
            try:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS), force=True)
            except Exception:  # garbage read as a dataset fails in many ways; none of them is a DICOM file
                return {**row, "status": "skipped", "reason": NOT_DICOM}
            if "SOPInstanceUID" not in ds or "Rows" not in ds:
                return {**row, "status": "skipped", "reason": NOT_DICOM}
        fields = deid.header_fields(ds, pseudonymize, labels.AgeBuckets.parse(options.age_buckets))
        sop = str(ds.get("SOPInstanceUID") or "").strip()
        rows_, cols = ds.get("Rows"), ds.get("Columns")
        samples = ds.get("SamplesPerPixel") or 1
        photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
        burned = str(ds.get("BurnedInAnnotation") or "").strip().upper()
        frames = ds.get("NumberOfFrames")
        modality = str(ds.get("Modality") or "").strip().upper()
    except OSError:
        return {**row, "status": "failed", "reason": UNREADABLE_FILE}
    except Exception:  # a hostile or truncated header: record it and go on (reason only, never the text)
        return {**row, "status": "failed", "reason": UNREADABLE_HEADER}
    row.update(fields)
    row["frames"] = _int_or(frames, 1)
    if not rows_ or not cols:  # DICOMDIR, reports, presentation states: valid files without an image
        return {**row, "status": "skipped", "reason": NOT_AN_IMAGE}
    if not sop:
        return {**row, "status": "failed", "reason": MISSING_UID}
    row["sop"] = pseudonymize("sop", sop)
    if modality not in options.modalities:
        return {**row, "status": "skipped", "reason": MODALITY}
    if photometric and not photometric.startswith("MONOCHROME"):
        shown = photometric if photometric in _COLOUR_NAMES else "other"
        return {**row, "status": "skipped", "reason": f"colour image (photometric {shown})"}
    if _int_or(samples, 1) > 1:
        return {**row, "status": "skipped", "reason": "colour image (samples per pixel > 1)"}
    if burned == "YES" and not options.include_burned_in:
        return {**row, "status": "skipped", "reason": BURNED_IN}
    return {**row, "status": "ok", "reason": None}


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# Worker-process state, set once by the pool initializer (the key never travels with each task).
_STATE: dict[str, Any] = {}


def _init_state(src: Path, key: bytes, options: dict[str, Any], table: dict[str, dict[str, str]]) -> None:
    _STATE.update(src=src, pseudonymize=deid.Pseudonymizer(key), options=build(IndexOptions, options), table=table)


def _row_for(relpath: str) -> dict[str, Any]:
    src, pseudonymize, options = _STATE["src"], _STATE["pseudonymize"], _STATE["options"]
    path = src / relpath
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return image_row(path, relpath, pseudonymize, options.plain, _STATE["table"], options.age_buckets)
    return dicom_row(path, relpath, pseudonymize, options)


def _rows_for(context: tuple[Path, bytes, dict[str, Any]], relpaths: list[str]) -> list[dict[str, Any]]:
    """A pool worker's chunk of the index; the worker reads the metadata CSV itself, once per context."""
    if _STATE.get("context") != context:
        src, key, options = context
        table, _ = load_metadata_table(src, build(IndexOptions, options).plain)
        _init_state(src, key, options, table)
        _STATE["context"] = context
    return [_row_for(relpath) for relpath in relpaths]


def _index_rows(
    src: Path,
    relpaths: list[str],
    pseudonymize: deid.Pseudonymizer,
    options: IndexOptions,
    table: dict[str, dict[str, str]],
    workers: int,
    progress: bool,
    pool: WorkerPool | None,
) -> Iterator[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=len(relpaths), unit="files", desc="index", disable=not progress, smoothing=0.1)
    try:
        if workers <= 1 or len(relpaths) < POOL_MIN_FILES:
            setup_process()
            _init_state(src, pseudonymize.key, to_dict(options), table)
            _STATE.pop("context", None)
            for relpath in relpaths:
                yield _row_for(relpath)
                bar.update()
            return
        context = (src, pseudonymize.key, to_dict(options))
        chunks = [relpaths[i : i + POOL_CHUNK] for i in range(0, len(relpaths), POOL_CHUNK)]
        with contextlib.ExitStack() as stack:
            if pool is None:
                pool = stack.enter_context(WorkerPool(workers))
            try:
                for rows in pool.executor.map(_rows_for, [context] * len(chunks), chunks):
                    yield from rows
                    bar.update(len(rows))
            except concurrent.futures.process.BrokenProcessPool:
                raise ShardError(
                    "an index worker process died (out of memory?); run the same command again, with fewer --workers"
                ) from None
    finally:
        bar.close()


def _write_jsonl(path: Path, rows: Any) -> None:
    with files.atomic_path(path) as tmp, tmp.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    files.write_text(path, json.dumps(data, indent=1) + "\n")
