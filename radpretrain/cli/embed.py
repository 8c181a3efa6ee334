"""`radpretrain embed ENCODER SHARDS OUT`: an archive's embeddings, near-duplicates, neighbours and maps."""

from __future__ import annotations

import argparse
from pathlib import Path

EMBED_HELP = """\
Embed every sample of the shard folder SHARDS (all splits, each sample once) with the exported encoder
ENCODER (a `radpretrain export` folder, any format) at its input size: the whole image at its stored
window, in the intensity convention. Writes into OUT:
  embeddings.parquet   one row per sample: key, split, patient and study pseudonyms, body_part,
                       age_bucket, sex, view, laterality, modality, manufacturer, embedding (float32)
  near_duplicates.csv  pairs with cosine >= --threshold (of mean-centred embeddings), most similar
                       first, marked 'same patient' / 'across patients', with both splits
  neighbours.parquet   each sample's --k nearest neighbours (key, rank, neighbour, cosine, ...)
  label_suspects.csv   samples whose neighbours mostly carry another body part
  map_<field>.png      a 2D map (--map pca, or umap with umap-learn) coloured by each --colour field
  summary.json         counts and settings
The neighbour search runs in blocks (--block-mb of similarities at a time), never as an N x N matrix.

On all cores of one machine: `radpretrain embed ENCODER SHARDS OUT` (DataLoader workers decode). On GPUs:
  accelerate launch --num_processes 8 -m radpretrain embed ENCODER SHARDS OUT
each process embeds its share of the shards and the main process gathers them (OUT on a shared file
system when the processes run on several machines).
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    embed = sub.add_parser(
        "embed",
        help="embed an archive: Parquet of embeddings, near-duplicates, neighbours, 2D maps",
        description=EMBED_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    embed.add_argument("encoder", help="an exported encoder folder (radpretrain export)")
    embed.add_argument("shards", help="a shard folder (radpretrain shard)")
    embed.add_argument("out", help="folder for the embeddings and reports (created if missing)")
    embed.add_argument("--splits", default=None, help="comma-separated splits to embed (default: all)")
    embed.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    embed.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers per process (default: all cores, <= shards)"
    )
    embed.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    embed.add_argument(
        "--threshold", type=float, default=0.98, help="cosine from which a pair is a near-duplicate (default 0.98)"
    )
    embed.add_argument("--k", type=int, default=5, help="nearest neighbours listed per sample (default 5)")
    embed.add_argument(
        "--no-center",
        action="store_true",
        help="compare raw embeddings (default: subtract the mean embedding first, which spreads the cosines)",
    )
    embed.add_argument(
        "--map", default="pca", metavar="{pca,umap,none}", help="2D map method (default pca; umap needs umap-learn)"
    )
    embed.add_argument(
        "--colour",
        "--color",
        dest="colours",
        default="body_part,view,manufacturer",
        help="comma-separated label fields, one map PNG each (default body_part,view,manufacturer)",
    )
    embed.add_argument(
        "--max-pairs", type=int, default=1_000_000, help="near-duplicate pairs kept at most (default 1000000)"
    )
    embed.add_argument(
        "--block-mb", type=int, default=256, help="memory for one block of similarities in MB (default 256)"
    )
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.set_defaults(func=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from radpretrain.embed.run import EmbedConfig, embed

    config = EmbedConfig(
        encoder=Path(args.encoder),
        shards=Path(args.shards),
        out=Path(args.out),
        splits=None if args.splits is None else tuple(s.strip() for s in args.splits.split(",") if s.strip()),
        batch_size=args.batch_size,
        workers=args.workers,
        cpu=args.cpu,
        threshold=args.threshold,
        k=args.k,
        center=not args.no_center,
        map=None if args.map == "none" else args.map,
        colours=tuple(s.strip() for s in args.colours.split(",") if s.strip()),
        max_pairs=args.max_pairs,
        block_mb=args.block_mb,
        progress=not args.no_progress,
    )
    summary = embed(config)
    if summary.main:
        print(summary.line())
    return 0
