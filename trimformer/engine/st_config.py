"""Read the sentence-transformers files of a model folder: pooling, normalisation and max sequence length.

* ``modules.json`` lists the pipeline; its ``Pooling`` entry points at a folder whose ``config.json`` holds either
  ``pooling_mode`` (newer releases) or ``pooling_mode_*`` booleans (older). A ``Normalize`` entry means
  L2-normalised outputs (its folder may be missing: it has no files to read).
* ``sentence_bert_config.json`` holds ``max_seq_length`` and ``do_lower_case``.

Without these files the defaults are mean pooling and no normalisation (what sentence-transformers does when it
wraps a plain HF model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trimformer.engine.pooling import ST_POOLING_NAMES

_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class SentenceTransformerSettings:
    """What the sentence-transformers files say.

    Attributes:
        pooling: our pooling mode, or ``None`` when the files request one we cannot compute (see ``pooling_error``).
        normalize: whether a ``Normalize`` module follows pooling.
        max_seq_length: truncation length, or ``None`` when unspecified.
        do_lower_case: lowercase texts before tokenizing.
        found: whether any sentence-transformers file was present.
        pooling_error: why ``pooling`` is ``None`` (an unsupported or combined mode), else ``None``.
    """

    pooling: str | None = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    found: bool = False
    pooling_error: str | None = None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def read_st_settings(folder: str | Path) -> SentenceTransformerSettings:
    """Parse the sentence-transformers files in ``folder`` (all optional)."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    bert_cfg_file = folder / "sentence_bert_config.json"
    pooling_dir: Path | None = None
    normalize = False
    found = False
    if modules_file.is_file():
        found = True
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise ValueError(f"{modules_file} must hold a JSON list of modules")
        for entry in modules:
            kind = str(entry.get("type", "")) if isinstance(entry, dict) else ""
            if kind.endswith("Pooling"):
                pooling_dir = folder / str(entry.get("path", ""))
            elif kind.endswith("Normalize"):
                normalize = True
    elif (folder / "1_Pooling" / "config.json").is_file():
        found, pooling_dir = True, folder / "1_Pooling"
    pooling, error = "mean", None
    if pooling_dir is not None and (pooling_dir / "config.json").is_file():
        pooling, error = _pooling_from_config(_read_json(pooling_dir / "config.json"), pooling_dir / "config.json")
    max_seq_length, lower = None, False
    if bert_cfg_file.is_file():
        found = True
        cfg = _read_json(bert_cfg_file)
        if isinstance(cfg, dict):
            value = cfg.get("max_seq_length")
            max_seq_length = int(value) if isinstance(value, int) and value > 0 else None
            lower = bool(cfg.get("do_lower_case", False))
    return SentenceTransformerSettings(pooling, normalize, max_seq_length, lower, found, error)


def _pooling_from_config(cfg: object, path: Path) -> tuple[str | None, str | None]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object")
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_KEYS.items() if cfg.get(key)]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if not modes:
        return "mean", None
    if len(modes) > 1:
        return None, f"{path} combines pooling modes {modes}; trimformer pools with one mode (pass pooling=...)"
    ours = ST_POOLING_NAMES.get(modes[0])
    if ours is None:
        return None, f"{path} asks for pooling {modes[0]!r}, which trimformer does not compute (pass pooling=...)"
    return ours, None
