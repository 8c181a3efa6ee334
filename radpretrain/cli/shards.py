"""`radpretrain synth|index|shard|inspect`: the archive-to-shards commands."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from radpretrain.cli.args import comma_list, fraction, positive_int

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add one parser per command; handlers import their heavy modules only when they run."""
    _add_synth(sub)
    _add_index(sub)
    _add_shard(sub)
    _add_inspect(sub)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "synth",
        help="write a synthetic PACS export (DICOM radiographs) for tests and demos",
        description=(
            "Write a synthetic PACS export into OUT: patient/study/series folders of CR and DX radiographs "
            "(anatomy-like phantoms of several body parts whose appearance changes with age), with the header "
            "variety of real archives (photometrics, bit depths, rescale, windows and VOI LUTs, compressed "
            "transfer syntaxes, body part and age in different places), fake patient data everywhere a real "
            "header has it, an optional share of hostile files, optional ground-truth masks and optional lung "
            "findings with a classification cohort table. "
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
    parser.add_argument(
        "--masks", action="store_true", help="write lung/heart/bone (and finding) masks and OUT/masks.csv"
    )
    parser.add_argument(
        "--findings",
        type=fraction,
        default=0.0,
        metavar="P",
        help="share of chest radiographs with a lung finding (a nodule or a consolidation, at random whatever "
        "age, sex and view); synth.json records each file's finding and OUT/findings.csv lists the chest "
        "radiographs as a classification cohort (image, label abnormal/normal, finding, patient) for "
        "`radpretrain finetune` and probe.cohort (default 0: none)",
    )
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


def _run_synth(args: argparse.Namespace) -> int:
    from radpretrain.synth import generate

    summary = generate(
        args.out,
        args.n,
        seed=args.seed,
        hostile=args.hostile,
        masks=args.masks,
        min_size=args.min_size,
        max_size=args.max_size,
        syntaxes=comma_list(args.syntaxes),
        workers=args.workers,
        phi_marker=args.phi_marker,
        body_parts=comma_list(args.body_parts),
        shape=args.shape,
        bits_stored=args.bits_stored,
        findings=args.findings,
        overwrite=args.overwrite,
    )
    counts = ", ".join(f"{kind} {n}" for kind, n in summary.counts.items())
    log.info("synth: %d files in %s (%s); ground truth in synth.json", summary.n_files, summary.root, counts)
    return 0


# index / shard / inspect: DICOM (or PNG/JPEG) folder -> de-identified webdataset shards, and a look at them.

_PRIVACY = (
    "Only pseudonyms (HMAC-SHA256 under a key kept outside OUT) and allow-listed derived labels leave the "
    "source; names, IDs, dates, UIDs, free text, private tags and file paths never reach OUT, a log line or "
    "an error. The lookup from file pseudonyms (in OUT/errors.jsonl) to file paths is written to a private "
    "folder outside OUT (--private-dir, default OUT.private beside OUT)."
)


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    """Options that decide what the index selects and how it labels (shared by `index` and `shard`)."""
    parser.add_argument("src", metavar="SRC", help="source folder: a DICOM export, or PNG/JPEG files with a CSV")
    parser.add_argument("out", metavar="OUT", help="output folder for the shards (created if missing)")
    parser.add_argument(
        "--key",
        default=None,
        help="pseudonym key file, kept outside OUT and created (mode 0600) when missing; default "
        "$RADPRETRAIN_KEY_FILE, else ~/.config/radpretrain/deid.key. The same key gives the same pseudonyms",
    )
    parser.add_argument(
        "--private-dir",
        default=None,
        help="folder for the private file-pseudonym -> path lookup (default: OUT.private beside OUT)",
    )
    parser.add_argument(
        "--modalities",
        default="CR,DX,MG,RF,XA,DR",
        help="comma-separated modalities to shard (default: projection radiographs CR,DX,MG,RF,XA,DR); "
        "others are skipped with a reason",
    )
    parser.add_argument(
        "--include-burned-in",
        action="store_true",
        help="also shard images flagged BurnedInAnnotation=YES (skipped by default: the pixels may show names)",
    )
    parser.add_argument(
        "--age-buckets",
        default="0-1,2-11,12-17,18-39,40-64,65-79,80+",
        help="comma-separated whole-year age buckets, the last open-ended (default 0-1,2-11,12-17,18-39,40-64,"
        "65-79,80+)",
    )
    parser.add_argument(
        "--images",
        choices=("auto", "yes", "no"),
        default="auto",
        help="PNG/JPEG files: shard them when SRC holds no DICOM file (auto, default), always (yes) or never (no)",
    )
    parser.add_argument(
        "--csv",
        default=None,
        help="metadata CSV for PNG/JPEG files (default SRC/metadata.csv when present); only mapped columns are "
        "read, free text (notes, findings ...) never is",
    )
    parser.add_argument(
        "--csv-columns",
        default="",
        metavar="FIELD=COLUMN,...",
        help="map CSV columns to fields file, patient, study, sex, age, view, laterality, body_part (defaults: "
        "patient=patientid, sex=sex, age=age, view=view, laterality=laterality, body_part=body_part; the file "
        "column is guessed from filename/file/image/path, else the patient column is matched to the file stem)",
    )
    parser.add_argument(
        "--body-part",
        default="unknown",
        help="body part of PNG/JPEG files whose CSV row names none (e.g. chest for a chest X-ray collection)",
    )
    parser.add_argument("--workers", type=positive_int, default=1, help="processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _index_options(args: argparse.Namespace) -> Any:  # an IndexOptions (imported late: --help stays fast)
    from radpretrain.config import build
    from radpretrain.shards.index import IndexOptions
    from radpretrain.shards.plain import parse_csv_columns

    return build(
        IndexOptions,
        {
            "modalities": comma_list(args.modalities) or [],
            "include_burned_in": args.include_burned_in,
            "images": args.images,
            "age_buckets": comma_list(args.age_buckets) or [],
            "plain": {
                "csv": args.csv,
                "csv_columns": parse_csv_columns(args.csv_columns),
                "body_part": args.body_part,
            },
        },
    )


def _add_index(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "index",
        help="read every header of a source folder once (no pixels) into OUT/index.jsonl",
        description=(
            "Read the header of every file under SRC (no pixel data) and write one row per file to "
            "OUT/index.jsonl: pseudonyms, derived labels, and whether the file will be sharded or why not. "
            "`radpretrain shard` runs this itself; run it alone first when several `shard --part` jobs will "
            "share one plan. " + _PRIVACY
        ),
    )
    _add_source_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an index made with other options")
    parser.set_defaults(func=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from collections import Counter

    from radpretrain.shards.index import index_source, private_dir_for

    index = index_source(
        args.src,
        args.out,
        _index_options(args),
        key=args.key,
        private_dir=args.private_dir,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    status = Counter(row["status"] for row in index.rows)
    reasons = Counter(row["reason"] for row in index.rows if row["reason"])
    log.info(
        "index: %d files: %d to shard, %d skipped, %d failed%s",
        len(index.rows),
        status["ok"],
        status["skipped"],
        status["failed"],
        (" (" + ", ".join(f"{r} {n}" for r, n in reasons.most_common()) + ")") if reasons else "",
    )
    log.info(
        "index: written to %s; the private path lookup is in %s", args.out, private_dir_for(args.out, args.private_dir)
    )
    return 0


def _add_shard(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "shard",
        help="DICOM export (or PNG/JPEG folder) -> de-identified webdataset shards",
        description=(
            "Index SRC (headers only), plan (dedupe by SOPInstanceUID, patient-level train/val/test split "
            "drawn from the keyed patient pseudonym, global shuffle, units of --shard-size files) and write "
            "each unit as OUT/<split>-NNNNNN.tar (16-bit PNG + json per sample) with a .stats.json beside it, "
            "then OUT/manifest.json and OUT/errors.jsonl. Every file seen is written, a duplicate, skipped or "
            "failed with a reason. Rerunning the same command resumes (finished units are kept); other settings "
            "are refused unless --overwrite. " + _PRIVACY + " "
            "Several machines (e.g. a SLURM array): run `radpretrain index SRC OUT` once, then "
            "`radpretrain shard SRC OUT --part $SLURM_ARRAY_TASK_ID/N` with the same options in each job; the "
            "part that finds every unit done writes the manifest, and `radpretrain shard SRC OUT` run once "
            "afterwards writes it too (it writes no unit twice)."
        ),
    )
    _add_source_options(parser)
    parser.add_argument(
        "--size",
        type=positive_int,
        default=512,
        help="shrink images so the longest side is at most SIZE pixels (default 512; never upscaled)",
    )
    parser.add_argument(
        "--shard-size",
        type=_shard_size,
        default="auto",
        help="files per shard (unit of work), or auto (default): 100-1000, for at least 64 train shards when the "
        "archive allows it, so that many readers (processes x loader workers) read whole shards",
    )
    parser.add_argument("--val", type=fraction, default=0.05, help="share of patients in val (default 0.05)")
    parser.add_argument("--test", type=fraction, default=0.05, help="share of patients in test (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    parser.add_argument(
        "--frames",
        choices=("all", "first", "middle"),
        default="all",
        help="multi-frame files: every frame a sample (all, default) or one frame per file",
    )
    parser.add_argument(
        "--codec",
        choices=("png", "blosc2"),
        default="png",
        help="how pixels are stored: 16-bit PNG (png, default: any image tool opens it) or a Blosc2 array "
        "(blosc2: ~10x faster to decode, the same size on noisy images, larger on smooth ones)",
    )
    parser.add_argument(
        "--exact-decode",
        action="store_true",
        help="decode JPEG 2000 and JPEG images in full before resizing (exact, several times slower) instead of "
        "at the resolution stored (their wavelet levels / DCT scaling; within a few per mille of the window)",
    )
    parser.add_argument(
        "--decoder",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="who decodes JPEG 2000, HTJ2K and baseline JPEG: gpu = NVIDIA nvImageCodec on a CUDA GPU (pip install "
        "'radpretrain[gpu]'; in full, the pixels of --exact-decode), cpu = the CPU plugins, auto (default) = gpu when "
        "it works here, else cpu; the manifest counts how each file was decoded",
    )
    parser.add_argument(
        "--scan-text",
        nargs="?",
        const="unflagged",
        default="off",
        choices=("unflagged", "all"),
        help="OCR every image and withhold those with burned-in text beyond side/view markers (skipped as "
        "'burned-in text (detected)'; boxes, never the text, recorded in the private folder): unflagged (default "
        "with the flag) scans images without BurnedInAnnotation, all scans every image; needs radpretrain[ocr]",
    )
    parser.add_argument(
        "--text-markers",
        default=None,
        help="comma-separated words burned-in text may hold besides arrows and 1-2 letter tokens without digits "
        "(default L,R,LT,RT,LEFT,RIGHT,PA,AP,LAT,LATERAL,LL,RL,OBL,PORTABLE,PORT,ERECT,UPRIGHT,SUPINE,PRONE,...)",
    )
    parser.add_argument(
        "--part",
        default=None,
        metavar="i/N",
        help="write only part i of N of the plan (units i, i+N, ...; 0 <= i < N, e.g. "
        "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-(N-1)); needs `radpretrain index` first",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards (and index) made with other settings")
    parser.add_argument("--reindex", action="store_true", help="read the headers again instead of reusing the index")
    parser.set_defaults(func=_run_shard)


def _shard_size(text: str) -> int | str:
    """--shard-size: a positive number of files, or auto."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def _run_shard(args: argparse.Namespace) -> int:
    from radpretrain.config import build, to_dict
    from radpretrain.shards.plan import ShardConfig, parse_part
    from radpretrain.shards.run import shard

    part = parse_part(args.part) if args.part else None
    config = build(
        ShardConfig,
        {
            "size": args.size,
            "shard_size": args.shard_size,
            "val_fraction": args.val,
            "test_fraction": args.test,
            "seed": args.seed,
            "frames": args.frames,
            "codec": args.codec,
            "exact_decode": args.exact_decode,
            "index": to_dict(_index_options(args)),
            "scan_text": args.scan_text,
            "text_rules": {} if args.text_markers is None else {"markers": comma_list(args.text_markers) or []},
        },
    )
    summary = shard(
        args.src,
        args.out,
        config,
        key=args.key,
        private_dir=args.private_dir,
        workers=args.workers,
        part=part,
        overwrite=args.overwrite,
        reindex=args.reindex,
        progress=not args.no_progress,
        decoder=args.decoder,
    )
    rate = summary.files_processed / summary.seconds if summary.seconds > 0 else 0.0
    log.info(
        "shard: %d unit(s) written, %d already done, %.1f s (%.1f files/s)",
        summary.units_written,
        summary.units_skipped,
        summary.seconds,
        rate,
    )
    if summary.manifest is None:
        log.info(
            "shard: %d units of the plan are still to be written by other parts; the last part (or "
            "`radpretrain shard SRC OUT` run afterwards) writes manifest.json",
            summary.units_total - summary.units_written - summary.units_skipped,
        )
        return 0
    counts, splits = summary.manifest["counts"], summary.manifest["splits"]
    log.info(
        "shard: %d files seen: %d written (%d samples: %s), %d duplicate, %d skipped, %d failed",
        counts["files_seen"],
        counts["written"],
        counts["samples"],
        " / ".join(f"{name} {entry['samples']}" for name, entry in splits.items()),
        counts["duplicate"],
        sum(counts["skipped"].values()),
        sum(counts["failed"].values()),
    )
    log.info(
        "shard: shards and manifest.json in %s; reasons per file in errors.jsonl; the private lookup from "
        "file pseudonyms to paths is in %s (keep it inside the hospital)",
        summary.out,
        summary.private_dir,
    )
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "inspect",
        help="what a shard folder holds: composition report and a contact sheet",
        description=(
            "Print the composition of a shard folder (samples by split, body part, age bucket, sex, view, "
            "modality, vendor; skipped and failed files by reason; shard sizes) and write a PNG contact sheet "
            "of random samples, windowed as training sees them and captioned with their labels."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="shard folder (made by `radpretrain shard`)")
    parser.add_argument("--sheet", default=None, help="contact sheet path (default OUT/contact_sheet.png)")
    parser.add_argument("--n", type=positive_int, default=48, help="samples on the sheet (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="which random samples (default 0)")
    parser.add_argument(
        "--withheld",
        action="store_true",
        help="instead, draw the images withheld for burned-in text (re-read from the source, with the boxes "
        "where text was found) for a human to review; written to the private folder only "
        "(default OUT.private/withheld_sheet.png)",
    )
    parser.add_argument("--private-dir", default=None, help="the run's private folder (default: OUT.private)")
    parser.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from radpretrain.shards.inspect import inspect_shards

    sheet = inspect_shards(
        args.out, args.sheet, n=args.n, seed=args.seed, withheld=args.withheld, private_dir=args.private_dir
    )
    print(f"contact sheet: {sheet}")
    return 0
