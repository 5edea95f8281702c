"""Plain-PyTorch references for the attention ops (CPU, any dtype incl. float64, autograd).

Varlen references loop over ``cu_seqlens`` segments and call the dense reference, so they are slow but unambiguous.
"""

from __future__ import annotations

import math

import torch


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Dense softmax attention of one sequence.

    Args:
        q: ``[S_q, Hq, D]``; k, v: ``[S_k, Hk, D]`` with ``Hq % Hk == 0`` (query head h uses kv head h // (Hq // Hk)).
        causal: bottom-right aligned mask: query i sees keys j <= i + S_k - S_q.
        scale: logit scale, default ``1/sqrt(D)``.
        window: ``(left, right)``: query i (at key position ``i + S_k - S_q``) sees keys within ``left`` before and
            ``right`` after it; ``None`` for no window.

    Returns:
        ``[S_q, Hq, D]`` in the dtype of ``q``.
    """
    s_q, hq, d = q.shape
    s_k, hk, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hk
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    i = torch.arange(s_q, device=q.device)[:, None] + (s_k - s_q)
    j = torch.arange(s_k, device=q.device)[None, :]
    if causal:
        scores = scores.masked_fill(j > i, float("-inf"))
    if window is not None:
        scores = scores.masked_fill((j < i - window[0]) | (j > i + window[1]), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def naive_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Reference for :func:`trimformer.ops.attention.varlen_attention`: one dense attention per packed segment
    (``window`` as a ``(left, right)`` pair or ``None``)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = naive_attention(
                q[start:end], k[start:end], v[start:end], causal=causal, scale=scale, window=window
            )
    return out


def naive_kvcache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference for :func:`trimformer.ops.attention.kvcache_attention`.

    Query ``i`` of batch row ``b`` sits at position ``cache_seqlens[b] - Tq + i`` and sees cache rows up to it.
    """
    out = torch.empty_like(q)
    for b, n in enumerate(cache_seqlens.tolist()):
        out[b] = naive_attention(q[b], k_cache[b, :n], v_cache[b, :n], causal=True, scale=scale)
    return out
