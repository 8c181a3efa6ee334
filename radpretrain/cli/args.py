"""Argument types and helpers that the command modules share."""

from __future__ import annotations

import argparse


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


def comma_list(text: str | None) -> list[str] | None:
    """`"a, b,,c"` -> `["a", "b", "c"]`; None stays None (the option was not given)."""
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


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
