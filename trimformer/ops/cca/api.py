"""Public CCA / CCGQA functionals: validation, defaults and ``impl`` dispatch.

The projections (GEMMs) and the attention core stay outside these ops; what sits between them is cut into two
functionals so that one fused kernel can replace each:

* :func:`cca_prologue`: packed tokens with ``cu_seqlens`` (prefill, chunked prefill, training): conv1 + conv2 +
  qk-mean + QK-norm + temperature + partial RoPE, and the value shift, with optional initial and final
  conv/value states so a chunk can resume where the previous one stopped;
* :func:`cca_decode_prologue`: one token per sequence, states updated in place (static shapes, graph-capturable).

``impl``: ``"auto"`` -> the fused Triton kernels (``prologue_fwd.py``; ``prologue_gemm.py`` for the prefill forward
with both convolutions; ``prologue_bwd.py``) for CUDA tensors they support, else the vectorised PyTorch path
(``torch_path.py``); ``"triton"`` -> the kernels, raising a ``ValueError``
on an input they cannot take (never a silent fallback); ``"torch"`` -> the PyTorch path; ``"naive"`` -> the
per-document reference (``naive.py``). The Triton prefill path is differentiable (every tensor input but
``cos``/``sin``) when autograd needs it, except together with ``return_final_state``; the decode kernel is
inference-only. Kernels run fp16, bf16 and fp32 (bf16 not under the CPU interpreter), head dims up to 256 and
conv kernels up to 8 taps.
"""

from __future__ import annotations

import importlib
import os
from typing import Literal

import torch
import torch.nn.functional as F

from trimformer.ops.cca import torch_path

Impl = Literal["auto", "triton", "torch", "naive"]
_IMPLS = ("auto", "triton", "torch", "naive")
TEMPERATURE_MODES = ("linear", "exp")
_KERNELS: dict[str, object] = {}  # kernel modules, imported on first use (after TRITON_INTERPRET is settled)


def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def _kernel_module(name: str):
    """``trimformer.ops.cca.<name>`` (prologue_fwd, prologue_bwd), or ``None`` when Triton is unavailable."""
    mod = _KERNELS.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(f"trimformer.ops.cca.{name}")
        except ImportError:
            return None
        _KERNELS[name] = mod
    return mod


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _triton_reason(q0, num_heads, w1, w2, cos, sin, others) -> str | None:
    """Why the Triton kernels cannot run this call (``None`` when they can); shapes are validated already."""
    fwd = _kernel_module("prologue_fwd")
    if fwd is None:
        return "the Triton CCA kernels are not available in this build (no triton)"
    if not (q0.is_cuda or (q0.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")):
        return f"tensors on {q0.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    for t in others:
        if t is not None and t.device != q0.device:
            raise ValueError(f"every tensor must be on {q0.device} like q0, got one on {t.device}")
    if _needs_grad(cos, sin):
        return "cos/sin require grad (the kernels treat RoPE tables as constants)"
    k1 = w1.shape[-1] if w1 is not None else 1
    k2 = w2.shape[-1] if w2 is not None else 1
    return fwd.unsupported_reason(q0, q0.shape[-1] // num_heads, k1, k2)


def _pick(impl: str, q0: torch.Tensor, reason_fn) -> str:
    """Resolve ``impl`` to ``"triton"``, ``"torch"`` or ``"naive"`` (``reason_fn() -> str | None``)."""
    _check_impl(impl)
    if impl in ("torch", "naive"):
        return impl
    if impl == "auto" and not q0.is_cuda:
        return "torch"
    reason = reason_fn()
    if reason is not None:
        if impl == "triton":
            raise ValueError(f"impl='triton' cannot run this CCA prologue: {reason}")
        return "torch"
    return "triton"


def _shape(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else tuple(t.shape)


def _check_common(
    m, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cos, sin, hq, hk, temperature_mode
) -> tuple[int, int]:
    """Validate the arguments both prologues share; returns ``(C, P)``."""
    if hq <= 0 or hk <= 0 or hq % hk:
        raise ValueError(f"num_heads ({hq}) must be a positive multiple of num_kv_heads ({hk})")
    if temperature_mode not in TEMPERATURE_MODES:
        raise ValueError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {temperature_mode!r}")
    if q0.dim() != 2 or q0.shape[-1] % hq:
        raise ValueError(f"q0 must be [{m}, num_heads * head_dim] with num_heads={hq}, got {_shape(q0)}")
    dh = q0.shape[-1] // hq
    ck = hk * dh
    if ck % 2:
        raise ValueError(f"num_kv_heads * head_dim must be even for the two value halves, got {ck}")
    expected = {"q0": (m, hq * dh), "k0": (m, ck), "v_cur": (m, ck // 2), "v_del": (m, ck // 2)}
    for name, t in (("q0", q0), ("k0", k0), ("v_cur", v_cur), ("v_del", v_del)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must be {expected[name]}, got {_shape(t)}")
        if t.dtype != q0.dtype or t.device != q0.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; q0 is {q0.dtype} on {q0.device}")
    c = hq * dh + ck
    if w1 is None and w2 is not None:
        raise ValueError("conv2_weight needs conv1_weight (the convolutions run conv1 then conv2)")
    if w1 is not None and (w1.dim() != 2 or w1.shape[0] != c or w1.shape[1] < 1):
        raise ValueError(f"conv1_weight must be [C={c}, k_seq], got {_shape(w1)}")
    if w2 is not None and (w2.dim() != 3 or w2.shape[:2] != (c, dh) or w2.shape[2] < 1):
        raise ValueError(f"conv2_weight must be [C={c}, head_dim={dh}, k_ch], got {_shape(w2)}")
    for name, b, w in (("conv1_bias", b1, w1), ("conv2_bias", b2, w2)):
        if b is not None and (w is None or tuple(b.shape) != (c,)):
            raise ValueError(f"{name} must be [{c}] and needs its weight, got {_shape(b)}")
    if tuple(temperature.shape) != (hk,):
        raise ValueError(f"temperature must be [num_kv_heads={hk}], got {_shape(temperature)}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (or both None for no RoPE)")
    if cos is not None:
        if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != m or 2 * cos.shape[1] > dh:
            raise ValueError(
                f"cos/sin must be [{m}, rotary_dim // 2] with rotary_dim <= head_dim={dh}, got {_shape(cos)} and "
                f"{_shape(sin)}"
            )
    k1 = w1.shape[-1] if w1 is not None else 1
    k2 = w2.shape[-1] if w2 is not None else 1
    return c, (k1 - 1) + (k2 - 1)


def _check_packing(cu_seqlens: torch.Tensor, max_seqlen: int) -> int:
    """Validate the packing metadata; returns the number of documents ``N``."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be 1-D int32 with N + 1 >= 2 entries, got {cu_seqlens.dtype} "
                         f"{_shape(cu_seqlens)}")  # fmt: skip
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    return cu_seqlens.numel() - 1


def _check_value_state(state: torch.Tensor | None, n: int, ck: int, dtype: torch.dtype) -> None:
    """``initial_value_state`` must be ``None`` or ``[N, Ck/2]`` in the latents' dtype."""
    if state is not None and tuple(state.shape) != (n, ck // 2):
        raise ValueError(f"initial_value_state must be [N={n}, {ck // 2}], got {_shape(state)}")
    if state is not None and state.dtype != dtype:
        raise ValueError(f"initial_value_state must have the dtype of q0 ({dtype}), got {state.dtype}")


def cca_prologue(
    q0: torch.Tensor,
    k0: torch.Tensor,
    v_cur: torch.Tensor,
    v_del: torch.Tensor,
    conv1_weight: torch.Tensor | None,
    conv1_bias: torch.Tensor | None,
    conv2_weight: torch.Tensor | None,
    conv2_bias: torch.Tensor | None,
    temperature: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    qk_mean: bool = True,
    value_shift: bool = True,
    temperature_mode: str = "linear",
    initial_conv_state: torch.Tensor | None = None,
    initial_value_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """CCA prologue over packed documents: from projected latents to attention-ready ``q, k, v``.

    Convolutions, value shift and (through ``cos``/``sin``) RoPE positions restart at every document boundary; a
    document's left context is its initial state (zeros when none is given). With ``h = num_heads``,
    ``h_k = num_kv_heads``, ``d_h = Cq / h``, ``Ck = h_k d_h``, ``C = Cq + Ck`` and ``P = (k_seq - 1) + (k_ch - 1)``
    (``k_seq - 1`` with one conv, 0 with none):

    Args:
        q0: ``[T, Cq]`` query latents ``x W_Q`` (fp64/fp32/fp16/bf16).
        k0: ``[T, Ck]`` key latents ``x W_K``.
        v_cur: ``[T, Ck/2]`` current-token value projection ``x_t W_V``; fills kv heads ``[0, h_k/2)``.
        v_del: ``[T, Ck/2]`` delayed value projection of each token ``x_t W_V' (+ b)``; token ``t`` uses row
            ``t - 1`` (the value shift) for kv heads ``[h_k/2, h_k)``.
        conv1_weight: ``[C, k_seq]`` depthwise causal conv over the sequence, or ``None`` for no convolution.
        conv1_bias: ``[C]`` or ``None``.
        conv2_weight: ``[C, d_h, k_ch]`` head-wise grouped conv (``groups = h + h_k``; the layout of
            ``nn.Conv1d.weight``), or ``None`` for one convolution only. Requires ``conv1_weight``.
        conv2_bias: ``[C]`` or ``None``.
        temperature: ``[h_k]`` key temperature ``T``; ``beta = T`` ("linear", ZAYA1) or ``exp(T)`` ("exp").
        cos, sin: ``[T, rotary_dim // 2]`` float32/64 from :func:`trimformer.ops.rope.rotary_cos_sin` at each
            token's position, or both ``None`` for no RoPE.
        cu_seqlens: ``[N + 1]`` int32 cumulative document lengths (empty documents allowed).
        max_seqlen: longest document (host int, never read from the device; the kernels cover the first
            ``max_seqlen`` tokens of each document, the PyTorch paths ignore it).
        num_heads, num_kv_heads: ``h`` and ``h_k`` (``h % h_k == 0``; query head ``i`` uses kv head ``i // g``).
        qk_mean: add the pre-conv qk-mean skip (spec 1.5).
        value_shift: shift ``v_del`` by one token; when False, ``v = [v_cur | v_del]`` of the same token.
        temperature_mode: ``"linear"`` or ``"exp"``.
        initial_conv_state: ``[N, C, P]`` the last ``P`` pre-conv rows ``[q0 | k0]`` before each document (oldest
            first), or ``None`` for zeros.
        initial_value_state: ``[N, Ck/2]`` the delayed value before each document (``v_del`` of the previous
            token; at a sequence start that is the delayed projection's bias), or ``None`` for zeros.
        return_final_state: also return the states after each document (to resume a later chunk).
        impl: see the module docstring.

    Returns:
        ``(q, k, v, final)``: ``q [T, h, d_h]``, ``k [T, h_k, d_h]``, ``v [T, h_k, d_h]`` in the dtype of ``q0``
        (norm, temperature and RoPE computed in float32, or float64 for float64 input), and ``final`` =
        ``(conv_state [N, C, P], value_state [N, Ck/2])`` or ``None``.
    """
    _check_impl(impl)
    if not torch.compiler.is_compiling():
        t = q0.shape[0]
        c, pad = _check_common(t, q0, k0, v_cur, v_del, conv1_weight, conv1_bias, conv2_weight, conv2_bias,
                               temperature, cos, sin, num_heads, num_kv_heads, temperature_mode)  # fmt: skip
        n = _check_packing(cu_seqlens, max_seqlen)
        if initial_conv_state is not None and tuple(initial_conv_state.shape) != (n, c, pad):
            raise ValueError(f"initial_conv_state must be [N={n}, C={c}, P={pad}], got {_shape(initial_conv_state)}")
        if initial_conv_state is not None and initial_conv_state.dtype != q0.dtype:
            raise ValueError(f"initial_conv_state must have the dtype of q0 ({q0.dtype}), got "
                             f"{initial_conv_state.dtype}")  # fmt: skip
        _check_value_state(initial_value_state, n, k0.shape[-1], q0.dtype)
    args = (q0, k0, v_cur, v_del, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature, cos, sin,
            cu_seqlens, max_seqlen)  # fmt: skip
    kwargs = dict(
        num_heads=num_heads, num_kv_heads=num_kv_heads, qk_mean=qk_mean, value_shift=value_shift,
        temperature_mode=temperature_mode, initial_conv_state=initial_conv_state,
        initial_value_state=initial_value_state, return_final_state=return_final_state,
    )  # fmt: skip
    grads = _needs_grad(q0, k0, v_cur, v_del, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature,
                        initial_conv_state, initial_value_state)  # fmt: skip

    def reason():
        others = (k0, v_cur, v_del, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature, cos, sin,
                  cu_seqlens, initial_conv_state, initial_value_state)  # fmt: skip
        why = _triton_reason(q0, num_heads, conv1_weight, conv2_weight, cos, sin, others)
        if why is None and grads and return_final_state:
            why = "return_final_state while autograd needs gradients (final states are inference-only here)"
        if why is None and grads and _kernel_module("prologue_bwd") is None:
            why = "the Triton CCA backward is not available in this build"
        return why

    impl = _pick(impl, q0, reason)
    if impl == "naive":
        from trimformer.ops.cca.naive import naive_cca_prologue

        return naive_cca_prologue(*args, **kwargs)
    if impl == "torch":
        return torch_path.torch_cca_prologue(*args, **kwargs)
    fwd = _kernel_module("prologue_fwd")
    meta = fwd.make_meta(q0, conv1_weight, conv2_weight, cos, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         qk_mean=qk_mean, value_shift=value_shift, temperature_mode=temperature_mode)  # fmt: skip
    if grads:
        q, k, v = _kernel_module("prologue_bwd").cca_prologue_autograd(
            meta, *args, initial_conv_state, initial_value_state
        )
        return q, k, v, None
    return fwd.cca_prologue_fwd(meta, *args, initial_conv_state, initial_value_state, return_final_state)


def cca_decode_prologue(
    q0: torch.Tensor,
    k0: torch.Tensor,
    v_cur: torch.Tensor,
    v_del: torch.Tensor,
    conv_state: torch.Tensor,
    value_state: torch.Tensor,
    conv1_weight: torch.Tensor | None,
    conv1_bias: torch.Tensor | None,
    conv2_weight: torch.Tensor | None,
    conv2_bias: torch.Tensor | None,
    temperature: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    num_heads: int,
    num_kv_heads: int,
    qk_mean: bool = True,
    value_shift: bool = True,
    temperature_mode: str = "linear",
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CCA prologue for one new token per sequence, continuing from the per-sequence states (decode).

    Equal to :func:`cca_prologue` on a batch of one-token documents with the states as initial states; the states
    are then advanced **in place**: ``conv_state`` drops its oldest row and appends ``[q0 | k0]``, and
    ``value_state`` becomes ``v_del``. Static shapes and no host reads, so the call can be captured in a CUDA graph.

    Args:
        q0, k0, v_cur, v_del: ``[B, Cq]``, ``[B, Ck]``, ``[B, Ck/2]``, ``[B, Ck/2]`` (see :func:`cca_prologue`).
        conv_state: ``[B, C, P]`` last ``P`` pre-conv rows of each sequence (dtype of ``q0``); updated in place.
        value_state: ``[B, Ck/2]`` previous token's ``v_del`` (dtype of ``q0``); updated in place.
        conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature: as in :func:`cca_prologue`.
        cos, sin: ``[B, rotary_dim // 2]`` at each sequence's new position, or both ``None``.
        num_heads, num_kv_heads, qk_mean, value_shift, temperature_mode, impl: as in :func:`cca_prologue`.

    Returns:
        ``(q [B, h, d_h], k [B, h_k, d_h], v [B, h_k, d_h])``.
    """
    _check_impl(impl)
    if not torch.compiler.is_compiling():
        b = q0.shape[0]
        c, pad = _check_common(b, q0, k0, v_cur, v_del, conv1_weight, conv1_bias, conv2_weight, conv2_bias,
                               temperature, cos, sin, num_heads, num_kv_heads, temperature_mode)  # fmt: skip
        ck = k0.shape[-1]
        if tuple(conv_state.shape) != (b, c, pad) or conv_state.dtype != q0.dtype:
            raise ValueError(f"conv_state must be [B={b}, C={c}, P={pad}] {q0.dtype}, got {_shape(conv_state)} "
                             f"{conv_state.dtype}")  # fmt: skip
        if tuple(value_state.shape) != (b, ck // 2) or value_state.dtype != q0.dtype:
            raise ValueError(f"value_state must be [B={b}, {ck // 2}] {q0.dtype}, got {_shape(value_state)} "
                             f"{value_state.dtype}")  # fmt: skip
    args = (q0, k0, v_cur, v_del, conv_state, value_state, conv1_weight, conv1_bias, conv2_weight, conv2_bias,
            temperature, cos, sin)  # fmt: skip
    kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, qk_mean=qk_mean, value_shift=value_shift,
                  temperature_mode=temperature_mode)  # fmt: skip

    def reason():
        others = (k0, v_cur, v_del, conv_state, value_state, conv1_weight, conv1_bias, conv2_weight, conv2_bias,
                  temperature, cos, sin)  # fmt: skip
        why = _triton_reason(q0, num_heads, conv1_weight, conv2_weight, cos, sin, others)
        if why is None and _needs_grad(q0, k0, v_cur, v_del, conv1_weight, conv1_bias, conv2_weight, conv2_bias,
                                       temperature):  # fmt: skip
            why = "inputs require grad (the Triton decode kernel has no backward)"
        return why

    impl = _pick(impl, q0, reason)
    if impl == "naive":
        from trimformer.ops.cca.naive import naive_cca_decode_prologue

        return naive_cca_decode_prologue(*args, **kwargs)
    if impl == "torch":
        return torch_path.torch_cca_decode_prologue(*args, **kwargs)
    fwd = _kernel_module("prologue_fwd")
    meta = fwd.make_meta(q0, conv1_weight, conv2_weight, cos, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         qk_mean=qk_mean, value_shift=value_shift, temperature_mode=temperature_mode)  # fmt: skip
    return fwd.cca_decode_prologue_fwd(meta, *args)


def _project_reason(x, weights, biases, num_heads, w1, w2, cos, sin, others, grads) -> str | None:
    """Why the fused projection kernel cannot run this call (``None`` when it can)."""
    if w1 is None or w2 is None:
        return "the fused projection kernel needs both convolutions"
    if any(b is None for b in biases) != all(b is None for b in biases):
        return "projection biases given for some projections only (the fused kernel takes all four or none)"
    if grads:
        return "autograd needs gradients (the fused projection kernel is inference-only)"
    for t in (*weights, *biases):
        if t is not None and t.dtype != x.dtype:
            return f"projection weights/biases in {t.dtype}, x in {x.dtype} (the fused kernel takes one dtype)"
    stand_q0 = x.new_empty(()).expand(x.shape[0], weights[0].shape[0])  # dtype, device and Cq of q0
    return _triton_reason(stand_q0, num_heads, w1, w2, cos, sin, others)


def cca_project_prologue(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight_current: torch.Tensor,
    v_weight_delayed: torch.Tensor,
    conv1_weight: torch.Tensor | None,
    conv1_bias: torch.Tensor | None,
    conv2_weight: torch.Tensor | None,
    conv2_bias: torch.Tensor | None,
    temperature: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    v_bias_current: torch.Tensor | None = None,
    v_bias_delayed: torch.Tensor | None = None,
    qk_mean: bool = True,
    value_shift: bool = True,
    temperature_mode: str = "linear",
    initial_value_state: torch.Tensor | None = None,
    conv2_weight_k_major: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CCA down-projections and prologue over packed documents: hidden states to attention-ready ``q, k, v``.

    Equal to ``q0 = F.linear(x, q_weight, q_bias)`` (and ``k0``, ``v_cur``, ``v_del`` likewise) followed by
    :func:`cca_prologue` without conv state. ``impl="triton"`` runs all of it in one launch (``project_fwd.py``),
    the convolutions in the projection GEMM's epilogue: inference only, both convolutions, no initial conv state;
    it raises a ``ValueError`` on anything else. On the H100 that kernel is still 3-6x slower than the unfused
    path (register spills; ``ops/cca/NOTES.md``, v5), so ``"auto"`` runs ``F.linear`` (cuBLAS) +
    :func:`cca_prologue` (``impl="auto"``); ``"torch"``/``"naive"`` run the projections and that prologue path.

    Args:
        x: ``[T, E]`` packed hidden states (fp16/bf16/fp32; fp64 for ``"torch"``/``"naive"``).
        q_weight, k_weight: ``[Cq, E]``, ``[Ck, E]`` (``nn.Linear`` layout), ``Cq = h d_h``, ``Ck = h_k d_h``.
        v_weight_current, v_weight_delayed: ``[Ck/2, E]`` value projections of the current / previous token.
        conv1_weight ... max_seqlen: as in :func:`cca_prologue` (``cos``/``sin`` at each token's position).
        num_heads, num_kv_heads, qk_mean, value_shift, temperature_mode: as in :func:`cca_prologue`.
        q_bias, k_bias, v_bias_current, v_bias_delayed: projection biases (``[Cq]``, ``[Ck]``, ``[Ck/2]``) or None.
        initial_value_state: ``[N, Ck/2]`` delayed value before each document (the delayed projection's bias at a
            sequence start), or ``None`` for zeros.
        conv2_weight_k_major: optional cached ``prologue_gemm.conv2_k_major(conv2_weight)`` (``[k_ch, d_h, C]``).
        impl: ``"auto"``, ``"triton"``, ``"torch"`` or ``"naive"``.

    Returns:
        ``(q [T, h, d_h], k [T, h_k, d_h], v [T, h_k, d_h])`` in the dtype of ``x``.
    """
    _check_impl(impl)
    weights = (q_weight, k_weight, v_weight_current, v_weight_delayed)
    biases = (q_bias, k_bias, v_bias_current, v_bias_delayed)
    if not torch.compiler.is_compiling():
        if x.dim() != 2:
            raise ValueError(f"x must be [T, E], got {_shape(x)}")
        e = x.shape[-1]
        for name, w in zip(("q_weight", "k_weight", "v_weight_current", "v_weight_delayed"), weights):
            if w.dim() != 2 or w.shape[1] != e:
                raise ValueError(f"{name} must be [out, E={e}], got {_shape(w)}")
        if q_weight.shape[0] % num_heads or k_weight.shape[0] != num_kv_heads * (q_weight.shape[0] // num_heads):
            raise ValueError(f"q_weight [{q_weight.shape[0]}, E] and k_weight [{k_weight.shape[0]}, E] do not fit "
                             f"{num_heads} query and {num_kv_heads} kv heads of one head dim")  # fmt: skip
        for name, w in (("v_weight_current", v_weight_current), ("v_weight_delayed", v_weight_delayed)):
            if w.shape[0] * 2 != k_weight.shape[0]:
                raise ValueError(f"{name} must be [Ck/2={k_weight.shape[0] // 2}, E], got {_shape(w)}")
        for name, b, w in zip(("q_bias", "k_bias", "v_bias_current", "v_bias_delayed"), biases, weights):
            if b is not None and tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"{name} must be [{w.shape[0]}], got {_shape(b)}")
    kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, qk_mean=qk_mean, value_shift=value_shift,
                  temperature_mode=temperature_mode, initial_value_state=initial_value_state)  # fmt: skip
    convs = (conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature, cos, sin, cu_seqlens, max_seqlen)
    if impl == "naive":
        from trimformer.ops.cca.naive import naive_cca_project_prologue

        return naive_cca_project_prologue(x, *weights, *convs, q_bias=q_bias, k_bias=k_bias,
                                          v_bias_current=v_bias_current, v_bias_delayed=v_bias_delayed,
                                          **kwargs)  # fmt: skip
    grads = _needs_grad(x, *weights, *biases, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature,
                        initial_value_state)  # fmt: skip

    def reason():
        others = (*weights, *biases, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature, cos, sin,
                  cu_seqlens, initial_value_state, conv2_weight_k_major)  # fmt: skip
        return _project_reason(x, weights, biases, num_heads, conv1_weight, conv2_weight, cos, sin, others, grads)

    path = _pick(impl, x, reason) if impl == "triton" else impl  # "auto": the unfused path measures faster
    if path != "triton":
        lat = [F.linear(x, w, b) for w, b in zip(weights, biases)]
        q, k, v, _ = cca_prologue(*lat, *convs, **kwargs, impl="torch" if impl == "torch" else "auto")
        return q, k, v
    # shape checks of the prologue's own arguments on zero-size stand-ins for the latents (no GEMM run)
    cq, ck = q_weight.shape[0], k_weight.shape[0]
    t = x.shape[0]
    stand = [x.new_empty(()).expand(t, n) for n in (cq, ck, ck // 2, ck // 2)]
    c, _ = _check_common(t, *stand, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature, cos, sin,
                         num_heads, num_kv_heads, temperature_mode)  # fmt: skip
    _check_value_state(initial_value_state, _check_packing(cu_seqlens, max_seqlen), ck, x.dtype)
    fwd = _kernel_module("prologue_fwd")
    proj = _kernel_module("project_fwd")
    from trimformer.ops.cca.prologue_gemm import conv2_k_major

    meta = fwd.make_meta(stand[0], conv1_weight, conv2_weight, cos, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         qk_mean=qk_mean, value_shift=value_shift, temperature_mode=temperature_mode)  # fmt: skip
    w2b = conv2_k_major(conv2_weight) if conv2_weight_k_major is None else conv2_weight_k_major
    if tuple(w2b.shape) != (conv2_weight.shape[2], conv2_weight.shape[1], c) or w2b.stride(-1) != 1:
        raise ValueError(f"conv2_weight_k_major must be contiguous [k_ch, d_h, C={c}], got {_shape(w2b)}")
    dh = meta.dh
    q = x.new_empty(t, num_heads, dh)
    k = x.new_empty(t, num_kv_heads, dh)
    v = x.new_empty(t, num_kv_heads, dh)
    unit = fwd.last_unit
    proj.launch_project_fwd(meta, unit(x), *(unit(w) for w in weights), *(unit(b) for b in biases),
                            unit(conv1_weight), unit(conv1_bias), w2b, unit(conv2_bias), temperature, unit(cos),
                            unit(sin), cu_seqlens, unit(initial_value_state), q, k, v)  # fmt: skip
    return q, k, v
