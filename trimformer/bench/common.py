"""Shared benchmark plumbing: environment capture, timing, CSV rows, Markdown tables and plots.

Every suite appends rows with the same columns to ``benchmarks/results/<device>/<suite>.csv`` (never edited by
hand), then renders ``<suite>.md`` and PNG plots from the rows of the current run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

COLUMNS = (
    "timestamp",
    "run_id",
    "git_sha",
    "trimformer",
    "torch",
    "triton",
    "transformers",
    "cuda",
    "device",
    "suite",
    "case",
    "provider",
    "params",
    "metric",
    "unit",
    "p50",
    "p20",
    "p80",
    "n",
)


def repo_root() -> Path:
    """The checkout holding this package (falls back to the working directory for a wheel install)."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def git_sha() -> str:
    """Short commit of the checkout (``+dirty`` when tracked files changed); ``TRIMFORMER_GIT_SHA`` overrides it
    for copies of the tree without ``.git`` (e.g. on a remote GPU box)."""
    override = os.environ.get("TRIMFORMER_GIT_SHA")
    if override:
        return override
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=5
        )
        sha = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_root(),
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return f"{sha}+dirty" if sha and dirty else sha
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def device_slug() -> str:
    """Short folder name for results: ``h100``, ``h200``, ``h200x2``, ... or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for key in ("h100", "h200", "a100", "l40s", "l4", "b200"):
        if key in name:
            n = torch.cuda.device_count()
            return key if n == 1 else f"{key}x{n}"
    return name.replace("nvidia", "").strip().split()[0]


@dataclass
class Recorder:
    """Collects rows of one run of one suite and writes them out."""

    suite: str
    out_dir: Path
    run_id: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self._env = {
            "git_sha": git_sha(),
            "trimformer": _version("trimformer"),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "cuda": torch.version.cuda or "",
            "device": device_name(),
        }

    @classmethod
    def for_suite(cls, suite: str, out: str | os.PathLike | None = None) -> Recorder:
        out_dir = Path(out) if out else repo_root() / "benchmarks" / "results" / device_slug()
        out_dir.mkdir(parents=True, exist_ok=True)
        return cls(suite=suite, out_dir=out_dir)

    def add(
        self,
        case: str,
        provider: str,
        metric: str,
        unit: str,
        samples: Sequence[float] | float,
        **params,
    ) -> dict:
        """Record one measurement: ``samples`` are raw repeats (quantiles are taken here) or a single value."""
        values = [float(samples)] if isinstance(samples, (int, float)) else [float(s) for s in samples]
        p20, p50, p80 = quantiles(values)
        row = {
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "run_id": self.run_id,
            **self._env,
            "suite": self.suite,
            "case": case,
            "provider": provider,
            "params": json.dumps(params, sort_keys=True),
            "metric": metric,
            "unit": unit,
            "p50": p50,
            "p20": p20,
            "p80": p80,
            "n": len(values),
        }
        self.rows.append(row)
        return row

    @property
    def csv_path(self) -> Path:
        return self.out_dir / f"{self.suite}.csv"

    def write_csv(self) -> Path:
        """Append this run's rows to ``<suite>.csv`` (header written once)."""
        path = self.csv_path
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            for row in self.rows:
                writer.writerow(row)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.out_dir / name
        path.write_text(text)
        return path

    def env_line(self) -> str:
        e = self._env
        return (
            f"device {e['device']}; torch {e['torch']}, triton {e['triton'] or '-'}, transformers "
            f"{e['transformers'] or '-'}, CUDA {e['cuda'] or '-'}; git {e['git_sha'] or '-'}; run {self.run_id}"
        )


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results CSV with ``params`` decoded and numbers parsed."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["params"] = json.loads(row["params"]) if row.get("params") else {}
        for key in ("p50", "p20", "p80"):
            row[key] = float(row[key])
        row["n"] = int(row["n"])
    return rows


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of the samples (all equal for a single sample)."""
    if not values:
        raise ValueError("no samples")
    if len(values) == 1:
        return values[0], values[0], values[0]
    qs = statistics.quantiles(values, n=10, method="inclusive")
    return qs[1], statistics.median(values), qs[7]


def time_cpu(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5, min_time_s: float = 0.0) -> list[float]:
    """Wall-clock seconds of ``fn()`` per repeat, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    start_all = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def time_cuda(fn: Callable[[], object], *, warmup: int = 5, repeat: int = 50) -> list[float]:
    """Milliseconds of ``fn()`` per repeat, measured with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def capture_cuda_graph(fn: Callable[[], object], *, warmup: int = 2) -> Callable[[], None]:
    """Capture ``fn`` (static inputs) in a CUDA graph after ``warmup`` calls on a side stream; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_cuda_graph(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 50) -> list[float]:
    """Milliseconds per replay of ``fn`` captured in a CUDA graph (static inputs; outputs overwritten)."""
    return time_cuda(capture_cuda_graph(fn, warmup=warmup), warmup=warmup, repeat=repeat)


def int_list(text: str, flag: str | None = None) -> list[int]:
    """``"1,16, 64"`` -> ``[1, 16, 64]`` (empty items skipped).

    With ``flag`` (the option's name), the list must be non-empty and every item a positive integer, else a
    ``ValueError`` names the option.
    """
    if flag is None:
        return [int(x) for x in text.split(",") if x.strip()]
    bad = ValueError(f"{flag} takes comma-separated positive integers, got {text!r}")
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise bad from None
    if not values or min(values) <= 0:
        raise bad
    return values


def bytetransformer_lengths(b: int, s: int, seed: int) -> list[int]:
    """``b`` sequence lengths, uniform integers in ``[0.2 S, S]`` (ByteTransformer: ``avg = 0.6 S``,
    ``low = 2 avg - S``), deterministic in ``(b, s, seed)``."""
    gen = torch.Generator().manual_seed(seed * 100003 + b * 1009 + s)
    return torch.randint(max(1, round(0.2 * s)), s + 1, (b,), generator=gen).tolist()


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats are printed with 3 significant decimals."""

    def fmt(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def line_plot(
    path: str | os.PathLike,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
) -> Path:
    """Save a PNG line plot of ``{label: (xs, ys)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
