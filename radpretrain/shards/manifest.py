"""A finished plan's shard folder described: the label vocabularies, manifest.json and errors.jsonl."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from radpretrain import __version__, files, intensity
from radpretrain.errors import ShardError
from radpretrain.shards import labels
from radpretrain.shards.format import ERRORS, MANIFEST, SCHEMA_VERSION, SPLITS, TAR_SUFFIX
from radpretrain.shards.plan import Plan, ShardConfig
from radpretrain.shards.writer import COMPOSITION_FIELDS, read_stats

STORAGE = (
    "pixels (a 'png' or 'b2nd' member, manifest 'codec'): 16-bit grayscale, modality-LUT output after "
    "MONOCHROME1 inversion (higher = more attenuation) "
    "minus json 'offset', resized with area interpolation (cv2 INTER_AREA, in two steps for factors of 4 or more) "
    "so the longest side is at most 'size' (JPEG 2000 / JPEG images decoded at a reduced resolution first unless "
    "'decode' says exact or counts them as decoded in full on a GPU ('gpu'): see 'decode'); window_center, "
    "window_width, intensity_low and intensity_high are in stored units; windowing happens when reading."
)


def vocabulary(age_buckets: list[str]) -> dict[str, list[str]]:
    """The class lists the metadata task uses ("unknown" body part and missing values are not classes)."""
    return {
        "body_part": [b for b in labels.BODY_PARTS if b != labels.UNKNOWN],
        "age_bucket": list(labels.AgeBuckets.parse(age_buckets).names),
        "sex": list(labels.SEXES),
        "view": list(labels.VIEWS),
    }


def write_manifest(out: Path, plan: Plan, config: ShardConfig) -> dict[str, Any]:
    """Merge every unit's stats with the plan's accounting of the files it left out (skipped or failed at index
    time, duplicates) into manifest.json and errors.jsonl."""
    skipped: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    duplicate = 0
    errors: list[dict[str, str]] = []
    for file, (status, reason) in plan.not_planned.items():
        if status == "duplicate":
            duplicate += 1
            continue
        (skipped if status == "skipped" else failed)[reason] += 1
        errors.append({"file": file, "status": status, "reason": reason})
    splits: dict[str, dict[str, Any]] = {s: {"shards": [], "samples": 0, "files": 0} for s in SPLITS}
    composition: dict[str, Counter[str]] = {name: Counter() for name in COMPOSITION_FIELDS}
    by_split: dict[str, dict[str, Counter[str]]] = {s: {name: Counter() for name in COMPOSITION_FIELDS} for s in SPLITS}
    shard_bytes: dict[str, int] = {}
    decode_paths: Counter[str] = Counter()
    written_files = samples = 0
    for unit in plan.units:
        stats = read_stats(out, unit.name)
        if stats is None:
            raise ShardError(f"unit {unit.name} is not finished; run the same command again to finish it")
        skipped.update(stats["skipped"])
        failed.update(stats["failed"])
        errors.extend(stats["errors"])
        written_files += stats["files_written"]
        decode_paths.update(stats.get("decode", {}))
        samples += stats["samples"]
        entry = splits[unit.split]
        entry["samples"] += stats["samples"]
        entry["files"] += stats["files_written"]
        if stats["samples"]:
            entry["shards"].append(f"{unit.name}{TAR_SUFFIX}")
            shard_bytes[f"{unit.name}{TAR_SUFFIX}"] = stats["bytes"]
        for name in COMPOSITION_FIELDS:
            composition[name].update(stats["composition"][name])
            by_split[unit.split][name].update(stats["composition"][name])
    counts = {
        "files_seen": plan.files_seen,
        "written": written_files,
        "duplicate": duplicate,
        "skipped": dict(sorted(skipped.items())),
        "failed": dict(sorted(failed.items())),
        "samples": samples,
    }
    accounted = written_files + duplicate + sum(skipped.values()) + sum(failed.values())
    if accounted != plan.files_seen:
        raise ShardError(f"accounting mismatch: {accounted} files accounted for, {plan.files_seen} seen")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"radpretrain {__version__}",
        "intensity_convention": intensity.CONVENTION,
        "storage": STORAGE,
        "codec": config.codec,
        "size": config.size,
        "frame_rule": config.frames,
        "decode": {"exact": config.exact_decode, "files": dict(sorted(decode_paths.items()))},
        "plan": plan.fingerprint,
        "config": plan.config,
        "counts": counts,
        "splits": splits,
        "vocab": vocabulary(list(config.index.age_buckets)),
        "composition": {name: dict(sorted(c.items())) for name, c in composition.items()},
        "composition_by_split": {
            s: {name: dict(sorted(c.items())) for name, c in fields.items()} for s, fields in by_split.items()
        },
        "shard_bytes": shard_bytes,
    }
    files.write_text(out / ERRORS, "".join(json.dumps(error, separators=(",", ":")) + "\n" for error in errors))
    files.write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last: its presence marks the end
    return manifest
