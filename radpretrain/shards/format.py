"""The shard format in one place: schema version, file names, splits, views, labels, percentiles; ShardSet."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radpretrain import intensity
from radpretrain.errors import ShardError

#: Version of a sample's json and of the manifest; readers refuse any other.
SCHEMA_VERSION = 1

#: Every key a sample's json holds, in the order it is written, with its type (the names of Hugging Face
#: `datasets` value types; `list:T` a list of T). Anything else is a bug and is refused before it is written.
SAMPLE_FIELDS: dict[str, str] = {
    "schema_version": "int64",
    "patient": "string",
    "study": "string",
    "split": "string",
    "body_part": "string",
    "age_years": "int64",
    "age_bucket": "string",
    "sex": "string",
    "view": "string",
    "laterality": "string",
    "modality": "string",
    "manufacturer": "string",
    "spacing_mm": "list:float64",
    "original_shape": "list:int64",
    "window_center": "float64",
    "window_width": "float64",
    "intensity_low": "float64",
    "intensity_high": "float64",
    "offset": "int64",
    "bits_stored": "int64",
    "transfer_syntax": "string",
}

#: Patient-level splits, in the order manifests list them.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Files of a shard folder.
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
PLAN_FILE = "plan.json"
#: A unit's tar and the stats beside it: `<split>-NNNNNN.tar`, `<split>-NNNNNN.stats.json`.
TAR_SUFFIX = ".tar"
STATS_SUFFIX = ".stats.json"

#: Views a sample can be turned into (see pretrain.tasks.base): two independent strong augmentations,
#: one light one (crop + window) and up to eight small local crops (DINO's multi-crop), smaller than the
#: others (data.transforms.local_view_size).
STRONG_VIEWS: tuple[str, ...] = ("view0", "view1")
LIGHT_VIEWS: tuple[str, ...] = ("plain",)
LOCAL_VIEWS: tuple[str, ...] = tuple(f"local{i}" for i in range(8))
VIEW_NAMES: tuple[str, ...] = STRONG_VIEWS + LIGHT_VIEWS + LOCAL_VIEWS

#: Label tensors always present in a batch: long, -1 where the label is missing.
LABEL_NAMES: tuple[str, ...] = ("body_part", "age_bucket", "sex", "view")

#: The robust intensity range of an image without a usable window: these percentiles of its pixels.
ROBUST_PERCENTILES: tuple[float, float] = (0.5, 99.5)


def unit_name(split: str, number: int) -> str:
    """`train-000003`: the name of a unit, its tar and its stats file."""
    return f"{split}-{number:06d}"


@dataclass(frozen=True)
class ShardSet:
    """A shard folder whose manifest was read and validated once.

    `ShardSet.open(root)` raises ShardError, with the fix, when the manifest is missing, unreadable, of
    another schema version or of another intensity convention.
    """

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> ShardSet:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            hint = (
                "; the sharding run has not finished: run the same `radpretrain shard` command again"
                if any(root.glob("*" + TAR_SUFFIX))
                else "; make shards with `radpretrain shard SRC OUT`"
            )
            raise ShardError(f"no {MANIFEST} in {root}{hint}")
        try:
            manifest = json.loads(path.read_text())
        except ValueError as exc:
            raise ShardError(f"{path} is not valid JSON ({exc}); run `radpretrain shard` again to rewrite it") from None
        if not isinstance(manifest, dict) or "splits" not in manifest:
            raise ShardError(f"{path} is not a radpretrain shard manifest (no 'splits')")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise ShardError(
                f"{path} has schema_version {manifest.get('schema_version')!r}; this version reads "
                f"{SCHEMA_VERSION}: re-shard the data"
            )
        intensity.check_convention(str(manifest.get("intensity_convention")), f"shards in {root}")
        return cls(root=root, manifest=dict(manifest))

    @property
    def vocab(self) -> dict[str, list[str]]:
        return dict(self.manifest.get("vocab", {}))

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    def samples(self, split: str) -> int:
        """Samples in a split (0 for a split the manifest does not list)."""
        return int(self.manifest["splits"].get(split, {}).get("samples", 0))

    def urls(self, split: str = "train") -> list[str]:
        """Absolute paths of a split's shards in manifest order; ShardError for an empty split or a missing tar."""
        splits = self.manifest["splits"]
        if split not in splits:
            raise ShardError(f"unknown split '{split}'; the shards hold {', '.join(splits)}")
        names = splits[split]["shards"]
        if not names:
            raise ShardError(
                f"split '{split}' of {self.root} has no samples; choose another split or re-shard with larger fractions"
            )
        urls = []
        for name in names:
            path = (self.root / name).resolve()
            if not path.is_file():
                raise ShardError(f"shard {name} listed in {self.root}/{MANIFEST} is missing; copy it back or re-shard")
            urls.append(str(path))
        return urls
