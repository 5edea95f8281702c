"""Pooling of packed token states into one vector per sequence (no padding involved)."""

from __future__ import annotations

import torch

#: pooling modes trimformer computes; sentence-transformers names map onto them (see ``ST_POOLING_NAMES``).
POOLING_MODES = ("cls", "mean", "max", "last", "mean_sqrt_len")

#: sentence-transformers pooling names -> ours (``weightedmean`` has no counterpart here).
ST_POOLING_NAMES = {
    "cls": "cls",
    "cls_token": "cls",
    "mean": "mean",
    "mean_tokens": "mean",
    "max": "max",
    "max_tokens": "max",
    "lasttoken": "last",
    "last": "last",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "mean_sqrt_len": "mean_sqrt_len",
}


def check_pooling(mode: str) -> str:
    """``mode`` if supported, else ``ValueError`` naming the supported modes."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unsupported pooling {mode!r}; use one of {', '.join(POOLING_MODES)}")
    return mode


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per packed sequence, accumulated in fp32.

    Args:
        hidden: ``[T, H]`` token states of ``N`` sequences back to back (any float dtype).
        cu_seqlens: ``[N + 1]`` int32 on ``hidden``'s device; every sequence must be non-empty.
        mode: ``"cls"`` (first token), ``"last"`` (last token), ``"mean"``, ``"max"`` or ``"mean_sqrt_len"``
            (sum / sqrt(length)), over all tokens of a sequence including special tokens (as sentence-transformers).

    Returns:
        ``[N, H]`` float32 on ``hidden``'s device. No host synchronisation.
    """
    check_pooling(mode)
    cu = cu_seqlens.long()
    if mode == "cls":
        return hidden.index_select(0, cu[:-1]).float()
    if mode == "last":
        return hidden.index_select(0, cu[1:] - 1).float()
    n, t, h = cu.shape[0] - 1, hidden.shape[0], hidden.shape[1]
    lengths = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths, output_size=t)
    x = hidden.float()
    if mode == "max":
        out = torch.full((n, h), float("-inf"), device=hidden.device)
        return out.scatter_reduce_(0, seq_of_token[:, None].expand(t, h), x, "amax", include_self=True)
    sums = torch.zeros(n, h, device=hidden.device).index_add_(0, seq_of_token, x)
    denom = lengths.float()
    if mode == "mean_sqrt_len":
        denom = denom.sqrt()
    return sums / denom[:, None]
