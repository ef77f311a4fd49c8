"""The `xmodal` command: one sub-command per module in this package.

Each module in COMMANDS defines `register(subparsers)` which adds its parser and sets
`func=run` on it; `run(args) -> int` does the work. Modules are imported lazily so that
`xmodal --help` stays fast and a broken optional dependency only breaks its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xmodal import __version__
from xmodal.errors import XModalError

# module name under xmodal.cli -> sub-command it provides (for the help listing order)
COMMANDS = [
    "eval",        # zero-shot or adapted retrieval evaluation
    "train",       # adapter training (single process or torchrun DDP)
    "methods",     # list registered parameter-efficient methods with parameter counts
    "data",        # `data inspect`: annotation readers
    "extract_frames",  # decode a dataset once into a frame cache
    "plot",        # loss / R@1 curves of a run directory
    "synth",       # generate the embedded image/video-text world
    "pretrain",    # contrastive pretraining of the project's small CLIP
    "demo",        # the end-to-end job behind `make demo`
    "index",       # build a retrieval index over a gallery
    "search",      # query an index with text
    "embed",       # clip-retrieval-layout embedding shards (torchrun / --shard i/N)
    "serve",       # HTTP search service + web page over indices
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmodal",
        description="Parameter-efficient transfer of CLIP-like dual encoders to vision-language retrieval.",
    )
    parser.add_argument("--version", action="version", version=f"xmodal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"xmodal.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"xmodal.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if argv is None and len(sys.argv) <= 1 else 2
    try:
        return int(args.func(args) or 0)
    except XModalError as exc:
        print(f"xmodal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `xmodal data inspect ... | head`: the reader went away; exit quietly as Unix tools do.
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
