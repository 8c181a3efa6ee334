"""`radpretrain {synth,index,shard,inspect,pretrain,export,embed,finetune,sweep,report,analyze,demo}`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from collections.abc import Sequence

from radpretrain import __version__
from radpretrain.cli import demo, embed, finetune, pretrain, shards
from radpretrain.errors import RadPretrainError

# Each part adds its own subcommands (parse, build a config, call one library function); heavy imports
# stay inside the handlers so that `--help` is instant. The order is the order of `--help`.
PARTS = (shards, finetune, pretrain, embed, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radpretrain",
        description=(
            "Turn a PACS export into your own radiograph foundation encoder: de-identified webdataset "
            "shards (synth, index, shard, inspect), self-supervised pretraining (pretrain, export), a look at "
            "the archive through an encoder (embed) and "
            "transfer to small labeled cohorts (finetune, sweep, report, analyze). "
            "`radpretrain demo` runs the whole path on a synthetic archive."
        ),
    )
    parser.add_argument("--version", action="version", version=f"radpretrain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.set_defaults(func=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for part in PARTS:
        part.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make torch ~10x slower on CPU whenever another process
    # (a loader worker, a second rank) shares the cores; sleeping waits cost nothing measurable.
    # Set before torch is imported (handlers import it lazily); a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise  # a bug, not bad input: keep the traceback
        return fail(describe_os_error(failure), 1)


def fail(message: str, code: int) -> int:
    print(f"radpretrain: error: {one_line(message)}", file=sys.stderr)
    return code


def one_line(message: str) -> str:
    """The message as one line; an error re-raised from a DataLoader worker keeps only its own last line."""
    if "Original Traceback" in message:  # torch wraps it as "Caught X in DataLoader worker ...\n<traceback>"
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        message = re.sub(r"^[\w.]+: ", "", lines[-1])  # drop "radpretrain.errors.ShardError: "
    return " ".join(message.split())


# A full disk, a quota or a file-size limit ends a run with one line; what was finished before is kept.
_FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the file-size limit (ulimit -f)",
}
# torch.save's zip writer reports a failed write without an errno.
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "unexpected pos")


def write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`, also when a library reports a failed write as its own exception type."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    match = re.search(r"\(os error (\d+)\)", text)  # safetensors (Rust): "I/O error: File too large (os error 27)"
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _TORCH_WRITE_FAILED):
        return OSError(errno.EIO, "torch.save could not write its file (a full disk or a file-size limit?)")
    return None


def describe_os_error(exc: OSError) -> str:
    if exc.errno in _FULL:
        return f"{_FULL[exc.errno]}; free space (or raise the limit) and run the same command again to resume"
    text = exc.strerror or str(exc)
    if exc.errno == errno.EIO and "torch.save" in text:
        return f"{text}; free space and run the same command again to resume"
    if exc.errno == errno.EEXIST and exc.filename and os.path.isfile(exc.filename):
        return f"{exc.filename} is a file where a folder is needed; give a folder path"
    if exc.errno == errno.ENOTDIR and exc.filename:
        return f"part of {exc.filename} is a file where a folder is needed; give a folder path"
    return text + (f": {exc.filename}" if exc.filename else "")
