"""``disentangled_attention``: DeBERTa-v2/v3 attention over packed sequences; validation, defaults and dispatch.

``impl`` selects the implementation:

* ``"auto"``: the Triton kernel on CUDA when it supports the input (and no gradient is needed), else ``"torch"``;
* ``"triton"``: the Triton kernel (inference only); raises if it cannot run the input;
* ``"torch"``: PyTorch ops (bucketed SDPA with a gathered bias; differentiable);
* ``"naive"``: the plain reference in ``naive.py``.

The kernel and the PyTorch path share the preparation done here: the relative-position table
(:mod:`~trimformer.ops.disentangled.buckets`), the slice of position rows reachable at this ``max_seqlen``, and
the two small GEMMs ``C2P = q Kr^T`` and ``P2C = k Qr^T`` (``[T, H, R]``).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from typing import Literal

import torch

from trimformer.ops.disentangled import torch_path
from trimformer.ops.disentangled.buckets import relative_index
from trimformer.ops.varlen import check_varlen_metadata

Impl = Literal["auto", "triton", "torch", "naive"]
_IMPLS = ("auto", "triton", "torch", "naive")


def _check(q, k, v, cu_seqlens, max_seqlen, pos_key, pos_query, c2p, p2c, position_buckets, max_relative_positions):
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"disentangled_attention expects q, k, v of one shape [T, H, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share dtype and device")
    check_varlen_metadata(cu_seqlens, max_seqlen, q.device)
    span = None
    for name, on, pos in (("pos_key", c2p, pos_key), ("pos_query", p2c, pos_query)):
        if not on:
            continue
        if pos is None:
            raise ValueError(f"{'c2p' if name == 'pos_key' else 'p2c'} is on but {name} is None")
        if pos.dim() != 3 or pos.shape[1:] != q.shape[1:] or pos.shape[0] < 2 or pos.shape[0] % 2:
            raise ValueError(
                f"{name} must be [2 * span, H, D] = [2 * span, {q.shape[1]}, {q.shape[2]}], got {tuple(pos.shape)}"
            )
        if pos.dtype != q.dtype or pos.device != q.device:
            raise ValueError(f"{name} is {pos.dtype} on {pos.device} but q is {q.dtype} on {q.device}")
        if span is not None and pos.shape[0] // 2 != span:
            raise ValueError(f"pos_key and pos_query must have the same rows, got {span * 2} and {pos.shape[0]}")
        span = pos.shape[0] // 2
    if position_buckets > 0 and (position_buckets < 2 or max_relative_positions <= position_buckets // 2 + 1):
        raise ValueError(
            f"position_buckets {position_buckets} needs max_relative_positions > position_buckets // 2 + 1, "
            f"got {max_relative_positions}"
        )


def disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    c2p: bool = True,
    p2c: bool = True,
    position_buckets: int = -1,
    max_relative_positions: int = -1,
    scale: float | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Disentangled self-attention of packed sequences; relative positions are taken within each sequence.

    ``score[i, j] = scale * (q_i . k_j + q_i . Kr[row(i, j)] + k_j . Qr[row(i, j)])`` with
    ``row(i, j) = clamp(bucket(i - j) + span, 0, 2 span - 1)``, softmax over the keys of the sequence.

    Args:
        q, k, v: ``[T, H, D]`` packed (fp32, fp16 or bf16).
        cu_seqlens: ``[N + 1]`` int32 cumulative lengths on q's device.
        max_seqlen: longest sequence, host int.
        pos_key: ``[2 span, H, D]``: the (normalised) relative embeddings through the key projection; required
            when ``c2p``.
        pos_query: ``[2 span, H, D]``: through the query projection; required when ``p2c``.
        c2p, p2c: content-to-position and position-to-content terms.
        position_buckets: DeBERTa ``position_buckets`` (``<= 0``: plain distances clamped to the span).
        max_relative_positions: DeBERTa ``max_relative_positions`` (already resolved: ``> 0``).
        scale: default ``1 / sqrt(D * (1 + c2p + p2c))`` (HF's ``scale_factor``).
        impl: see the module docstring.

    Returns:
        ``[T, H, D]`` in the dtype of ``q``.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    c2p, p2c = bool(c2p), bool(p2c)
    if not torch.compiler.is_compiling():
        _check(q, k, v, cu_seqlens, max_seqlen, pos_key, pos_query, c2p, p2c, position_buckets, max_relative_positions)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d * (1 + int(c2p) + int(p2c))) if scale is None else float(scale)
    if impl == "naive":
        from trimformer.ops.disentangled.naive import naive_disentangled_attention

        return naive_disentangled_attention(
            q, k, v, cu_seqlens, max_seqlen, pos_key=pos_key, pos_query=pos_query, c2p=c2p, p2c=p2c,
            position_buckets=position_buckets, max_relative_positions=max_relative_positions, scale=scale,
        )  # fmt: skip
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, pos_key if c2p else None, pos_query if p2c else None)
    )
    if impl in ("auto", "triton"):
        reason = _triton_reason(q, needs_grad)
        if impl == "triton" and reason is not None:
            raise ValueError(f"impl='triton' cannot run disentangled_attention: {reason}")
        impl = "triton" if reason is None and (impl == "triton" or q.is_cuda) else "torch"
    c2p_scores = p2c_scores = None
    if c2p or p2c:
        span = (pos_key if c2p else pos_query).shape[0] // 2
        index = relative_index(max(max_seqlen, 1), span, position_buckets, max_relative_positions, q.device)
        rows = slice(index.lo, index.hi + 1)
        # [T, H, D] x [R, H, D] -> [T, H, R]: one batched GEMM per term over the reachable position rows
        if c2p:
            c2p_scores = torch.matmul(q.transpose(0, 1), pos_key[rows].permute(1, 2, 0)).transpose(0, 1)
        if p2c:
            p2c_scores = torch.matmul(k.transpose(0, 1), pos_query[rows].permute(1, 2, 0)).transpose(0, 1)
        table, length = index.table, index.length
    else:
        table, length = cu_seqlens, 1  # unused: no positional term
    if impl == "torch":
        return torch_path.torch_disentangled_attention(
            q, k, v, cu_seqlens, c2p_scores, p2c_scores, table, length, scale=scale
        )
    return _kernel_module().disentangled_attention_fwd(
        q, k, v, cu_seqlens, max_seqlen, _unit_last(c2p_scores), _unit_last(p2c_scores), table, length, scale=scale
    )


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@functools.cache
def _kernel_module():
    """``trimformer.ops.disentangled.forward``, or ``None`` when Triton is unavailable (looked up once)."""
    try:
        return importlib.import_module("trimformer.ops.disentangled.forward")
    except ImportError:
        return None


def _triton_reason(q: torch.Tensor, needs_grad: bool) -> str | None:
    if needs_grad:
        return "inputs require grad (the Triton kernel is forward-only; use impl='torch')"
    forward = _kernel_module()
    if forward is None:
        return "the Triton disentangled-attention kernel is not available in this build"
    if not (q.is_cuda or (os.environ.get("TRITON_INTERPRET", "0") == "1" and q.device.type == "cpu")):
        return f"tensors on {q.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    return forward.unsupported_reason(q)
