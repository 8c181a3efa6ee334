"""`radpretrain synth|index|shard|inspect`: the archive-to-shards commands (parse, then call one library function)."""

from __future__ import annotations

import argparse
import logging

from radpretrain.cli import fraction, positive_int

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add one parser per command; handlers import their heavy modules only when they run."""
    _add_synth(sub)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "synth",
        help="write a synthetic PACS export (DICOM radiographs) for tests and demos",
        description=(
            "Write a synthetic PACS export into OUT: patient/study/series folders of CR and DX radiographs "
            "(anatomy-like phantoms of several body parts whose appearance changes with age), with the header "
            "variety of real archives (photometrics, bit depths, rescale, windows and VOI LUTs, compressed "
            "transfer syntaxes, body part and age in different places), fake patient data everywhere a real "
            "header has it, an optional share of hostile files and optional ground-truth masks. "
            "OUT/synth.json records the ground truth of every file. The same --seed and arguments give the "
            "same bytes."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="output folder (new or empty, or a previous synth export)")
    parser.add_argument("--n", type=positive_int, default=200, help="number of files, hostile ones included")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--hostile",
        type=fraction,
        default=0.0,
        help="share of hostile files: truncated, not DICOM, DICOMDIR, no pixels, RGB, burned-in annotation, "
        "duplicates, empty, absurd dimensions, CT (any value > 0 gives at least one of each)",
    )
    parser.add_argument("--masks", action="store_true", help="write lung/heart/bone masks and OUT/masks.csv")
    parser.add_argument("--min-size", type=positive_int, default=1000, help="smallest long image side in pixels")
    parser.add_argument("--max-size", type=positive_int, default=3000, help="largest long image side in pixels")
    parser.add_argument(
        "--shape",
        type=_shape,
        default=None,
        metavar="ROWSxCOLS",
        help="force every radiograph to this shape, e.g. 2500x2000 (overrides --min-size/--max-size)",
    )
    parser.add_argument("--bits-stored", type=int, default=None, help="force BitsStored (8-16) for every radiograph")
    parser.add_argument(
        "--syntaxes",
        default=None,
        help="comma-separated transfer syntaxes to use (default: all with an installed encoder), from "
        "ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, "
        "JPEGLSLossless, JPEG2000Lossless",
    )
    parser.add_argument("--body-parts", default=None, help="comma-separated body parts (default: all)")
    parser.add_argument("--phi-marker", default=None, help="plant this token in every identifying string (testing)")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes used to render (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous synth export with other args")
    parser.set_defaults(func=_run_synth)


def _shape(text: str) -> tuple[int, int]:
    rows, sep, cols = text.lower().partition("x")
    if not sep or not rows.strip().isdigit() or not cols.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 2500x2000, got '{text}'")
    return int(rows), int(cols)


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def _run_synth(args: argparse.Namespace) -> int:
    from radpretrain.shards.synth import generate

    summary = generate(
        args.out,
        args.n,
        seed=args.seed,
        hostile=args.hostile,
        masks=args.masks,
        min_size=args.min_size,
        max_size=args.max_size,
        syntaxes=_split(args.syntaxes),
        workers=args.workers,
        phi_marker=args.phi_marker,
        body_parts=_split(args.body_parts),
        shape=args.shape,
        bits_stored=args.bits_stored,
        overwrite=args.overwrite,
    )
    counts = ", ".join(f"{kind} {n}" for kind, n in summary.counts.items())
    log.info("synth: %d files in %s (%s); ground truth in synth.json", summary.n_files, summary.root, counts)
    return 0
