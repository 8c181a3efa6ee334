"""`radpretrain demo OUT [key=value ...]`: the whole path on a synthetic archive."""

from __future__ import annotations

import argparse
from pathlib import Path

from radpretrain.cli.args import add_config_arguments, split_config_arguments


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the whole path on a synthetic archive",
        description=(
            "Synthesise a PACS export, shard it, pretrain an encoder with SimCLR + metadata labels, export it "
            "with a model card, run a few-label lung-segmentation sweep (random vs full vs frozen) and report. "
            "A second run reuses finished stages. Override the embedded defaults with key=value "
            "(e.g. files=600 steps=50 for a quick look)."
        ),
    )
    parser.add_argument("out", type=Path, help="folder for everything the demo makes")
    add_config_arguments(parser)
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from radpretrain.config import load_config
    from radpretrain.demo import DemoConfig, format_summary, run_demo

    config, overrides = split_config_arguments(args)
    cfg = load_config(DemoConfig, config, overrides)
    outputs = run_demo(cfg, args.out)
    print(format_summary(outputs))
    return 0
