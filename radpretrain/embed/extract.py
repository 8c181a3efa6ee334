"""Shards -> one embedding per sample with an exported encoder, read by DataLoader workers on any Accelerate setup."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radpretrain.errors import ShardError

#: Sample json fields copied next to each embedding: pseudonyms and derived labels only (the shard's
#: allow-listed values); window, sizes, spacing and anything a later shard version adds stay out.
LABEL_FIELDS: tuple[str, ...] = (
    "patient",
    "study",
    "body_part",
    "age_bucket",
    "sex",
    "view",
    "laterality",
    "modality",
    "manufacturer",
)
#: Columns of the embeddings table, in order.
COLUMNS: tuple[str, ...] = ("key", "split", *LABEL_FIELDS, "embedding")


class EmbedSample:
    """The reader's `map_fn`: decoded sample -> (plain view (1, S, S) float32 tensor, key, labels as json).

    The plain view is the evaluation policy of pretraining's probes: the whole image letterboxed to S at
    its stored window, normalised by the intensity convention; nothing random.
    """

    def __init__(self, image_size: int) -> None:
        from radpretrain.data.transforms import AugmentConfig, RadiographAugment

        self.augment = RadiographAugment(AugmentConfig.evaluation(), image_size)

    def __call__(self, sample: Mapping[str, Any]) -> tuple[Any, str, str]:
        import torch

        from radpretrain.data.transforms import stored_window

        pixels, meta = sample["pixels"], sample["meta"]
        view = self.augment(np.asarray(pixels, dtype=np.float32), stored_window(pixels, meta))
        labels = {name: _text(meta.get(name)) for name in ("split", *LABEL_FIELDS)}
        return torch.from_numpy(view), str(sample["key"]), json.dumps(labels)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def embed_shards(
    encoder: Any,
    urls: Sequence[str],
    *,
    image_size: int,
    accelerator: Any,
    batch_size: int = 64,
    workers: int = 0,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every sample of `urls` that falls to this process; returns its rows as column lists.

    The reader gives each of the W x K readers (processes x loader workers) its share: whole shards when
    there are enough, else every k-th sample of a shard (reader.reader_share), so the processes together see
    each sample exactly once: no shuffle, no epoch repetition.
    Returns {"key": [...], "split": [...], <label>: [...], "embedding": float32 (n, F)}.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from radpretrain.shards.reader import build_pipeline, prepare_worker_sockets

    pipeline = build_pipeline(urls, shuffle=0, seed=0, map_fn=EmbedSample(image_size))
    if workers > 0:
        prepare_worker_sockets()
    loader = DataLoader(pipeline, batch_size=batch_size, num_workers=workers, generator=torch.Generator())
    rows: dict[str, list[Any]] = {name: [] for name in COLUMNS if name != "embedding"}
    chunks: list[np.ndarray] = []
    share = None if total is None else math.ceil(total / accelerator.num_processes)
    bar = tqdm(
        total=share,
        unit="img",
        desc="embed" if accelerator.num_processes == 1 else f"embed (process 0 of {accelerator.num_processes})",
        disable=not (progress and accelerator.is_main_process),
    )
    encoder = encoder.to(accelerator.device).eval()
    with torch.inference_mode(), bar:
        for images, keys, labels in loader:
            features = encoder(images.to(accelerator.device, non_blocking=True))
            chunks.append(features.float().cpu().numpy())
            rows["key"].extend(keys)
            for text in labels:
                values = json.loads(text)
                for name in ("split", *LABEL_FIELDS):
                    rows[name].append(values.get(name))
            bar.update(len(keys))
    width = int(getattr(encoder, "num_features", 0) or (chunks[0].shape[1] if chunks else 0))
    embedding = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
    return {**rows, "embedding": embedding.astype(np.float32, copy=False)}


def to_table(rows: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Any:
    """Column lists -> a pyarrow Table (embedding as fixed_size_list<float32>[F])."""
    import pyarrow as pa

    embedding = np.ascontiguousarray(rows["embedding"], dtype=np.float32)
    width = embedding.shape[1]
    columns = {name: pa.array(rows[name], type=pa.string()) for name in COLUMNS if name != "embedding"}
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embedding.reshape(-1)), width)
    table = pa.table(columns)
    return table.replace_schema_metadata({k: str(v) for k, v in (metadata or {}).items()})


def embeddings_of(table: Any) -> np.ndarray:
    """The (n, F) float32 matrix of a table's embedding column."""
    column = table.column("embedding").combine_chunks()
    width = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)


def sort_rows(table: Any, splits: Sequence[str]) -> Any:
    """Rows in a fixed order whatever the process and worker count: by split (manifest order), then key."""
    import pyarrow as pa
    import pyarrow.compute as pc

    order = {name: i for i, name in enumerate(splits)}
    rank = pa.array([order.get(s, len(order)) for s in table.column("split").to_pylist()], type=pa.int32())
    indices = pc.sort_indices(
        table.append_column("_rank", rank), sort_keys=[("_rank", "ascending"), ("key", "ascending")]
    )
    return table.take(indices)


def check_unique(table: Any) -> None:
    """A key read twice means a shard was listed twice or copied; say so instead of reporting self-duplicates."""
    import pyarrow.compute as pc

    keys = table.column("key")
    if pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        repeated = [v["values"].as_py() for v in counts if v["counts"].as_py() > 1]
        raise ShardError(
            f"{len(repeated)} sample keys appear more than once (e.g. {repeated[0]}); a shard is listed twice or "
            "copied under another name: re-shard, or give a folder whose manifest lists each shard once"
        )


def read_parts(paths: Sequence[Path]) -> Any:
    """One table from the processes' part files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(str(path)) for path in paths])
