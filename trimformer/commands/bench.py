"""``trimformer bench <suite>``: run a benchmark suite, append CSV rows, render Markdown and plots."""

from __future__ import annotations

import importlib


def add_parser(subparsers) -> None:
    from trimformer.bench import SUITES

    parser = subparsers.add_parser("bench", help="run a benchmark suite (results under benchmarks/results/<device>/)")
    suites = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, (module, help_text) in SUITES.items():
        sub = suites.add_parser(name, help=help_text)
        sub.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>/)")
        sub.set_defaults(run=_runner(module))
        try:
            suite = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            sub.set_defaults(run=_missing(name))
            continue
        suite.add_arguments(sub)


def _runner(module: str):
    def run(args) -> int:
        return importlib.import_module(module).run(args)

    return run


def _missing(name: str):
    def run(args) -> int:
        raise ValueError(f"benchmark suite {name!r} is not available in this build")

    return run
