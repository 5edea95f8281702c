"""The ``trimformer`` command line.

Each subcommand lives in ``trimformer/commands/<name>.py`` and exposes ``add_parser(subparsers)`` and
``run(args) -> int``. Command modules import torch and friends inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from trimformer import __version__

COMMANDS = ("embed", "serve", "train", "bench", "attention_info")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimformer",
        description="Transformers that compute only what they need: padding-free encoders and CCA attention.",
    )
    parser.add_argument("--version", action="version", version=f"trimformer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"trimformer.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"trimformer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trimformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
