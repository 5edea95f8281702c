"""Fused bias + activation Triton kernel vs the fp64 reference (interpreter on CPU; fp16/bf16 on GPU)."""

from __future__ import annotations

import pytest
import torch

from trimformer.ops.activation import ACTIVATIONS, bias_act, naive_bias_act
from trimformer.testing import assert_close_budget

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter's numpy exp


def _check(m, n, act, dtype, device, *, with_bias=True):
    g = torch.Generator().manual_seed(m * 7 + n)
    x = (torch.randn(m, n, generator=g, dtype=torch.float64) * 3).to(device)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(device) if with_bias else None
    ref = naive_bias_act(x, b, act)
    lo_b = None if b is None else b.to(dtype)
    out = bias_act(x.to(dtype), lo_b, act, impl="triton")
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    else:
        baseline = naive_bias_act(x.to(dtype), lo_b, act)
        assert_close_budget(out, ref, baseline, factor=2.0, name=f"bias_act triton {act} {dtype}")


@pytest.mark.interpret
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_every_activation_fp32(act):
    _check(13, 40, act, torch.float32, "cpu")


@pytest.mark.interpret
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize(("m", "n"), [(1, 48), (37, 300)])
def test_fp16_shapes_and_no_bias(act, m, n):
    _check(m, n, act, torch.float16, "cpu")
    _check(m, n, act, torch.float16, "cpu", with_bias=False)


@pytest.mark.interpret
def test_erf_gelu_is_not_the_tanh_form():
    x = torch.linspace(-4, 4, 64).reshape(4, 16)
    erf = bias_act(x, None, "gelu", impl="triton")
    tanh = bias_act(x, None, "gelu_new", impl="triton")
    torch.testing.assert_close(erf, torch.nn.functional.gelu(x), rtol=0, atol=1e-6)
    assert (erf - tanh).abs().max() > 1e-4


@pytest.mark.interpret
def test_inplace_writes_the_input_buffer():
    x = torch.randn(5, 48)
    b = torch.randn(48)
    expected = naive_bias_act(x, b, "gelu")
    scratch = x.clone()
    out = bias_act(scratch, b, "gelu", inplace=True, impl="triton")
    assert out.data_ptr() == scratch.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "silu"])
@pytest.mark.parametrize(("m", "n"), [(1, 3072), (4097, 3072), (300, 1536)])
def test_bias_act_gpu(dtype, act, m, n):
    _check(m, n, act, dtype, "cuda")


@pytest.mark.interpret
def test_erf_gelu_relative_accuracy_in_the_tails():
    """The erfc form keeps fp32-level relative accuracy where ``0.5 x (1 + erf(x / sqrt 2))`` cancels (x << 0)."""
    x = torch.cat([torch.linspace(-14, 14, 20000), torch.randn(4000) * 3]).reshape(-1, 8)
    out = bias_act(x, None, "gelu", impl="triton").double()
    xd = x.double()
    ref = xd * 0.5 * torch.special.erfc(-xd * 0.7071067811865476)  # fp64 1 + erf(x) cancels too for x < -8
    assert (out - ref).abs().max().item() < 5e-7
    tail = ref.abs() > 1e-30
    assert ((out - ref).abs()[tail] / ref.abs()[tail]).max().item() < 2e-5
    textbook = 0.5 * x * (1 + torch.erf(x * 0.7071067811865476))  # fp32, what the kernel used to compute
    assert ((textbook.double() - ref).abs()[tail] / ref.abs()[tail]).max().item() > 0.5
