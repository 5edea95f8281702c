"""Public attention functionals: validation, defaults and dispatch.

``impl`` selects the implementation:

* ``"auto"``: our Triton kernel for CUDA tensors when it supports the input, else PyTorch's own kernels;
* ``"triton"``: our Triton kernel; raises if it cannot run the input (never falls back silently);
* ``"torch"``: PyTorch's kernels (bucketed SDPA on CPU, ``varlen_attn`` on CUDA);
* ``"naive"``: the plain reference in ``naive.py`` (slow; for tests).

The Triton varlen path is differentiable (``backward.py``) when autograd needs it; otherwise (inference,
``torch.no_grad()``, inputs without ``requires_grad``) the forward kernel is launched directly, with no autograd
bookkeeping and no logsumexp saved. The Triton kernels support fp16, bf16 and fp32 (bf16 not under the CPU
interpreter) and head dims 1..256.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Literal

import torch

from trimformer.ops.attention import torch_path
from trimformer.ops.varlen import check_varlen_metadata

Impl = Literal["auto", "triton", "torch", "naive"]
_IMPLS = ("auto", "triton", "torch", "naive")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runnable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take this tensor here (CUDA, or CPU under the Triton interpreter)."""
    return t.is_cuda or (_interpreting() and t.device.type == "cpu")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lead: int) -> None:
    if q.dim() != lead + 2 or k.dim() != lead + 2 or v.dim() != lead + 2:
        raise ValueError(
            f"attention expects q, k, v with {lead + 2} dims, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Softmax attention over packed variable-length sequences; no work is done on padding.

    Args:
        q: ``[T, Hq, D]`` packed queries (fp32, fp16 or bf16).
        k, v: ``[T, Hk, D]``; ``Hq`` must be a multiple of ``Hk`` (GQA: query head ``h`` reads kv head
            ``h // (Hq // Hk)``).
        cu_seqlens: ``[N + 1]`` int32 cumulative sequence lengths, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``.
        max_seqlen: longest sequence, as a host ``int`` (never read back from the device).
        causal: token ``i`` of a sequence sees tokens ``<= i`` of the same sequence only.
        scale: logit scale, default ``1/sqrt(D)``.
        window: local (sliding-window) attention: ``(left, right)`` half-widths, token ``i`` sees tokens
            ``i - left .. i + right`` of its sequence (an int ``w`` means ``(w, w)``; ModernBERT's local layers use
            ``local_attention // 2``). ``None``: global attention. Combined with ``causal`` the right side is 0.
        impl: see the module docstring.

    Returns:
        ``[T, Hq, D]`` in the dtype of ``q``; differentiable with respect to q, k and v on every path (a windowed
        call that needs gradients runs on the PyTorch path: the Triton backward has no window).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if not torch.compiler.is_compiling():
        _check_qkv(q, k, v, lead=1)
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q has {q.shape[0]} tokens but k/v have {k.shape[0]}")
        check_varlen_metadata(cu_seqlens, max_seqlen, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = _normalize_window(window, causal)
    if impl in ("auto", "triton"):
        reason = _triton_unsupported_reason(q, k)
        if reason is None and window is not None and _needs_grad(q, k, v):
            reason = "a windowed call that needs gradients (the Triton backward has no window)"
        if impl == "triton" and reason is not None:
            raise ValueError(f"impl='triton' cannot run this input: {reason}")
        impl = "triton" if reason is None and (impl == "triton" or q.is_cuda) else "torch"
    if impl == "naive":
        from trimformer.ops.attention.naive import naive_varlen_attention

        return naive_varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale, window=window)
    if impl == "torch":
        return torch_path.torch_varlen_attention(
            q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale, window=window
        )
    if window is not None:
        return _kernel_module("forward").varlen_attention_fwd(
            q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale, window=window
        )
    return _triton_varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _normalize_window(window: int | tuple[int, int] | None, causal: bool) -> tuple[int, int] | None:
    """``None`` or ``(left, right)`` non-negative ints (right 0 when causal); ``ValueError`` for anything else."""
    if window is None:
        return None
    pair = (window, window) if isinstance(window, int) and not isinstance(window, bool) else window
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in pair)
    ):
        raise ValueError(f"window must be None, a non-negative int or a (left, right) pair of them, got {window!r}")
    return (int(pair[0]), 0 if causal else int(pair[1]))


_KERNELS: dict[str, object] = {}  # kernel modules imported once, on first use (after TRITON_INTERPRET is settled)


def _kernel_module(name: str):
    """``trimformer.ops.attention.<name>`` (forward, backward, decode), or ``None`` when Triton is unavailable."""
    mod = _KERNELS.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(f"trimformer.ops.attention.{name}")
        except ImportError:
            return None
        _KERNELS[name] = mod
    return mod


def _triton_unsupported_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    forward = _kernel_module("forward")
    if forward is None:
        return "the Triton attention kernel is not available in this build"
    if not triton_runnable(q):
        return f"tensors on {q.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    return forward.unsupported_reason(q, k)


def _triton_varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal, scale):
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _kernel_module("backward").varlen_attention_autograd(
            q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale
        )
    return _kernel_module("forward").varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)


def kvcache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Causal attention of ``Tq`` new queries over a preallocated key/value cache (decode, chunked prefill).

    The new tokens' keys and values must already be written into the cache: query ``i`` of row ``b`` sits at
    position ``cache_seqlens[b] - Tq + i`` and sees cache rows ``0 .. that position``. Static shapes and no host
    reads, so the call can be captured in a CUDA graph.

    Args:
        q: ``[B, Tq, Hq, D]``.
        k_cache, v_cache: ``[B, S_max, Hk, D]``; ``Hq`` a multiple of ``Hk``.
        cache_seqlens: ``[B]`` int32, valid cache rows per sequence *including* the ``Tq`` new ones (``>= Tq``).
        scale: logit scale, default ``1/sqrt(D)``.

    Returns:
        ``[B, Tq, Hq, D]``. The Triton path is inference-only: ``"auto"`` takes the PyTorch path when autograd
        needs gradients, and an explicit ``"triton"`` then raises.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if not torch.compiler.is_compiling():
        _check_qkv(q, k_cache, v_cache, lead=2)
        if q.shape[0] != k_cache.shape[0] or cache_seqlens.shape != (q.shape[0],):
            raise ValueError(
                f"batch sizes differ: q {q.shape[0]}, cache {k_cache.shape[0]}, "
                f"cache_seqlens {tuple(cache_seqlens.shape)}"
            )
        if cache_seqlens.dtype not in (torch.int32, torch.int64) or cache_seqlens.device != q.device:
            raise ValueError(
                f"cache_seqlens must be an int32 tensor on {q.device}, "
                f"got {cache_seqlens.dtype} on {cache_seqlens.device}"
            )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)
    if impl == "auto":
        use_triton = q.is_cuda and not needs_grad and _decode_unsupported_reason(q, k_cache) is None
        impl = "triton" if use_triton else "torch"
    if impl == "naive":
        from trimformer.ops.attention.naive import naive_kvcache_attention

        return naive_kvcache_attention(q, k_cache, v_cache, cache_seqlens, scale=scale)
    if impl == "torch":
        return torch_path.torch_kvcache_attention(q, k_cache, v_cache, cache_seqlens, scale=scale)
    reason = "inputs require grad (the Triton decode kernel has no backward)" if needs_grad else None
    reason = reason or _decode_unsupported_reason(q, k_cache)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run kvcache_attention: {reason}")
    return _kernel_module("decode").kvcache_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale=scale)


def _decode_unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    if _kernel_module("decode") is None:
        return "the Triton decode kernel is not available in this build"
    if not triton_runnable(q):
        return f"tensors on {q.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    if q.shape[0] > 65535 or k_cache.shape[2] > 65535:
        return f"batch {q.shape[0]} or kv heads {k_cache.shape[2]} above 65535"
    return _kernel_module("forward").unsupported_reason(q, k_cache)
