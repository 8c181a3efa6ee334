"""`radpretrain {synth,index,shard,inspect,pretrain,export,finetune,sweep,report,analyze,demo}`."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Sequence

from radpretrain import __version__
from radpretrain.errors import RadPretrainError

# Each part adds its own subcommands (parse, load config, call one library function); heavy imports
# stay inside the handlers so that `--help` is instant.
COMMAND_MODULES: tuple[str, ...] = (
    "radpretrain.shards.commands",
    "radpretrain.finetune.commands",
    "radpretrain.pretrain.commands",
    "radpretrain.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radpretrain",
        description=(
            "Turn a PACS export into your own radiograph foundation encoder: de-identified webdataset "
            "shards (synth, index, shard, inspect), self-supervised pretraining (pretrain, export) and "
            "transfer to small labeled cohorts (finetune, sweep, report, analyze). "
            "`radpretrain demo` runs the whole path on a synthetic archive."
        ),
    )
    parser.add_argument("--version", action="version", version=f"radpretrain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.set_defaults(func=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.func is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RadPretrainError as exc:
        return fail(str(exc), 2)
    except KeyboardInterrupt:
        return fail("interrupted; finished work is kept, run the same command again to resume", 130)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return fail("no space left on device; free space and run the same command again to resume", 1)
        return fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), 1)


def fail(message: str, code: int) -> int:
    print(f"radpretrain: error: {message}", file=sys.stderr)
    return code


# Argument types shared by the parts' command modules.


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got '{text}'") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG file plus `key=value` overrides, as `pretrain`, `finetune` and `sweep` take them."""
    parser.add_argument("config", nargs="?", help="YAML config file (optional: defaults otherwise)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config values, e.g. optim.lr=1e-4")


def split_config_arguments(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """Let the first positional be an override when no config file is given (`pretrain steps=10`)."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides
