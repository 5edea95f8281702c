"""Attention through PyTorch's own kernels: the CPU path and the fallback on GPUs without our Triton kernel.

* CPU: packed segments are sorted by length and grouped into buckets of similar length; each bucket runs as one
  padded ``scaled_dot_product_attention`` call with a key-padding mask, so short sequences are batched and long ones
  do not pad the short ones.
* CUDA: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 varlen inside PyTorch >= 2.10) when it exists
  and the dtype is half precision, else the bucketed path.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MAX_BUCKET_WASTE = 0.25  # padded fraction allowed inside one bucket
_MAX_BUCKET_TOKENS = 1 << 16  # keeps one bucket's padded scores small on CPU


@dataclass(frozen=True)
class _Bucket:
    rows: torch.Tensor  # [n, L] int64 packed-row index per slot; padding slots point at row T (a zero row)
    key_mask: torch.Tensor  # [n, 1, 1, L] bool, True where the key is a real token
    valid: torch.Tensor  # [n * L] bool, True where the slot holds a real token


_plan_cache: dict[str, tuple[torch.Tensor, tuple[_Bucket, ...]]] = {}


def bucket_plan(cu_seqlens: torch.Tensor) -> tuple[_Bucket, ...]:
    """Group segments into similar-length buckets; cached for the last ``cu_seqlens`` object (reused by every layer)."""
    cached = _plan_cache.get("last")
    if cached is not None and cached[0] is cu_seqlens:
        return cached[1]
    bounds = cu_seqlens.tolist()
    total = bounds[-1]
    segs = sorted(((e - s, s) for s, e in zip(bounds[:-1], bounds[1:]) if e > s), reverse=True)
    buckets = []
    i = 0
    while i < len(segs):
        longest = segs[i][0]
        j, used = i + 1, segs[i][0]
        while j < len(segs):
            n = j - i + 1
            if (n * longest - used - segs[j][0]) > _MAX_BUCKET_WASTE * n * longest or n * longest > _MAX_BUCKET_TOKENS:
                break
            used += segs[j][0]
            j += 1
        group = segs[i:j]
        ar = torch.arange(longest)
        lens = torch.tensor([g[0] for g in group])
        starts = torch.tensor([g[1] for g in group])
        valid = ar[None, :] < lens[:, None]
        rows = torch.where(valid, starts[:, None] + ar[None, :], torch.full_like(valid, total, dtype=torch.long))
        dev = cu_seqlens.device
        buckets.append(_Bucket(rows.to(dev), valid[:, None, None, :].to(dev), valid.reshape(-1).to(dev)))
        i = j
    plan = tuple(buckets)
    _plan_cache["last"] = (cu_seqlens, plan)
    return plan


def bucketed_sdpa_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Varlen attention as a few padded SDPA calls. Shapes as in ``varlen_attention``; ``window`` is ``(left,
    right)`` or ``None``."""
    total, hq, d = q.shape
    hk = k.shape[1]
    out = q.new_zeros(total + 1, hq, d)
    zero = q.new_zeros(1, hq, d)
    qz, kz, vz = torch.cat([q, zero]), torch.cat([k, zero[:, :hk]]), torch.cat([v, zero[:, :hk]])
    for b in bucket_plan(cu_seqlens):
        n, length = b.rows.shape
        qb = qz[b.rows].transpose(1, 2)  # [n, Hq, L, D]
        kb = kz[b.rows].transpose(1, 2)  # [n, Hk, L, D]
        vb = vz[b.rows].transpose(1, 2)
        if hk != hq:
            kb = kb.repeat_interleave(hq // hk, dim=1)
            vb = vb.repeat_interleave(hq // hk, dim=1)
        mask = b.key_mask
        if causal:
            mask = mask & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        if window is not None:
            ar = torch.arange(length, device=q.device)
            rel = ar[None, :] - ar[:, None]  # key - query
            mask = mask & ((rel >= -window[0]) & (rel <= window[1]))
        if n == 1 and not causal and window is None:
            ob = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        else:
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        ob = ob.transpose(1, 2).reshape(n * length, hq, d)
        out[b.rows.reshape(-1)[b.valid]] = ob[b.valid]
    return out[:total]


@functools.cache
def _varlen_attn_fn():
    """``(varlen_attn, parameter names)`` or ``None`` when this PyTorch has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Best PyTorch-native varlen attention for the device and dtype (``window``: ``(left, right)`` or ``None``)."""
    found = _varlen_attn_fn() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if found is not None and window is not None and "window_size" not in found[1]:
        found = None  # this PyTorch's varlen_attn has no sliding window
    if found is not None:
        fn, params = found
        hq, hk = q.shape[1], k.shape[1]
        kwargs = {"scale": scale}
        if hq != hk:
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            else:
                k = k.repeat_interleave(hq // hk, dim=1)
                v = v.repeat_interleave(hq // hk, dim=1)
        if window is not None:
            kwargs["window_size"] = (window[0], 0 if causal else window[1])
        elif causal and "is_causal" in params:  # PyTorch 2.10-2.12
            kwargs["is_causal"] = True
        elif causal:  # later releases express causality as a (left, right) window
            kwargs["window_size"] = (-1, 0)
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    return bucketed_sdpa_varlen(q, k, v, cu_seqlens, causal=causal, scale=scale, window=window)


def torch_kvcache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """Attention of ``Tq`` new queries over a preallocated cache; static shapes, no host sync (graph-capturable)."""
    b, tq, hq, d = q.shape
    s_max, hk = k_cache.shape[1], k_cache.shape[2]
    pos_q = cache_seqlens.to(torch.long)[:, None] - tq + torch.arange(tq, device=q.device)[None, :]  # [B, Tq]
    keys = torch.arange(s_max, device=q.device)
    mask = keys[None, None, :] <= pos_q[:, :, None]  # [B, Tq, S_max]
    qt = q.transpose(1, 2)
    kt = k_cache.transpose(1, 2)
    vt = v_cache.transpose(1, 2)
    if hk != hq:
        kt = kt.repeat_interleave(hq // hk, dim=1)
        vt = vt.repeat_interleave(hq // hk, dim=1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)
