"""One unit of a plan -> one webdataset tar, written atomically, with the stats file that marks it done."""

from __future__ import annotations

import contextlib
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


@dataclass
class FileOutcome:
    """What one file gave: its samples (encoded, ready for the tar), or why there are none."""

    file: str
    status: str  # "written", "skipped" or "failed"
    samples: list[dict[str, Any]]
    reason: str = ""
    decode_path: str = ""


def process_file(file: str, relpath: str, row: dict[str, Any], split: str, settings: WriterSettings) -> FileOutcome:
    """Decode and encode one file; every failure becomes an outcome (record-and-continue), never an exception."""
    try:
        samples, decode_path = file_samples(Path(settings.src) / relpath, row, split, settings)
    except SkipFile as exc:
        return FileOutcome(file, "skipped", [], str(exc))
    except (DicomError, ShardError) as exc:  # their messages are fixed phrases without header values
        return FileOutcome(file, "failed", [], str(exc))
    except Exception as exc:  # a codec or library bug on one file must not stop the run
        return FileOutcome(file, "failed", [], f"{UNEXPECTED} ({type(exc).__name__})")
    return FileOutcome(file, "written", samples, decode_path=decode_path)


def process_files(
    files_: list[tuple[str, str, dict[str, Any]]], split: str, settings: WriterSettings
) -> list[FileOutcome]:
    """`process_file` over a chunk of one unit's files, in order (the work item of a worker)."""
    return [process_file(file, relpath, row, split, settings) for file, relpath, row in files_]


class UnitSink:
    """A unit's tar being written: outcomes are added in plan order, `close` renames it into place and writes
    the stats that mark it done; until then only a hidden temp file exists (removed by `abort`)."""

    def __init__(self, task: UnitTask, settings: WriterSettings) -> None:
        self.task, self.settings = task, settings
        self.tar_path, self.stats_path = unit_paths(Path(settings.out), task.name)
        self.started = time.perf_counter()
        self.added = 0
        self.skipped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.decode_paths: Counter[str] = Counter()
        self.errors: list[dict[str, str]] = []
        self.composition: dict[str, Counter[str]] = {name: Counter() for name in COMPOSITION_FIELDS}
        self.samples_written = self.files_written = 0
        self._stack = contextlib.ExitStack()
        tmp_tar = self._stack.enter_context(files.atomic_path(self.tar_path))
        # One copy per member instead of 16 KB chunks: a 250 KB PNG is added in 0.14 ms instead of 0.28.
        self._tar = self._stack.enter_context(
            tarfile.TarFile(tmp_tar, "w", format=tarfile.USTAR_FORMAT, copybufsize=2**20)
        )

    @property
    def complete(self) -> bool:
        return self.added == len(self.task.files)

    def add(self, outcome: FileOutcome) -> None:
        self.added += 1
        if outcome.status == "written":
            for sample in outcome.samples:
                add_sample(self._tar, sample)
                meta = json.loads(sample["json"])
                for name in COMPOSITION_FIELDS:
                    self.composition[name][str(meta[name])] += 1
            self.samples_written += len(outcome.samples)
            self.files_written += 1
            self.decode_paths[outcome.decode_path] += 1
            return
        (self.skipped if outcome.status == "skipped" else self.failed)[outcome.reason] += 1
        self.errors.append({"file": outcome.file, "status": outcome.status, "reason": outcome.reason})

    def close(self) -> dict[str, Any]:
        """Finish the tar (rename into place), then write the stats file; returns the stats."""
        self._stack.close()
        stats = {
            "unit": self.task.name,
            "split": self.task.split,
            "plan": self.settings.fingerprint,
            "files": len(self.task.files),
            "files_written": self.files_written,
            "samples": self.samples_written,
            "bytes": self.tar_path.stat().st_size,
            "skipped": dict(self.skipped),
            "failed": dict(self.failed),
            "errors": self.errors,
            "composition": {name: dict(sorted(c.items())) for name, c in self.composition.items()},
            "decode": dict(sorted(self.decode_paths.items())),
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        files.write_text(self.stats_path, json.dumps(stats, indent=1) + "\n")
        return stats

    def abort(self) -> None:
        """Drop the unfinished tar: its temp file is removed, nothing becomes visible."""
        self._stack.__exit__(ShardError, ShardError("aborted"), None)


def write_unit(
    task: UnitTask, settings: WriterSettings, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Write one unit atomically in this process: temp tar, rename, then stats (whose presence marks it done)."""
    sink = UnitSink(task, settings)
    try:
        for file, relpath, row in task.files:
            sink.add(process_file(file, relpath, row, task.split, settings))
            if progress is not None:
                progress(1)
    except BaseException:
        sink.abort()
        raise
    return sink.close()
