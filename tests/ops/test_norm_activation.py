"""add_layer_norm and bias_act: PyTorch paths vs the naive references, HF's activations and budget rules."""

import math

import pytest
import torch
import torch.nn.functional as F

from trimformer.ops.activation import ACTIVATIONS, bias_act, naive_bias_act
from trimformer.ops.activation.api import _kernel_module as act_kernel
from trimformer.ops.norm import add_layer_norm, naive_add_layer_norm
from trimformer.ops.norm.api import _kernel_module as norm_kernel
from trimformer.testing import assert_close_budget


def _ln_inputs(dtype, h=48, t=37):
    x = torch.randn(t, h, dtype=dtype) * 3
    r = torch.randn(t, h, dtype=dtype)
    w = torch.randn(h, dtype=dtype)
    b = torch.randn(h, dtype=dtype)
    xb = torch.randn(h, dtype=dtype)
    return x, r, w, b, xb


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("with_xbias", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_add_layer_norm_torch_matches_naive_fp64(with_residual, with_xbias, with_bias):
    x, r, w, b, xb = _ln_inputs(torch.float64)
    args = (x, r if with_residual else None, w, b if with_bias else None)
    kw = {"eps": 1e-12, "x_bias": xb if with_xbias else None}
    out = add_layer_norm(*args, **kw, impl="torch")
    ref = naive_add_layer_norm(*args, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # the reference itself equals F.layer_norm of the explicit sum
    h = x + (xb if with_xbias else 0) + (r if with_residual else 0)
    torch.testing.assert_close(ref, F.layer_norm(h, (48,), w, b if with_bias else None, 1e-12), rtol=0, atol=1e-12)


def test_add_layer_norm_does_not_modify_inputs():
    x, r, w, b, xb = _ln_inputs(torch.float32)
    x0, r0 = x.clone(), r.clone()
    add_layer_norm(x, r, w, b, eps=1e-5, x_bias=xb, impl="torch")
    add_layer_norm(x, r, w, b, eps=1e-5, impl="torch")
    assert torch.equal(x, x0) and torch.equal(r, r0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_layer_norm_low_precision_within_budget(dtype):
    x, r, w, b, xb = _ln_inputs(torch.float64, h=96, t=64)
    ref = naive_add_layer_norm(x, r, w, b, eps=1e-12, x_bias=xb)
    lo = [t.to(dtype) for t in (x, r, w, b, xb)]
    out = add_layer_norm(*lo[:4], eps=1e-12, x_bias=lo[4], impl="torch")
    baseline = naive_add_layer_norm(*lo[:4], eps=1e-12, x_bias=lo[4])
    assert out.dtype == dtype
    assert_close_budget(out, ref, baseline, factor=2.0, name=f"add_layer_norm {dtype}")


def test_add_layer_norm_validation():
    x, r, w, b, xb = _ln_inputs(torch.float32)
    with pytest.raises(ValueError, match="residual shape"):
        add_layer_norm(x, r[:-1], w, b, eps=1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        add_layer_norm(x, r, w[:-1], b, eps=1e-5)
    with pytest.raises(ValueError, match="x_bias is torch.float64"):
        add_layer_norm(x, r, w, b, eps=1e-5, x_bias=xb.double())
    with pytest.raises(ValueError, match="impl must be"):
        add_layer_norm(x, r, w, b, eps=1e-5, impl="fast")
    with pytest.raises(ValueError, match="floating-point"):
        add_layer_norm(x.long(), None, w, b, eps=1e-5)


def test_add_layer_norm_explicit_triton_never_falls_back():
    x, r, w, b, _ = _ln_inputs(torch.float32)
    if norm_kernel() is None:
        with pytest.raises(ValueError, match="impl='triton'"):
            add_layer_norm(x, r, w, b, eps=1e-5, impl="triton")
    else:  # a kernel is installed: it must agree with the reference
        torch.testing.assert_close(
            add_layer_norm(x, r, w, b, eps=1e-5, impl="triton"), naive_add_layer_norm(x, r, w, b, eps=1e-5)
        )


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_bias_act_matches_hf_activation_and_naive(act):
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 301, dtype=torch.float64).reshape(7, 43)
    bias = torch.randn(43, dtype=torch.float64)
    hf = ACT2FN[act](x + bias)
    torch.testing.assert_close(naive_bias_act(x, bias, act), hf, rtol=0, atol=1e-12)
    torch.testing.assert_close(bias_act(x, bias, act, impl="torch"), hf, rtol=0, atol=1e-12)
    torch.testing.assert_close(bias_act(x, None, act, impl="torch"), ACT2FN[act](x), rtol=0, atol=1e-12)


def test_gelu_is_exact_erf_and_gelu_new_is_tanh():
    xs = [-3.0, -0.5, 0.0, 0.7, 2.5]
    x = torch.tensor(xs, dtype=torch.float64)
    erf = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in xs]
    tanh = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) for v in xs]
    assert bias_act(x, None, "gelu", impl="torch").tolist() == pytest.approx(erf, abs=1e-14)
    assert bias_act(x, None, "gelu_new", impl="torch").tolist() == pytest.approx(tanh, abs=1e-14)
    assert abs(erf[1] - tanh[1]) > 1e-5  # the two really differ, so the checks above can fail


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_act_low_precision_within_budget(act, dtype):
    x = torch.randn(64, 96, dtype=torch.float64) * 2
    b = torch.randn(96, dtype=torch.float64)
    ref = naive_bias_act(x, b, act)
    out = bias_act(x.to(dtype), b.to(dtype), act, impl="torch")
    baseline = naive_bias_act(x.to(dtype), b.to(dtype), act)
    assert out.dtype == dtype
    assert_close_budget(out, ref, baseline, factor=2.0, name=f"bias_act {act} {dtype}")


def test_bias_act_does_not_modify_inputs_and_validates():
    x = torch.randn(4, 8)
    b = torch.randn(8)
    x0 = x.clone()
    for act in ("relu", "silu", "tanh"):
        bias_act(x, b, act, impl="torch")
        bias_act(x, None, act, impl="torch")
    assert torch.equal(x, x0)
    with pytest.raises(ValueError, match="unsupported activation 'mish'"):
        bias_act(x, b, "mish")
    with pytest.raises(ValueError, match="bias must be"):
        bias_act(x, b[:-1], "gelu")
    if act_kernel() is None:
        with pytest.raises(ValueError, match="impl='triton'"):
            bias_act(x, b, "gelu", impl="triton")


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_act_inplace_gives_the_same_result(act, with_bias):
    x = torch.randn(5, 16)
    b = torch.randn(16) if with_bias else None
    expected = bias_act(x, b, act, impl="torch")
    scratch = x.clone()
    torch.testing.assert_close(bias_act(scratch, b, act, inplace=True, impl="torch"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("with_xbias", [True, False])
def test_add_layer_norm_inplace_gives_the_same_result(with_xbias):
    x, r, w, b, xb = _ln_inputs(torch.float32)
    xb = xb if with_xbias else None
    expected = add_layer_norm(x, r, w, b, eps=1e-5, x_bias=xb, impl="torch")
    out = add_layer_norm(x.clone(), r, w, b, eps=1e-5, x_bias=xb, inplace=True, impl="torch")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    r0 = r.clone()
    add_layer_norm(x.clone(), r, w, b, eps=1e-5, x_bias=xb, inplace=True, impl="torch")
    assert torch.equal(r, r0)  # only x may be overwritten


def test_inplace_is_ignored_under_autograd():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    y = bias_act(x, b, "gelu", inplace=True, impl="torch")
    z = add_layer_norm(y, x, w, None, eps=1e-6, x_bias=b, inplace=True, impl="torch")
    z.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref = naive_add_layer_norm(naive_bias_act(x, b, "gelu"), x, w, None, eps=1e-6, x_bias=b)
    ref.sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda x_, b_: naive_bias_act(x_, b_, "gelu_new"), (x.detach().requires_grad_(), b.detach().requires_grad_())
    )
