"""Disentangled attention through PyTorch ops: the CPU path and the fallback where the Triton kernel cannot run.

Sequences are grouped into buckets of similar length (the plan of the plain attention's CPU path); each bucket
gathers its c2p/p2c terms from the precomputed ``q Kr^T`` / ``k Qr^T`` rows into a ``[n, H, L, L]`` additive bias
(chunked so a bias stays under ``_MAX_BIAS_ELEMENTS``) and runs one padded ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trimformer.ops.attention.torch_path import bucket_plan

_MAX_BIAS_ELEMENTS = 1 << 24


def torch_disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    c2p_scores: torch.Tensor | None,
    p2c_scores: torch.Tensor | None,
    table: torch.Tensor,
    table_length: int,
    *,
    scale: float,
) -> torch.Tensor:
    """Same contract as :func:`trimformer.ops.disentangled.forward.disentangled_attention_fwd` (differentiable)."""
    total, heads, d = q.shape
    out = q.new_zeros(total + 1, heads, d)
    zero = q.new_zeros(1, heads, d)
    qz, kz, vz = torch.cat([q, zero]), torch.cat([k, zero]), torch.cat([v, zero])
    c2pz = None if c2p_scores is None else torch.cat([c2p_scores, c2p_scores.new_zeros(1, *c2p_scores.shape[1:])])
    p2cz = None if p2c_scores is None else torch.cat([p2c_scores, p2c_scores.new_zeros(1, *p2c_scores.shape[1:])])
    acc = torch.promote_types(q.dtype, torch.float32)  # the bias is summed in fp32 (fp64 for fp64 inputs)
    for bucket in bucket_plan(cu_seqlens):
        n_all, length = bucket.rows.shape
        ar = torch.arange(length, device=q.device)
        if c2pz is not None or p2cz is not None:
            rel_rows = table.long()[ar[:, None] - ar[None, :] + table_length - 1]  # [L(i), L(j)]
        step = max(1, _MAX_BIAS_ELEMENTS // (heads * length * length))
        for c0 in range(0, n_all, step):
            rows = bucket.rows[c0 : c0 + step]
            n = rows.shape[0]
            key_mask = bucket.key_mask[c0 : c0 + step]  # [n, 1, 1, L]
            bias = torch.zeros(n, heads, length, length, dtype=acc, device=q.device)
            if c2pz is not None:
                c = c2pz[rows].transpose(1, 2)  # [n, H, L(i), R]
                bias += torch.gather(c, -1, rel_rows.expand(n, heads, length, length)).to(acc)
            if p2cz is not None:
                p = p2cz[rows].transpose(1, 2)  # [n, H, L(j), R]
                bias += torch.gather(p, -1, rel_rows.t().expand(n, heads, length, length)).transpose(-1, -2).to(acc)
            bias = (bias * scale).masked_fill(~key_mask, float("-inf")).to(q.dtype)
            qb, kb, vb = (t[rows].transpose(1, 2) for t in (qz, kz, vz))  # [n, H, L, D]
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=scale)
            ob = ob.transpose(1, 2).reshape(n * length, heads, d)
            valid = bucket.valid.view(n_all, length)[c0 : c0 + step].reshape(-1)
            out[rows.reshape(-1)[valid]] = ob[valid]
    return out[:total]
