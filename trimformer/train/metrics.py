"""Run logs: one JSON object per line (``log.jsonl``) and the loss-curve PNG rendered from it.

Records have ``"kind": "train"`` (``step``, ``tokens``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``,
``elapsed_s``), ``"kind": "eval"`` (``step``, ``tokens``, ``val_loss``) or ``"kind": "run"`` (start/resume/end
metadata).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class JsonlLog:
    """Append-only JSONL log (written by rank 0 only; other ranks get a no-op log)."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        """Append one record (flushed at once)."""
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def reset(self) -> None:
        """Start an empty log (a fresh run in a folder that held an older one)."""
        if self.enabled and self.path.exists():
            self.path.unlink()

    def truncate_after(self, step: int) -> None:
        """Drop train/eval records after ``step`` (a resume replays them)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_log(self.path) if r.get("kind") == "run" or r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def read_log(path: str | os.PathLike) -> list[dict]:
    """All records of a ``log.jsonl``."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_losses(log_path: str | os.PathLike, png_path: str | os.PathLike, *, title: str = "training loss") -> Path:
    """Render train loss and validation loss against training tokens from a ``log.jsonl`` into a PNG."""
    from trimformer.bench.common import line_plot

    records = read_log(log_path)
    train = [(r["tokens"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    series = {}
    if train:
        series["train loss"] = ([t for t, _ in train], [v for _, v in train])
    if val:
        series["validation loss"] = ([t for t, _ in val], [v for _, v in val])
    if not series:
        raise ValueError(f"{log_path} holds no train or eval records to plot")
    return line_plot(png_path, series, title=title, xlabel="training tokens", ylabel="loss (nats/token)")
