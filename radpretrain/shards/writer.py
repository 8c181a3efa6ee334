"""One unit of a plan -> one webdataset tar, written atomically, with the stats file that marks it done."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radpretrain import files
from radpretrain.errors import DicomError, ShardError
from radpretrain.shards.codecs import IMAGE_EXTS
from radpretrain.shards.format import STATS_SUFFIX, TAR_SUFFIX
from radpretrain.shards.sample import SkipFile, WriterSettings, file_samples

#: Sample json fields counted per unit (and summed into the manifest's composition).
COMPOSITION_FIELDS = ("body_part", "age_bucket", "sex", "view", "laterality", "modality", "manufacturer")
UNEXPECTED = "unexpected error"


def unit_paths(out: Path, name: str) -> tuple[Path, Path]:
    """A unit's tar and its stats file."""
    return out / f"{name}{TAR_SUFFIX}", out / f"{name}{STATS_SUFFIX}"


def read_stats(out: Path, name: str) -> dict[str, Any] | None:
    """A finished unit's stats; None while its tar or stats file is missing or unreadable."""
    tar, stats = unit_paths(out, name)
    if not tar.is_file() or not stats.is_file():
        return None
    try:
        return dict(json.loads(stats.read_text()))
    except ValueError:
        return None


def is_done(out: Path, name: str, fingerprint: str) -> bool:
    """A unit is done when its tar and its stats exist and the stats name this plan."""
    stats = read_stats(out, name)
    return stats is not None and stats.get("plan") == fingerprint


def _unit_of(target: str) -> str | None:
    """The unit a tar or stats file name belongs to (`train-000001.tar` -> `train-000001`), else None."""
    for suffix in (TAR_SUFFIX, STATS_SUFFIX):
        if target.endswith(suffix):
            return target[: -len(suffix)]
    return None


def clean_temp(out: Path, names: list[str] | None = None) -> int:
    """Remove temp files left by killed runs: every one, or only those of the units `names` (parts running on
    several nodes share OUT, and one part must not remove another's files in flight)."""
    removed = 0
    wanted = None if names is None else set(names)
    for path in out.iterdir():
        if not files.is_temp(path):
            continue
        if wanted is None or _unit_of(files.target_of_temp(path)) in wanted:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def add_sample(sink: tarfile.TarFile, sample: dict[str, Any]) -> None:
    """Append `<key>.json` and the pixels (`<key>.png` or `.b2nd`) as webdataset expects (plain tarfile:
    webdataset's writer would import torch in every worker, 3-4 s each). Fixed mtime and owner keep reruns
    byte-identical."""
    for ext in ("json", *(ext for ext in IMAGE_EXTS if ext in sample)):
        data = sample[ext]
        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
        info.size = len(data)
        info.mode = 0o444
        info.uname = info.gname = "radpretrain"
        sink.addfile(info, io.BytesIO(data))


@dataclass
class UnitTask:
    """A unit as a worker gets it: its name, split and files."""

    name: str
    split: str
    files: list[tuple[str, str, dict[str, Any]]]  # (file pseudonym, relative path, index row)


def write_unit(
    task: UnitTask, settings: WriterSettings, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Write one unit atomically: temp tar, rename, then stats (whose presence marks the unit done)."""
    out = Path(settings.out)
    src = Path(settings.src)
    tar_path, stats_path = unit_paths(out, task.name)
    started = time.perf_counter()
    skipped: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    errors: list[dict[str, str]] = []
    composition: dict[str, Counter[str]] = {name: Counter() for name in COMPOSITION_FIELDS}
    samples_written = files_written = 0
    # One copy per member instead of 16 KB chunks: a 250 KB PNG is added in 0.14 ms instead of 0.28.
    with (
        files.atomic_path(tar_path) as tmp_tar,
        tarfile.TarFile(tmp_tar, "w", format=tarfile.USTAR_FORMAT, copybufsize=2**20) as sink,
    ):
        for file, relpath, row in task.files:
            try:
                samples = file_samples(src / relpath, row, task.split, settings)
            except SkipFile as exc:
                skipped[str(exc)] += 1
                errors.append({"file": file, "status": "skipped", "reason": str(exc)})
            except (DicomError, ShardError) as exc:  # their messages are fixed phrases without header values
                failed[str(exc)] += 1
                errors.append({"file": file, "status": "failed", "reason": str(exc)})
            except Exception as exc:  # a codec or library bug on one file must not stop the run
                reason = f"{UNEXPECTED} ({type(exc).__name__})"
                failed[reason] += 1
                errors.append({"file": file, "status": "failed", "reason": reason})
            else:
                for sample in samples:
                    add_sample(sink, sample)
                    meta = json.loads(sample["json"])
                    for name in COMPOSITION_FIELDS:
                        composition[name][str(meta[name])] += 1
                samples_written += len(samples)
                files_written += 1
            if progress is not None:
                progress(1)
    stats = {
        "unit": task.name,
        "split": task.split,
        "plan": settings.fingerprint,
        "files": len(task.files),
        "files_written": files_written,
        "samples": samples_written,
        "bytes": tar_path.stat().st_size,
        "skipped": dict(skipped),
        "failed": dict(failed),
        "errors": errors,
        "composition": {name: dict(sorted(c.items())) for name, c in composition.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    files.write_text(stats_path, json.dumps(stats, indent=1) + "\n")
    return stats
