"""Plain-PyTorch references for :func:`~trimformer.ops.varlen.pad` and :func:`~trimformer.ops.varlen.unpad`.

They rebuild the boolean padding mask from the batch's host metadata (lengths and row starts) with a Python loop
and use boolean indexing, so they share no code with the gather/scatter in ``pack.py``.
"""

from __future__ import annotations

import torch

from trimformer.ops.varlen.pack import PackedBatch


def naive_padding_mask(batch: PackedBatch) -> torch.Tensor:
    """``[N, S]`` bool, True where a padded slot holds a real token (CPU)."""
    mask = torch.zeros(batch.num_seqs, batch.padded_len, dtype=torch.bool)
    for i, (length, start) in enumerate(zip(batch.seqlens, batch.row_starts)):
        mask[i, start : start + length] = True
    return mask


def naive_unpad(padded: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Reference :func:`unpad`: ``padded[mask]`` with the mask rebuilt from lengths. ``[N, S, ...] -> [T, ...]``."""
    return padded[naive_padding_mask(batch).to(padded.device)]


def naive_pad(packed: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Reference :func:`pad`: zeros with ``out[mask] = packed``. ``[T, ...] -> [N, S, ...]``."""
    mask = naive_padding_mask(batch).to(packed.device)
    out = packed.new_zeros(*mask.shape, *packed.shape[1:])
    out[mask] = packed
    return out
