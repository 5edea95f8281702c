"""AdamW with decoupled weight decay on weight matrices only, and a linear-warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices (``ndim >= 2``, embeddings and LM head included), none for norms,
    biases, CCA convolutions (identity-initialised kernels) and key temperatures."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "conv" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas, eps: float, fused: bool = False):
    """``torch.optim.AdamW`` over :func:`param_groups` (``fused`` on CUDA when the parameters are plain tensors)."""
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **kw)


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a cosine from 1 down to
    ``min_lr_ratio`` reached at the last step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """``LambdaLR`` applying :func:`lr_multiplier` (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio),
    )
