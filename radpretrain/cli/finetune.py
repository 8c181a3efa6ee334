"""`radpretrain finetune | sweep | report | analyze`: transfer to small labeled cohorts and what it changed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from radpretrain.cli.args import add_config_arguments, positive_int, split_config_arguments


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="finetune an encoder on a small labeled cohort",
        description=(
            "Build a 2D/3D segmentation or classification model around an exported encoder with a transfer "
            "strategy (random, full, frozen, partial, transfusion:K, meanvar, lp-ft, dwp, weak+NAME, weak-only), "
            "train it on a patient-level split of the cohort and write metrics.json, log.jsonl, config.yaml "
            "and the finetuned model to `out`. Example: radpretrain finetune configs/finetune/lungs.yaml "
            "encoder=runs/pretrain/encoder strategy=transfusion:2 n_train=10"
        ),
    )
    add_config_arguments(p)
    p.set_defaults(func=_run_finetune)

    p = sub.add_parser(
        "sweep",
        help="label count x repeat x strategy x encoder grid -> results.jsonl",
        description=(
            "Run every cell of a few-label grid on one cohort with one fixed patient-level test set; each "
            "repeat draws a different patient-level labeled subset from the same pool. One JSON line per "
            "finished cell in OUT/results.jsonl; rerunning the same command skips finished cells. Then "
            "writes the report (see `radpretrain report`)."
        ),
    )
    add_config_arguments(p)
    p.set_defaults(func=_run_sweep)

    p = sub.add_parser(
        "report",
        help="tables, paired statistics and learning curves of a sweep",
        description=(
            "Read a sweep's results.jsonl and write report.md (mean (sd) per strategy and label count with a "
            "95% patient-level bootstrap interval over the test set and the model-selection rule, paired "
            "differences against the baseline with 95% t-intervals from 6 pairs on, sign-flip permutation "
            "and Wilcoxon signed-rank p-values with Holm adjustment, failed runs counted; for AUROC, DeLong's "
            "test per repeat), summary.csv, paired.csv, delong.csv and learning_curve.png."
        ),
    )
    p.add_argument("results", help="results.jsonl, or the sweep folder holding it")
    p.add_argument("--out", help="folder for the report (default: beside the results)")
    p.add_argument("--metric", help="metric to report (default: dice, else auroc, ...)")
    p.add_argument("--baseline", default="random", help="strategy the others are paired against (default: random)")
    p.add_argument(
        "--flips",
        type=positive_int,
        default=100000,
        help="random sign flips of the permutation p above 20 pairs (exact up to 20; default: 100000)",
    )
    p.add_argument(
        "--resamples",
        type=positive_int,
        default=2000,
        help="patient-level bootstrap resamples of the test set per cell interval (default: 2000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random sign flips and the bootstrap (default: 0)")
    p.set_defaults(func=_run_report)

    p = sub.add_parser(
        "analyze",
        help="what finetuning changed: per-layer CKA and first-layer filters",
        description=(
            "Compare an encoder before and after finetuning as the Transfusion paper did: linear CKA "
            "(Kornblith et al. 2019) between the two encoders' stage outputs on a batch of cohort images "
            "(cka.json + cka.png), and a picture of both first-layer filter banks (filters.png)."
        ),
    )
    p.add_argument("--before", required=True, help="encoder folder before finetuning (e.g. the exported encoder)")
    p.add_argument("--after", required=True, help="encoder folder after finetuning (a finetune run's encoder/)")
    p.add_argument("--cohort", required=True, help="cohort whose images probe the encoders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=positive_int, default=32, help="cohort images to use (default: 32)")
    p.add_argument("--size", type=positive_int, default=224, help="image side in pixels (default: 224)")
    p.add_argument("--structure", help="which masks' images to use when the cohort table holds several structures")
    p.set_defaults(func=_run_analyze)


def _run_finetune(args: argparse.Namespace) -> int:
    from radpretrain.config import load_config
    from radpretrain.finetune.config import FinetuneConfig
    from radpretrain.finetune.sweep import run_finetune

    path, overrides = split_config_arguments(args)
    cfg = load_config(FinetuneConfig, path, overrides)
    result = run_finetune(cfg)
    print(json.dumps({"out": str(cfg.out), "metrics": result["metrics"]}, indent=2))
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from radpretrain.config import load_config
    from radpretrain.finetune.config import SweepConfig
    from radpretrain.finetune.sweep import sweep_and_report

    path, overrides = split_config_arguments(args)
    results, files = sweep_and_report(load_config(SweepConfig, path, overrides))
    print(f"results: {results}\nreport: {files.markdown}\nplot: {files.plot}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from radpretrain.finetune.report import write_report

    files = write_report(
        args.results,
        args.out,
        metric=args.metric,
        baseline=args.baseline,
        flips=args.flips,
        seed=args.seed,
        resamples=args.resamples,
    )
    print(files.markdown.read_text())
    written = [files.markdown, files.summary_csv, files.paired_csv, files.plot, files.delong_csv]
    print("written: " + ", ".join(str(path) for path in written if path is not None))
    return 0


def _run_analyze(args: argparse.Namespace) -> int:
    from radpretrain.finetune.analyze import analyze

    files = analyze(
        Path(args.before),
        Path(args.after),
        Path(args.cohort),
        Path(args.out),
        images=args.images,
        size=args.size,
        structure=args.structure,
    )
    print("written: " + ", ".join(str(f) for f in files))
    return 0
