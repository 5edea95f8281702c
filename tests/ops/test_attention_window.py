"""Sliding-window (local) varlen attention: the ``window`` argument on every path against an explicit band mask.

The naive reference is itself checked against a dense masked softmax written out here; the PyTorch path, the
Triton kernel (``interpret`` on CPU, ``gpu`` on CUDA) and the autograd fallback are checked against the reference.
"""

from __future__ import annotations

import pytest
import torch

from trimformer.ops.attention import naive_attention, naive_varlen_attention, varlen_attention
from trimformer.testing import assert_close_budget

LENS = [1, 5, 37, 70]
WINDOWS = [(3, 5), (0, 0), (10, 2), (64, 64)]


def _cu(lens, device="cpu"):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _qkv(lens, hq, hk, d, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    t = sum(lens)
    return tuple(torch.randn(t, h, d, generator=g).to(device=device, dtype=dtype) for h in (hq, hk, hk))


def _ref(q, k, v, cu, window, causal=False):
    right = 0 if causal else window[1]
    return naive_varlen_attention(
        q.double(), k.double(), v.double(), cu, int((cu[1:] - cu[:-1]).max()), causal=causal, window=(window[0], right)
    )


def test_naive_window_is_a_band_mask():
    q, k, v = (x.double() for x in _qkv([40], 2, 2, 8))
    left, right = 4, 7
    i = torch.arange(40)
    band = (i[None, :] >= i[:, None] - left) & (i[None, :] <= i[:, None] + right)
    scores = torch.einsum("qhd,khd->hqk", q, k) / 8**0.5
    expect = torch.einsum("hqk,khd->qhd", torch.softmax(scores.masked_fill(~band, float("-inf")), -1), v)
    torch.testing.assert_close(naive_attention(q, k, v, window=(left, right)), expect, rtol=0, atol=1e-12)
    # a window wider than the sequence is global attention
    torch.testing.assert_close(naive_attention(q, k, v, window=(40, 40)), naive_attention(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_path_matches_naive(window, causal):
    q, k, v = _qkv(LENS, 4, 2, 16)
    cu = _cu(LENS)
    out = varlen_attention(q, k, v, cu, max(LENS), causal=causal, window=window, impl="torch")
    torch.testing.assert_close(out.double(), _ref(q, k, v, cu, window, causal), rtol=0, atol=2e-6)


def test_int_window_is_symmetric_and_none_is_global():
    q, k, v = _qkv(LENS, 2, 2, 16)
    cu = _cu(LENS)
    a = varlen_attention(q, k, v, cu, max(LENS), window=6, impl="torch")
    b = varlen_attention(q, k, v, cu, max(LENS), window=(6, 6), impl="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    glob = varlen_attention(q, k, v, cu, max(LENS), impl="torch")
    assert (a - glob).abs().max() > 1e-2  # the window really changes long sequences


def test_windowed_gradients_fall_back_to_torch_and_match_naive():
    q, k, v = (x.double().requires_grad_() for x in _qkv([3, 30], 2, 2, 8))
    cu = _cu([3, 30])
    out = varlen_attention(q, k, v, cu, 30, window=(4, 2))  # "auto": the Triton backward has no window
    ref = naive_varlen_attention(q, k, v, cu, 30, window=(4, 2))
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("bad", [-1, (1, -2), (1, 2, 3), 2.5, True, "64"])
def test_bad_window_raises(bad):
    q, k, v = _qkv([4], 2, 2, 8)
    with pytest.raises(ValueError, match="window must be None, a non-negative int or a"):
        varlen_attention(q, k, v, _cu([4]), 4, window=bad)


# ----------------------------------------------------------------------------------------------- interpreter


@pytest.mark.interpret
@pytest.mark.parametrize("window,causal", [((3, 5), False), ((0, 0), False), ((10, 2), True), ((64, 64), False)])
def test_triton_matches_naive(window, causal):
    from trimformer.ops.attention import forward

    q, k, v = _qkv(LENS, 4, 2, 16)
    cu = _cu(LENS)
    ref = _ref(q, k, v, cu, window, causal)
    out = varlen_attention(q, k, v, cu, max(LENS), causal=causal, window=window, impl="triton")
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    right = 0 if causal else window[1]
    cfg = forward.FwdConfig(32, 16, 4, 1)  # the band spans several key blocks
    out = forward.varlen_attention_fwd(
        q, k, v, cu, max(LENS), causal=causal, scale=16**-0.5, window=(window[0], right), config=cfg
    )
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


@pytest.mark.interpret
def test_triton_fp16_window_within_budget():
    q, k, v = _qkv(LENS, 2, 2, 32)
    cu = _cu(LENS)
    ref = _ref(q, k, v, cu, (8, 8))
    qh, kh, vh = q.half(), k.half(), v.half()
    out = varlen_attention(qh, kh, vh, cu, max(LENS), window=8, impl="triton")
    base = varlen_attention(qh, kh, vh, cu, max(LENS), window=8, impl="torch")
    assert_close_budget(out, ref, base, factor=3.0, name="windowed fp16")


@pytest.mark.interpret
def test_triton_explicit_with_grad_and_window_raises():
    q, k, v = _qkv([4], 2, 2, 8)
    with pytest.raises(ValueError, match="Triton backward has no window"):
        varlen_attention(q.requires_grad_(), k, v, _cu([4]), 4, window=2, impl="triton")


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_window_within_budget(dtype):
    lens = [1, 17, 128, 300, 1000]
    q, k, v = _qkv(lens, 12, 12, 64, device="cuda")
    cu = _cu(lens, "cuda")
    ref = _ref(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), (64, 64))
    lo = [x.to(dtype) for x in (q, k, v)]
    out = varlen_attention(*lo, cu, max(lens), window=64, impl="triton")
    base = varlen_attention(*lo, cu, max(lens), window=64, impl="torch")
    assert_close_budget(out.cpu(), ref, base.cpu(), factor=3.0, name=f"windowed {dtype}")
