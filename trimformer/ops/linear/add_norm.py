"""``linear_add_layer_norm``: ``LayerNorm(x @ W^T + b + residual)``, the out-projection / FFN2 tail of a post-LN
encoder layer, as one op.

``impl`` selects the implementation:

* ``"auto"``: on CUDA without gradients, up to :data:`trimformer.ops.linear.api.SMALL_M` rows in fp16/bf16, the
  faster (measured once per shape bucket by ``tune.choose_split_k``, CUDA-graph replays) of (a) ``linear`` (cuBLAS
  or its tuned Triton GEMM) then the fused add + LayerNorm kernel, and (b) the split-K Triton GEMM writing ``S``
  fp32 partial products ``[S, M, N]`` that the add + LayerNorm kernel sums (with the bias and the residual, in fp32,
  in a fixed order: deterministic, no atomics) before normalising: two kernels either way. Larger ``M``: (a).
  CPU or autograd: ``"torch"``.
* ``"triton"``: (b) with a shape-only (or the given) split-K configuration; raises when it cannot run the input.
* ``"torch"``: ``F.linear`` (no bias) then :func:`trimformer.ops.norm.add_layer_norm` with ``impl="torch"``, in
  place on the GEMM output (HF's rounding order: the GEMM output is rounded, bias then residual added).
* ``"naive"``: ``naive_linear_add_layer_norm`` (fp32/fp64 throughout, one rounding).

Why split-K (NOTES.md, round 4): at ``M`` ~ 300 rows and ``N = H = 768`` a 64 x 64 tile grid has ~60 programs for
132 SMs, each streaming all of ``K``; cuBLAS took 8.3 us for FFN2 (``K = 3072``) whose weight read floor is ~1.6 us.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trimformer.ops.linear.api import EPILOGUE_POLICY, SMALL_M, _kernel_reason, linear
from trimformer.ops.norm import add_layer_norm

_IMPLS = ("auto", "triton", "torch", "naive")


def linear_add_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    *,
    eps: float,
    impl: str = "auto",
    config=None,
) -> torch.Tensor:
    """``LayerNorm(x @ weight^T + bias + residual)`` over the last dimension.

    Args:
        x: ``[..., K]`` (fp32, fp16 or bf16).
        weight: ``[N, K]`` (``nn.Linear`` layout); bias: ``[N]`` or ``None``; both in ``x``'s dtype and device.
        residual: ``[..., N]`` (``x``'s leading dims) or ``None``; never overwritten.
        ln_weight: ``[N]`` LayerNorm scale; ln_bias: ``[N]`` LayerNorm shift or ``None``.
        eps: added to the variance.
        impl: see the module docstring.
        config: a :class:`trimformer.ops.linear.splitk.SplitKConfig` for ``impl="triton"`` (benchmarks, tests);
            default :func:`trimformer.ops.linear.splitk.default_split_k_config`.

    Returns:
        ``[..., N]`` in ``x``'s dtype. The GEMM accumulates in fp32 on every path; the split-K path also keeps the
        sum with bias and residual in fp32 (one rounding, at the end).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if not torch.compiler.is_compiling():
        _check(x, weight, bias, residual, ln_weight, ln_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual, ln_weight, ln_bias)
    )
    if impl == "naive":
        from trimformer.ops.linear.naive import naive_linear_add_layer_norm

        return naive_linear_add_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, eps=eps)
    if impl == "auto":
        if not x.is_cuda or needs_grad:
            impl = "torch"
        else:
            k = x.shape[-1]
            small = 0 < x.numel() <= SMALL_M * k and x.dtype != torch.float32
            if small and EPILOGUE_POLICY["mode"] == "measured" and _reason(x, weight) is None:
                from trimformer.ops.linear import tune

                def run(choice, w):
                    if choice is None:
                        return _unfused(x, w, bias, residual, ln_weight, ln_bias, eps, "auto")
                    return _split_k(x, w, bias, residual, ln_weight, ln_bias, eps, choice)

                cfg = tune.choose_split_k(x, weight, run)
                if cfg is not None:
                    return _split_k(x, weight, bias, residual, ln_weight, ln_bias, eps, cfg)
            return _unfused(x, weight, bias, residual, ln_weight, ln_bias, eps, "auto")
    if impl == "torch":
        return _unfused(x, weight, bias, residual, ln_weight, ln_bias, eps, "torch")
    reason = "inputs require grad (the split-K kernels are forward-only)" if needs_grad else _reason(x, weight)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run linear_add_layer_norm: {reason}")
    return _split_k(x, weight, bias, residual, ln_weight, ln_bias, eps, config)


def _unfused(x, weight, bias, residual, ln_weight, ln_bias, eps, impl):
    y = linear(x, weight, impl=impl) if impl != "torch" else F.linear(x, weight)
    return add_layer_norm(y, residual, ln_weight, ln_bias, eps=eps, x_bias=bias, inplace=True, impl=impl)


def _split_k(x, weight, bias, residual, ln_weight, ln_bias, eps, config):
    from trimformer.ops.linear.splitk import linear_partials_fwd
    from trimformer.ops.norm.layernorm import add_layer_norm_partials_fwd

    k, n = x.shape[-1], weight.shape[0]
    parts = linear_partials_fwd(x.reshape(-1, k), weight, config)
    r2 = None if residual is None else residual.reshape(-1, n)
    y = add_layer_norm_partials_fwd(parts, r2, ln_weight, ln_bias, eps, bias, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], n)


def _reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    reason = _kernel_reason(x, weight, "identity")
    if reason is not None:
        return reason
    from trimformer.ops.norm.api import _kernel_reason as norm_reason

    return norm_reason(x)


def _check(x, weight, bias, residual, ln_weight, ln_bias) -> None:
    if x.dim() < 1 or not x.is_floating_point() or x.shape[-1] == 0:
        raise ValueError(f"linear_add_layer_norm expects a floating-point x [..., K], got {x.dtype} {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [N > 0, {x.shape[-1]}] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    n = weight.shape[0]
    if residual is not None and residual.shape != (*x.shape[:-1], n):
        raise ValueError(f"residual must have shape {(*x.shape[:-1], n)}, got {tuple(residual.shape)}")
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if ln_weight is None:
        raise ValueError("ln_weight is required")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual), ("ln_weight", ln_weight),
                    ("ln_bias", ln_bias)):  # fmt: skip
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")


__all__ = ["linear_add_layer_norm"]
