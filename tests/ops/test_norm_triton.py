"""Fused bias + residual + LayerNorm Triton kernel vs the fp64 reference (interpreter on CPU; fp16/bf16 on GPU)."""

from __future__ import annotations

import pytest
import torch

from trimformer.ops.norm import add_layer_norm, naive_add_layer_norm
from trimformer.testing import assert_close_budget

pytest.importorskip("triton")


def _inputs(t, h, dtype, device="cpu"):
    g = torch.Generator().manual_seed(t * 131 + h)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device)  # noqa: E731
    return mk(t, h, scale=3.0), mk(t, h), 1.0 + 0.3 * mk(h), mk(h), mk(h)


def _check(t, h, dtype, device, *, residual=True, bias=True, xbias=True, eps=1e-12):
    x, r, w, b, xb = _inputs(t, h, dtype, device)
    args64 = (x, r if residual else None, w, b if bias else None)
    ref = naive_add_layer_norm(*args64, eps=eps, x_bias=xb if xbias else None)
    lo = [None if a is None else a.to(dtype) for a in (*args64, xb if xbias else None)]
    out = add_layer_norm(*lo[:4], eps=eps, x_bias=lo[4], impl="triton")
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    else:
        baseline = naive_add_layer_norm(*lo[:4], eps=eps, x_bias=lo[4])
        assert_close_budget(out, ref, baseline, factor=2.0, name=f"add_layer_norm triton {dtype} T={t} H={h}")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("t", "h"), [(1, 48), (37, 48), (5, 100), (3, 768)])
def test_fused_layernorm_matches_reference(dtype, t, h):
    _check(t, h, dtype, "cpu")


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("residual", "bias", "xbias"), [(False, True, False), (True, False, True), (False, False, True)]
)
def test_fused_layernorm_optional_terms(residual, bias, xbias):
    _check(9, 48, torch.float32, "cpu", residual=residual, bias=bias, xbias=xbias, eps=1e-5)


@pytest.mark.interpret
def test_fused_layernorm_inplace_and_strided_rows():
    x, r, w, b, xb = (a.float() for a in _inputs(6, 64, torch.float32))
    expected = naive_add_layer_norm(x, r, w, b, eps=1e-6, x_bias=xb)
    scratch = x.clone()
    out = add_layer_norm(scratch, r, w, b, eps=1e-6, x_bias=xb, inplace=True, impl="triton")
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)
    assert out.data_ptr() == scratch.data_ptr()  # written into the GEMM temporary, no allocation
    wide = torch.randn(6, 3, 64)  # rows of a strided view (a slice of a wider tensor)
    view = wide[:, 1]
    torch.testing.assert_close(
        add_layer_norm(view, r, w, b, eps=1e-6, impl="triton"), naive_add_layer_norm(view, r, w, b, eps=1e-6),
        rtol=0, atol=2e-5,
    )  # fmt: skip


def test_triton_refuses_autograd_inputs():
    x, r, w, b, _ = (a.float() for a in _inputs(4, 16, torch.float32))
    x.requires_grad_(True)
    with pytest.raises(ValueError, match="require grad"):
        add_layer_norm(x, r, w, b, eps=1e-5, impl="triton")
    out = add_layer_norm(x, r, w, b, eps=1e-5)  # "auto" takes the differentiable PyTorch path
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("t", "h"), [(1, 768), (4097, 768), (300, 384), (64, 1024), (17, 4096)])
def test_fused_layernorm_gpu(dtype, t, h):
    _check(t, h, dtype, "cuda")


def test_launch_shape_spreads_few_rows_over_the_sms():
    """Few rows (B = 1 forwards): one row per program so that every SM gets work; many rows: ~4096 per program."""
    from trimformer.ops.norm.layernorm import _launch_shape
    from trimformer.ops.triton_utils import interpreting

    budget = 2048 if interpreting() else 4096
    assert _launch_shape(768, 512, 132) == (1024, 1, 4)  # 350 rows -> 350 programs, not 88
    assert _launch_shape(768, 8192, 132) == (1024, budget // 1024, 4)
    block, rows, _ = _launch_shape(64, 64, 4)
    assert block == 64 and 1 < rows < budget // 64 and -(-64 // rows) >= 8


@pytest.mark.interpret
def test_partials_kernel_sums_in_fixed_order_and_validates():
    """``add_layer_norm_partials_fwd``: S fp32 partials + x_bias + residual summed in fp32, then normalised."""
    from trimformer.ops.norm.layernorm import MAX_PARTS, add_layer_norm_partials_fwd

    x, r, w, b, xb = _inputs(13, 100, torch.float32)
    g = torch.Generator().manual_seed(5)
    parts = torch.randn(3, 13, 100, generator=g, dtype=torch.float64)
    parts[1] += x
    total = parts.sum(0)
    ref = naive_add_layer_norm(total, r, w, b, eps=1e-12, x_bias=xb)
    out = add_layer_norm_partials_fwd(parts.float(), r.half(), w.half(), b.half(), 1e-12, xb.half(),
                                      out_dtype=torch.float16)  # fmt: skip
    assert out.dtype == torch.float16 and out.shape == (13, 100)
    lo_ref = naive_add_layer_norm(total.half(), r.half(), w.half(), b.half(), eps=1e-12, x_bias=xb.half())
    assert_close_budget(out, ref, lo_ref, factor=2.0, name="partials")
    with pytest.raises(ValueError, match="parts must be fp32"):
        add_layer_norm_partials_fwd(parts.half(), None, w.half(), None, 1e-12, None, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="parts must be fp32"):
        add_layer_norm_partials_fwd(torch.zeros(MAX_PARTS + 1, 2, 100), None, w.float(), None, 1e-12, None,
                                    out_dtype=torch.float32)  # fmt: skip
