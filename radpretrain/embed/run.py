"""`radpretrain embed`: an archive's embeddings (Parquet), its near-duplicates, nearest neighbours and 2D maps."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radpretrain import __version__
from radpretrain.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.parquet"
NEIGHBOURS_FILE = "neighbours.parquet"
DUPLICATES_FILE = "near_duplicates.csv"
SUSPECTS_FILE = "label_suspects.csv"
SUMMARY_FILE = "summary.json"
MAP_PREFIX = "map_"
PART_PREFIX = ".embeddings.part-"
#: Label fields the maps are coloured by unless told otherwise: anatomy, projection and scanner vendor.
DEFAULT_COLOURS: tuple[str, ...] = ("body_part", "view", "manufacturer")
#: A sample is a label suspect when at least this share of its neighbours agree on another label.
SUSPECT_AGREEMENT = 0.8


@dataclass
class EmbedConfig:
    """What `embed` reads, how, and which reports it writes."""

    encoder: Path
    shards: Path
    out: Path
    splits: tuple[str, ...] | None = None  # None: every split of the manifest
    batch_size: int = 64
    workers: int | None = None  # None: the cores of this process's share, at most one per shard
    cpu: bool = False
    threshold: float = 0.98
    k: int = 5
    center: bool = True
    map: str | None = "pca"  # "pca", "umap" or None
    colours: tuple[str, ...] = DEFAULT_COLOURS
    max_pairs: int = 1_000_000
    block_mb: int = 256
    progress: bool = True

    def validate(self) -> None:
        from radpretrain.embed.extract import LABEL_FIELDS

        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold is a cosine and must be within [-1, 1], got {self.threshold}")
        for name in ("batch_size", "k", "max_pairs", "block_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.map is not None:
            from radpretrain.embed.maps import check_method

            check_method(self.map)
        unknown = [name for name in self.colours if name not in LABEL_FIELDS or name in ("patient", "study")]
        if unknown:
            known = [name for name in LABEL_FIELDS if name not in ("patient", "study")]
            raise ConfigError(f"cannot colour a map by {', '.join(unknown)}; choose from {', '.join(known)}")


@dataclass
class EmbedSummary:
    """What an embed run wrote; only the main process fills the report fields."""

    main: bool
    out: Path
    samples: int = 0
    expected: int = 0
    features: int = 0
    pairs: int = 0
    pairs_across_patients: int = 0
    pairs_across_splits: int = 0
    pairs_capped: bool = False
    suspects: int = 0
    files: list[str] = field(default_factory=list)

    def line(self) -> str:
        skipped = self.expected - self.samples
        text = (
            f"embedded {self.samples} samples ({self.features} features)"
            + (f", {skipped} unreadable records skipped" if skipped > 0 else "")
            + f"; {self.pairs} near-duplicate pairs ({self.pairs_across_patients} across patients, "
            f"{self.pairs_across_splits} across splits{', capped' if self.pairs_capped else ''}); "
            f"{self.suspects} label suspects; written to {self.out}: {', '.join(self.files)}"
        )
        return text


def embed(config: EmbedConfig) -> EmbedSummary:
    """Embed every sample of `config.shards` with the exported encoder and write the reports into `config.out`.

    Runs in each process of an Accelerate launch: every process embeds its share of the shards into a part
    file, the main process gathers them into OUT/embeddings.parquet (key, split, allow-listed labels,
    embedding) and writes near_duplicates.csv, neighbours.parquet, label_suspects.csv, map_<field>.png and
    summary.json. One process (CPU or one GPU) needs no launcher.
    """
    import pyarrow.parquet as pq
    from accelerate import Accelerator

    from radpretrain.embed import extract
    from radpretrain.files import atomic_path
    from radpretrain.models.encoders import load_encoder, read_card
    from radpretrain.shards.format import ShardSet

    config.validate()
    card = read_card(config.encoder)
    encoder = load_encoder(config.encoder)
    size = int(card.get("img_size") or (card.get("input_size") or [1, 224, 224])[1])
    shards = ShardSet.open(config.shards)
    splits = [s for s in shards.manifest["splits"] if config.splits is None or s in config.splits]
    missing = [s for s in config.splits or () if s not in shards.manifest["splits"]]
    if missing:
        raise ConfigError(
            f"split {', '.join(missing)} not in {config.shards}; it holds {', '.join(shards.manifest['splits'])}"
        )
    splits = [s for s in splits if shards.samples(s) > 0]
    if not splits:
        raise ConfigError(f"{config.shards} holds no samples in the splits asked for")
    urls = [url for split in splits for url in shards.urls(split)]
    expected = sum(shards.samples(s) for s in splits)

    accelerator = Accelerator(cpu=config.cpu)
    world, rank = accelerator.num_processes, accelerator.process_index
    out = Path(config.out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    workers = config.workers
    if workers is None:  # the cores of this process; readers split samples when shards are fewer
        workers = max((os.cpu_count() or 1) // world, 1)
    rows = extract.embed_shards(
        encoder,
        urls,
        image_size=size,
        accelerator=accelerator,
        batch_size=config.batch_size,
        workers=workers,
        total=expected,
        progress=config.progress,
    )
    metadata = {
        "radpretrain_version": __version__,
        "encoder": str(card["timm_name"]),
        "intensity_convention": str(card.get("intensity_convention")),
    }
    table = extract.to_table(rows, metadata)
    if world > 1:
        # Each process writes its share beside OUT's other files; the main process gathers them from there
        # (several nodes need OUT on a shared file system, as their checkpoints do).
        part = out / f"{PART_PREFIX}{rank:05d}.parquet"
        with atomic_path(part) as tmp:
            pq.write_table(table, str(tmp))
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return EmbedSummary(main=False, out=out)
        parts = [out / f"{PART_PREFIX}{r:05d}.parquet" for r in range(world)]
        table = extract.read_parts(parts).replace_schema_metadata(metadata)
        for path in parts:
            path.unlink()
    table = extract.sort_rows(table, splits)
    extract.check_unique(table)
    with atomic_path(out / EMBEDDINGS_FILE) as tmp:
        pq.write_table(table, str(tmp))
    summary = EmbedSummary(
        main=True, out=out, samples=table.num_rows, expected=expected, features=int(rows["embedding"].shape[1])
    )
    summary.files.append(EMBEDDINGS_FILE)
    report(table, config, summary, device=str(accelerator.device))
    write_summary(out / SUMMARY_FILE, summary, config)
    summary.files.append(SUMMARY_FILE)
    return summary


def report(table: Any, config: EmbedConfig, summary: EmbedSummary, device: str = "cpu") -> None:
    """Near-duplicates, neighbours, label suspects and maps of an embeddings table, into config.out."""
    from radpretrain.embed import extract, maps
    from radpretrain.embed.neighbours import search, unit_rows

    out = Path(config.out)
    columns = {name: table.column(name).to_pylist() for name in ("key", "split", "patient", "body_part")}
    embeddings = extract.embeddings_of(table)
    found = search(
        unit_rows(embeddings, center=config.center),
        k=config.k,
        threshold=config.threshold,
        device=device,
        block_bytes=config.block_mb << 20,
        max_pairs=config.max_pairs,
    )
    summary.pairs, summary.pairs_capped = len(found.pairs), found.pairs_capped
    write_duplicates(out / DUPLICATES_FILE, found.pairs, found.pair_cosine, columns, summary)
    summary.files.append(DUPLICATES_FILE)
    write_neighbours(out / NEIGHBOURS_FILE, found.index, found.cosine, columns)
    summary.files.append(NEIGHBOURS_FILE)
    summary.suspects = write_suspects(out / SUSPECTS_FILE, found.index, columns)
    summary.files.append(SUSPECTS_FILE)
    if config.map is not None and len(embeddings) >= 3:
        xy = maps.project(embeddings, config.map)
        for name in config.colours:
            path = out / f"{MAP_PREFIX}{name}.png"
            title = f"{config.map.upper()} of {len(xy)} embeddings, coloured by {name.replace('_', ' ')}"
            maps.draw_map(xy, table.column(name).to_pylist(), name, path, title)
            summary.files.append(path.name)


def relation(patient_a: str | None, patient_b: str | None) -> str:
    """'same patient', 'across patients' or 'unknown' (a pseudonym is missing)."""
    if patient_a is None or patient_b is None:
        return "unknown"
    return "same patient" if patient_a == patient_b else "across patients"


def write_duplicates(
    path: Path, pairs: np.ndarray, cosine: np.ndarray, columns: dict[str, list[Any]], summary: EmbedSummary
) -> None:
    """near_duplicates.csv: one pair a row, most similar first, marked within / across patients and splits."""
    from radpretrain.files import atomic_path

    key, split, patient, body = columns["key"], columns["split"], columns["patient"], columns["body_part"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key_a", "key_b", "cosine", "patients", "split_a", "split_b", "body_part_a", "body_part_b"])
        for (a, b), value in zip(pairs.tolist(), cosine.tolist(), strict=True):
            kind = relation(patient[a], patient[b])
            summary.pairs_across_patients += kind == "across patients"
            summary.pairs_across_splits += split[a] != split[b]
            writer.writerow([key[a], key[b], f"{value:.6f}", kind, split[a], split[b], body[a], body[b]])


def write_neighbours(path: Path, index: np.ndarray, cosine: np.ndarray, columns: dict[str, list[Any]]) -> None:
    """neighbours.parquet: k rows a sample (key, rank 1..k, neighbour, cosine, patients, both body parts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from radpretrain.files import atomic_path

    n, k = index.shape
    key = np.asarray(columns["key"], dtype=object)
    patient = columns["patient"]
    body = np.asarray(columns["body_part"], dtype=object)
    rows = np.repeat(np.arange(n), k)
    flat = index.reshape(-1)
    table = pa.table(
        {
            "key": pa.array(key[rows].tolist(), type=pa.string()),
            "rank": pa.array(np.tile(np.arange(1, k + 1), n), type=pa.int16()),
            "neighbour": pa.array(key[flat].tolist(), type=pa.string()),
            "cosine": pa.array(cosine.reshape(-1), type=pa.float32()),
            "patients": pa.array(
                [relation(patient[a], patient[b]) for a, b in zip(rows, flat, strict=True)], type=pa.string()
            ),
            "body_part": pa.array(body[rows].tolist(), type=pa.string()),
            "neighbour_body_part": pa.array(body[flat].tolist(), type=pa.string()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def write_suspects(path: Path, index: np.ndarray, columns: dict[str, list[Any]]) -> int:
    """label_suspects.csv: samples whose neighbours mostly carry another body part (a mislabel, or a rare view)."""
    from radpretrain.files import atomic_path

    key, body = columns["key"], columns["body_part"]
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "body_part", "neighbours_say", "agreement"])
        for i, neighbours in enumerate(index.tolist()):
            said = Counter(body[j] for j in neighbours if body[j] not in (None, "unknown"))
            if not said or body[i] in (None, "unknown"):
                continue
            label, votes = said.most_common(1)[0]
            agreement = votes / len(neighbours)
            if label != body[i] and agreement >= SUSPECT_AGREEMENT:
                writer.writerow([key[i], body[i], label, f"{agreement:.2f}"])
                count += 1
    return count


def write_summary(path: Path, summary: EmbedSummary, config: EmbedConfig) -> None:
    from radpretrain.files import write_text

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(summary).items() if k != "main"}
    write_text(path, json.dumps({"summary": record, "settings": settings}, indent=2) + "\n")
