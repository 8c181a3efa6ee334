"""Index -> deterministic shard plan: dedupe by SOPInstanceUID, patient-level split, global shuffle, units."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from radpretrain.config import to_dict
from radpretrain.errors import ConfigError, ShardError
from radpretrain.shards import deid
from radpretrain.shards.format import PLAN_FILE, SCHEMA_VERSION, SPLITS, unit_name
from radpretrain.shards.index import Index, IndexOptions
from radpretrain.shards.ocr import ScanMode, TextRules

DUPLICATE = "duplicate"
#: The automatic shard size aims at this many train shards, so that many readers (processes x loader
#: workers) each read whole shards, within the files per shard that keep shards neither tiny nor huge.
AUTO_TRAIN_SHARDS = 64
AUTO_SHARD_FILES = (100, 1000)


@dataclass
class ShardConfig:
    """Everything that decides which sample lands in which shard; a rerun with another value is a new plan."""

    size: int = 512
    #: Files per shard: a number, or "auto" (also 0): 100-1,000, for at least 64 train shards when the archive
    #: allows it (`auto_shard_size`).
    shard_size: int | Literal["auto"] = "auto"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0
    #: Multi-frame files: every frame a sample ("all"), or one frame per file ("first", "middle").
    frames: Literal["all", "first", "middle"] = "all"
    #: How pixels are stored (`shards.codecs`): "png" (portable, smallest on smooth images) or "blosc2"
    #: (about 10x faster to decode, for CPU-bound training).
    codec: Literal["png", "blosc2"] = "png"
    #: Decode every image in full, as before reduced-resolution decoding (JPEG 2000 levels, JPEG DCT scaling:
    #: `dicom.read_dicom_for`); the pixels then match full decode + area resize exactly.
    exact_decode: bool = False
    index: IndexOptions = field(default_factory=IndexOptions)
    #: Burned-in text screening (`shards.ocr`): off, images whose BurnedInAnnotation is absent ("unflagged"),
    #: or all; an image whose text is more than `text_rules` allows is withheld.
    scan_text: ScanMode = "off"
    text_rules: TextRules = field(default_factory=TextRules)

    def validate(self) -> None:
        if self.size < 8:
            raise ConfigError(f"size must be at least 8 pixels, got {self.size}")
        if self.shard_size != "auto" and self.shard_size < 0:
            raise ConfigError(f"shard size must be at least 1 file (or auto), got {self.shard_size}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"val_fraction + test_fraction must leave room for training, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )


@dataclass
class Unit:
    """One unit of work: the files (by pseudonym) that become one tar."""

    name: str
    split: str
    files: list[str]


@dataclass
class Plan:
    """The units to write plus what the manifest needs to account for every file seen."""

    fingerprint: str
    config: dict[str, Any]
    units: list[Unit]
    #: Per-file reason for files that are not planned (skipped/failed at index time, or duplicates).
    not_planned: dict[str, tuple[str, str]] = field(default_factory=dict)
    files_seen: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "files_seen": self.files_seen,
            "units": [{"name": u.name, "split": u.split, "files": u.files} for u in self.units],
        }


def split_of(patient: str, config: ShardConfig, pseudonymize: deid.Pseudonymizer) -> str:
    """A patient's split, drawn from the keyed hash of its pseudonym (stable across reruns and seeds)."""
    draw = pseudonymize.fraction("split", patient)
    if draw < config.test_fraction:
        return "test"
    if draw < config.test_fraction + config.val_fraction:
        return "val"
    return "train"


def make_plan(index: Index, config: ShardConfig, pseudonymize: deid.Pseudonymizer) -> Plan:
    """Deterministic from the index, the config and the key: the same inputs always give the same units."""
    seen_sops: set[str] = set()
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    not_planned: dict[str, tuple[str, str]] = {}
    for row in index.rows:
        if row["status"] != "ok":
            not_planned[row["file"]] = (row["status"], row["reason"])
            continue
        if row["sop"] in seen_sops:  # the first copy in source order is kept
            not_planned[row["file"]] = (DUPLICATE, DUPLICATE)
            continue
        seen_sops.add(row["sop"])
        by_split[split_of(row["patient"], config, pseudonymize)].append(row["file"])
    units: list[Unit] = []
    shard_size = resolve_shard_size(config.shard_size, len(by_split["train"]))
    for split, files in by_split.items():
        # A global shuffle per split, so every shard mixes patients, body parts and sources.
        random.Random(f"{config.seed}:{split}").shuffle(files)
        for number, start in enumerate(range(0, len(files), shard_size)):
            units.append(Unit(name=unit_name(split, number), split=split, files=files[start : start + shard_size]))
    config_dict = to_dict(config)
    identity = {
        "config": config_dict,
        "key": pseudonymize.fingerprint,
        "source": index.meta.get("source"),
        "units": [(u.name, u.files) for u in units],
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return Plan(
        fingerprint=fingerprint,
        config=config_dict,
        units=units,
        not_planned=not_planned,
        files_seen=len(index.rows),
    )


def resolve_shard_size(shard_size: int | str, train_files: int) -> int:
    """Files per shard: an explicit number as given, "auto" (or 0) from the planned train file count."""
    if shard_size in ("auto", 0):
        return auto_shard_size(train_files)
    return int(shard_size)


def auto_shard_size(train_files: int) -> int:
    """At least AUTO_TRAIN_SHARDS train shards when 100-1,000 files per shard allow it, else the nearest bound.

    1,000 train files give shards of 100 (10 train shards), 10,000 give 156 (65), 500,000 give 1,000 (500):
    a small archive still feeds several readers whole, a large one keeps shards big enough to read fast.
    """
    low, high = AUTO_SHARD_FILES
    return min(high, max(low, train_files // AUTO_TRAIN_SHARDS))


def read_plan(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except ValueError:
        raise ShardError(f"{path} is unreadable; rerun with --overwrite to start the plan again") from None


def select_part(units: list[Unit], part: tuple[int, int] | None) -> list[Unit]:
    """Units of part i of N (0-based, round-robin so every part gets a share of each split)."""
    if part is None:
        return units
    index, count = part
    return units[index::count]


def parse_part(text: str) -> tuple[int, int]:
    """`"3/8"` -> (3, 8); parts count from 0 like SLURM array task ids (`--array=0-7`)."""
    left, sep, right = text.partition("/")
    try:
        index, count = int(left), int(right)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise ConfigError(f"--part must look like i/N with 0 <= i < N (e.g. 0/4 ... 3/4), got '{text}'")
    return index, count


def split_counts(plan: Plan) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for unit in plan.units:
        counts[unit.split] += len(unit.files)
    return dict(counts)
