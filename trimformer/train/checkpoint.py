"""Checkpoints that any layout can resume: full (unsharded) state gathered to rank 0, saved without distributed state.

A checkpoint is a folder ``<out_dir>/checkpoints/step_<N>/``:

* ``config.json`` + ``model.safetensors``: an HF model folder (``TrimformerForCausalLM.from_pretrained`` loads it);
* ``trainer_state.pt``: the AdamW state keyed by parameter name (``torch.distributed.checkpoint.state_dict`` full
  optimizer state dict, so DDP, FSDP2 and single-process runs share one format), the scheduler, step, data position
  (blocks consumed), tokens seen, every rank's RNG states, the run config and the data fingerprint.

Every rank takes part in gathering (FSDP2 all-gathers the shards); rank 0 writes into ``step_<N>.tmp`` and renames
it, then writes the folder name into ``<out_dir>/checkpoints/latest``. Loading reads the full state on every rank and
lets ``set_model_state_dict`` / ``set_optimizer_state_dict`` shard it for the current layout, so a 2-GPU FSDP2
checkpoint resumes on 1 GPU, on CPU, or under DDP.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trimformer.train.distributed import DistInfo, unwrap

FORMAT_VERSION = 1
_IMPL_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (when present) CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (the CUDA state is skipped when this process has no CUDA)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(
    out_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    info: DistInfo,
    *,
    step: int,
    data_position: int,
    tokens_seen: int,
    run_config: dict[str, Any],
    data_fingerprint: str,
    keep: int = 2,
) -> Path:
    """Write ``<out_dir>/checkpoints/step_<step>/`` (collective: call on every rank). Returns the folder."""
    from safetensors.torch import save_file

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = unwrap(model)
    model_sd = get_model_state_dict(inner, options=opts)
    optim_sd = get_optimizer_state_dict(inner, optimizer, options=opts)
    rngs = _gather_objects(rng_state(), info)
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    if info.is_main:
        tmp = root / f"step_{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = inner.config
        if config.tie_word_embeddings:
            model_sd.pop("lm_head.weight", None)
        tensors = {k: v.contiguous() for k, v in model_sd.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        torch.save(
            {
                "format": FORMAT_VERSION,
                "optimizer": optim_sd,
                "scheduler": scheduler.state_dict(),
                "step": step,
                "data_position": data_position,
                "tokens_seen": tokens_seen,
                "rng": rngs,
                "world_size": info.world_size,
                "run_config": run_config,
                "data_fingerprint": data_fingerprint,
            },
            tmp / "trainer_state.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest").write_text(final.name + "\n")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[: max(0, len(old) - keep)] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    if info.enabled:
        dist.barrier()
    return final


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The latest complete checkpoint of a run folder, or ``None``."""
    root = Path(out_dir) / "checkpoints"
    latest = root / "latest"
    if latest.is_file():
        p = root / latest.read_text().strip()
        if (p / "trainer_state.pt").is_file():
            return p
    done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, info: DistInfo
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from a checkpoint folder (collective: call on every rank).

    Returns:
        The trainer state (``step``, ``data_position``, ``tokens_seen``, ``run_config``, ``data_fingerprint``, ...).

    Raises:
        FileNotFoundError: not a checkpoint folder.
        ValueError: written by an incompatible format.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "trainer_state.pt").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a trimformer checkpoint (model.safetensors + trainer_state.pt)")
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    inner = unwrap(model)
    model_sd = load_file(path / "model.safetensors")
    if inner.config.tie_word_embeddings:
        model_sd["lm_head.weight"] = model_sd["model.embed_tokens.weight"]
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(inner, model_sd, options=opts)
    optim_sd = state["optimizer"]
    for saved, current in zip(optim_sd["param_groups"], optimizer.param_groups):
        saved.update({k: current[k] for k in _IMPL_FLAGS if k in current})  # keep this run's kernels (fused/...)
    set_optimizer_state_dict(inner, optimizer, optim_sd, options=opts)
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    return state
