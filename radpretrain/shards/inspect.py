"""What a shard folder holds: a composition report from its manifest and a contact sheet of random samples."""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from radpretrain.errors import ShardError
from radpretrain.shards import deid, ocr, reader
from radpretrain.shards.format import ERRORS, STATS_SUFFIX, TAR_SUFFIX, ShardSet
from radpretrain.shards.writer import COMPOSITION_FIELDS

TILE = 192
CAPTION = 34


def composition_report(root: str | Path) -> str:
    """A plain-text report: counts by split and label, errors by reason, shard sizes."""
    manifest = ShardSet.open(root).manifest
    counts = manifest["counts"]
    lines = [
        f"shards in {root}: schema {manifest['schema_version']}, size {manifest['size']}, "
        f"pixels {manifest.get('codec', 'png')}, "
        f"intensity convention {manifest['intensity_convention']}",
        f"files seen {counts['files_seen']}: written {counts['written']}, duplicate {counts['duplicate']}, "
        f"skipped {sum(counts['skipped'].values())}, failed {sum(counts['failed'].values())}; "
        f"samples {counts.get('samples', counts['written'])}",
    ]
    split_parts = []
    for split, entry in manifest["splits"].items():
        size = sum(manifest.get("shard_bytes", {}).get(name, 0) for name in entry["shards"])
        split_parts.append(f"{split} {entry['samples']} ({len(entry['shards'])} shards, {_bytes(size)})")
    lines.append("split: " + ", ".join(split_parts))
    train = len(manifest["splits"].get("train", {}).get("shards", []))
    readers = f"readers: {train} train shard(s) feed up to {train} readers whole (processes x loader workers)"
    lines.append(f"{readers}; more split samples")
    total = max(counts.get("samples", counts["written"]), 1)
    for name in COMPOSITION_FIELDS:
        values = manifest.get("composition", {}).get(name, {})
        shown = ", ".join(
            f"{_label(v)} {n} ({100 * n / total:.0f}%)" for v, n in sorted(values.items(), key=lambda kv: -kv[1])
        )
        lines.append(f"{name}: {shown or '-'}")
    for status in ("skipped", "failed"):
        reasons = counts[status]
        shown = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        lines.append(f"{status}: {shown or '-'}")
    scan = manifest.get("config", {}).get("scan_text", "off")
    if scan != "off":
        withheld = counts["skipped"].get(ocr.REASON, 0)
        lines.append(
            f"burned-in text: {withheld} withheld (--scan-text={scan}); review them with `radpretrain inspect "
            f"{root} --withheld` (a sheet in the private folder)"
        )
    sizes = [
        (entry_samples, manifest.get("shard_bytes", {}).get(name, 0))
        for entry_samples, name in _shard_sample_counts(root, manifest)
    ]
    if sizes:
        samples = [s for s, _ in sizes]
        nbytes = [b for _, b in sizes]
        lines.append(
            f"shard sizes: {len(sizes)} shards, samples min {min(samples)} / median {statistics.median(samples):g} / "
            f"max {max(samples)}, bytes min {_bytes(min(nbytes))} / median {_bytes(int(statistics.median(nbytes)))} / "
            f"max {_bytes(max(nbytes))}, total {_bytes(sum(nbytes))}"
        )
    return "\n".join(lines)


def _shard_sample_counts(root: str | Path, manifest: dict[str, Any]) -> list[tuple[int, str]]:
    import json

    found = []
    for entry in manifest["splits"].values():
        for name in entry["shards"]:
            stats = Path(root) / (name.removesuffix(TAR_SUFFIX) + STATS_SUFFIX)
            try:
                found.append((int(json.loads(stats.read_text())["samples"]), name))
            except (OSError, ValueError, KeyError):
                found.append((0, name))
    return found


def _label(value: str) -> str:
    return "missing" if value in ("None", "") else value


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def random_samples(root: str | Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Up to n samples from random shards of every split, windowed for display."""
    manifest = ShardSet.open(root).manifest
    urls = [str(Path(root) / name) for entry in manifest["splits"].values() for name in entry["shards"]]
    if not urls:
        raise ShardError(f"{root} holds no samples to show")
    rng = random.Random(seed)
    rng.shuffle(urls)
    chosen = urls[: max(1, min(len(urls), n))]
    pipeline = reader.build_pipeline(chosen, shuffle=min(10 * n, 2000), seed=seed)
    samples = []
    for sample in pipeline:
        samples.append(sample)
        if len(samples) >= n:
            break
    return samples


def check_sheet_path(path: str | Path) -> Path:
    """The contact sheet's path, if OpenCV can write its format (it picks the encoder by the extension)."""
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ShardError(f"the contact sheet must be a .png or .jpg file, got '{out.name}'; e.g. --sheet sheet.png")
    return out


def contact_sheet(root: str | Path, path: str | Path, n: int = 48, seed: int = 0, columns: int = 8) -> Path:
    """Write a PNG grid of `n` random samples (windowed as training sees them) captioned with their labels."""
    import cv2

    out = check_sheet_path(path)
    samples = random_samples(root, n, seed)
    columns = max(1, min(columns, len(samples)))
    rows = -(-len(samples) // columns)
    sheet = np.full((rows * (TILE + CAPTION), columns * TILE), 32, dtype=np.uint8)
    for i, sample in enumerate(samples):
        r, c = divmod(i, columns)
        tile = _tile(sample["image"])
        top, left = r * (TILE + CAPTION), c * TILE
        sheet[top : top + TILE, left : left + TILE] = tile
        meta = sample["meta"]
        first = f"{meta['body_part']} {meta.get('view') or ''}".strip()
        second = f"{meta.get('age_bucket') or 'age ?'} {meta.get('sex') or ''} {meta['split']}".strip()
        for line, text in enumerate((first, second)):
            cv2.putText(
                sheet,
                text,
                (left + 4, top + TILE + 13 + 15 * line),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.42,
                230,
                1,
                cv2.LINE_AA,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), sheet):
        raise ShardError(f"could not write the contact sheet to {out}; check the folder exists and is writable")
    return out


def _tile(image01: np.ndarray) -> np.ndarray:
    """Letterbox a [0, 1] image into a TILE x TILE uint8 square."""
    import cv2

    h, w = image01.shape
    scale = TILE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize((image01 * 255).astype(np.uint8), size, interpolation=interpolation)
    tile = np.zeros((TILE, TILE), dtype=np.uint8)
    y, x = (TILE - small.shape[0]) // 2, (TILE - small.shape[1]) // 2
    tile[y : y + small.shape[0], x : x + small.shape[1]] = small
    return tile


WITHHELD_SHEET = "withheld_sheet.png"


def withheld_files(root: str | Path) -> list[str]:
    """Pseudonyms of the files withheld for burned-in text, from ROOT/errors.jsonl (in its order)."""
    path = Path(root) / ERRORS
    try:
        lines = path.read_text().splitlines()
    except OSError:
        raise ShardError(f"{path} is missing; finish the shard run first (run the same command again)") from None
    entries = [json.loads(line) for line in lines if line.strip()]
    return [e["file"] for e in entries if e.get("status") == "skipped" and e.get("reason") == ocr.REASON]


def check_withheld_sheet_path(root: str | Path, private: Path, sheet: str | Path | None) -> Path:
    """The withheld sheet's path (default PRIVATE/withheld_sheet.png); never inside ROOT, whose contents travel."""
    out = check_sheet_path(sheet or private / WITHHELD_SHEET)
    if deid.is_inside(out, Path(root)):
        raise ShardError(
            "the withheld sheet shows burned-in names and dates, so it must not be written inside the shard folder; "
            f"leave --sheet out (it goes to {private / WITHHELD_SHEET}) or choose a path in the private folder"
        )
    return out


def withheld_sheet(root: str | Path, path: str | Path, private_dir: str | Path, n: int = 48, columns: int = 8) -> Path:
    """Write a grid of up to `n` withheld images, re-read from the source through the private path lookup and
    shrunk as the shards would hold them, with red boxes where text was found, for a human to review."""
    import cv2

    from radpretrain.shards import dicom, plain
    from radpretrain.shards.index import read_index, read_private_paths
    from radpretrain.shards.sample import stored_pixels

    manifest = ShardSet.open(root).manifest
    files = withheld_files(root)
    if not files:
        raise ShardError(f"no image in {root} was withheld for burned-in text; nothing to review")
    source, paths = read_private_paths(private_dir)
    index = read_index(root)
    kinds = {row["file"]: row["kind"] for row in index.rows} if index is not None else {}
    chosen = files[:n]
    columns = max(1, min(columns, len(chosen)))
    rows = -(-len(chosen) // columns)
    sheet = np.full((rows * (TILE + CAPTION), columns * TILE, 3), 32, dtype=np.uint8)
    for i, file in enumerate(chosen):
        r, c = divmod(i, columns)
        top, left = r * (TILE + CAPTION), c * TILE
        record = ocr.read_withheld(private_dir, file)
        caption = "record missing" if record is None else f"{len(record['boxes'])} text box(es)"
        try:
            relpath = paths[file]
            if kinds.get(file) == "image":
                frames = plain.read_grey(source / relpath)[None]
            else:
                frames = dicom.read_dicom(source / relpath, frame_rule=manifest.get("frame_rule", "all"))[1]
            frame = frames[record["frame"] if record else 0]
            stored, _ = stored_pixels(dicom.resize_longest(frame, int(manifest["size"])))
            image = ocr.display_image(stored)
            for x0, y0, x1, y1 in record["boxes"] if record else []:
                cv2.rectangle(image, (x0, y0), (x1, y1), (0, 0, 255), max(1, max(image.shape[:2]) // 256))
            sheet[top : top + TILE, left : left + TILE] = _letterbox(image)
        except Exception as exc:  # a moved or changed source file: say so on its tile, show the others
            caption = f"unreadable source ({type(exc).__name__})"
        for line, text in enumerate((file[:16], caption)):
            cv2.putText(
                sheet, text, (left + 4, top + TILE + 13 + 15 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (230,) * 3, 1
            )
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not cv2.imwrite(str(path), sheet):
        raise ShardError(f"could not write the withheld sheet to {path}; check the folder exists and is writable")
    return Path(path)


def _letterbox(image: np.ndarray) -> np.ndarray:
    """Letterbox an 8-bit (H, W, 3) image into a TILE x TILE square."""
    import cv2

    h, w = image.shape[:2]
    scale = TILE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    tile = np.zeros((TILE, TILE, 3), dtype=np.uint8)
    y, x = (TILE - small.shape[0]) // 2, (TILE - small.shape[1]) // 2
    tile[y : y + small.shape[0], x : x + small.shape[1]] = small
    return tile


def inspect_shards(
    root: str | Path,
    sheet: str | Path | None = None,
    n: int = 48,
    seed: int = 0,
    show: Callable[[str], Any] = print,
    withheld: bool = False,
    private_dir: str | Path | None = None,
) -> Path:
    """`radpretrain inspect`: show the composition report (as soon as it is ready), then write the contact sheet
    (default ROOT/contact_sheet.png; its path is checked before anything is read) and return its path.

    With `withheld`, the sheet shows the images withheld for burned-in text instead, and goes to the private
    folder (default PRIVATE/withheld_sheet.png; never inside ROOT).
    """
    if withheld:
        from radpretrain.shards.index import private_dir_for

        private = private_dir_for(root, private_dir)
        path = check_withheld_sheet_path(root, private, sheet)
        show(composition_report(root))
        return withheld_sheet(root, path, private, n=n)
    path = check_sheet_path(sheet or Path(root) / "contact_sheet.png")
    show(composition_report(root))
    return contact_sheet(root, path, n=n, seed=seed)
