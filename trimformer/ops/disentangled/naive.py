"""Plain-PyTorch reference of packed disentangled attention (DeBERTa-v2/v3), one sequence at a time.

Follows HF ``DisentangledSelfAttention`` literally: relative positions ``i - j`` are log-bucketed, the c2p index is
``clamp(bucket(i - j) + span, 0, 2 span - 1)`` into the position keys, the p2c index is
``clamp(-bucket(j - i) + span, 0, 2 span - 1)`` into the position queries, and

    score[i, j] = scale * (q_i . k_j + q_i . Kr[c2p(i, j)] + k_j . Qr[p2c(i, j)])

Positions are taken within each packed sequence, so a sequence's output does not depend on its batchmates.
"""

from __future__ import annotations

import math

import torch


def log_bucket_position(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """DeBERTa's log buckets (HF ``make_log_bucket_position``): exact inside ``(-bucket_size/2, bucket_size/2)``,
    logarithmic outside, odd in ``relative_pos``.

    Args:
        relative_pos: int64 relative positions, any shape.
        bucket_size: ``position_buckets`` (> 0).
        max_position: ``max_relative_positions`` (> 0).

    Returns:
        int64 bucketed positions, same shape.
    """
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where(
        (relative_pos < mid) & (relative_pos > -mid),
        torch.tensor(mid - 1).type_as(relative_pos),
        torch.abs(relative_pos),
    )
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign).to(torch.long)


def relative_positions(length: int, position_buckets: int, max_relative_positions: int, device=None) -> torch.Tensor:
    """``[length, length]`` int64 relative positions ``i - j`` of one sequence, bucketed when ``position_buckets > 0``
    and ``max_relative_positions > 0`` (HF ``build_relative_position``)."""
    ids = torch.arange(length, dtype=torch.long, device=device)
    rel = ids[:, None] - ids[None, :]
    if position_buckets > 0 and max_relative_positions > 0:
        rel = log_bucket_position(rel, position_buckets, max_relative_positions)
    return rel


def naive_disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    c2p: bool,
    p2c: bool,
    position_buckets: int,
    max_relative_positions: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference for :func:`trimformer.ops.disentangled.disentangled_attention` (any dtype incl. float64, autograd).

    Args:
        q, k, v: ``[T, H, D]`` packed queries, keys, values.
        cu_seqlens: ``[N + 1]`` int32 cumulative lengths.
        max_seqlen: longest sequence (unused here beyond the signature).
        pos_key: ``[2 * span, H, D]`` position keys ``Kr`` (the relative embeddings through the key projection);
            needed when ``c2p``.
        pos_query: ``[2 * span, H, D]`` position queries ``Qr``; needed when ``p2c``.
        c2p, p2c: which disentangled terms to add.
        position_buckets, max_relative_positions: bucketing parameters (``position_buckets <= 0``: no buckets).
        scale: logit scale, default ``1 / sqrt(D * (1 + c2p + p2c))``.

    Returns:
        ``[T, H, D]`` in the dtype of ``q``.
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d * (1 + int(c2p) + int(p2c))) if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs, ks, vs = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
        scores = qs @ ks.transpose(-1, -2)  # [H, L, L]
        n = end - start
        rel = relative_positions(n, position_buckets, max_relative_positions, device=q.device)
        if c2p:
            span = pos_key.shape[0] // 2
            c2p_att = qs @ pos_key.permute(1, 2, 0)  # [H, L, 2 span]
            idx = torch.clamp(rel + span, 0, 2 * span - 1)
            scores = scores + torch.gather(c2p_att, -1, idx.expand(qs.shape[0], n, n))
        if p2c:
            span = pos_query.shape[0] // 2
            p2c_att = ks @ pos_query.permute(1, 2, 0)  # [H, L(key), 2 span]
            idx = torch.clamp(-rel + span, 0, 2 * span - 1)  # [key j, query i]: -bucket(j - i) + span
            scores = scores + torch.gather(p2c_att, -1, idx.expand(ks.shape[0], n, n)).transpose(-1, -2)
        probs = torch.softmax(scores * scale, dim=-1)
        out[start:end] = (probs @ vs).transpose(0, 1)
    return out
