"""The PyTorch attention paths (CPU bucketed SDPA, cache attention) against the naive reference."""

import pytest
import torch

from trimformer.ops.attention import (
    kvcache_attention,
    naive_attention,
    naive_kvcache_attention,
    naive_varlen_attention,
    varlen_attention,
)


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [32, 48])
def test_torch_varlen_matches_naive(hq, hk, causal, d):
    lens = [1, 2, 17, 64, 129, 5, 5, 6, 63]
    cu = _cu(lens)
    t = int(cu[-1])
    q = torch.randn(t, hq, d, dtype=torch.float64)
    k = torch.randn(t, hk, d, dtype=torch.float64)
    v = torch.randn(t, hk, d, dtype=torch.float64)
    out = varlen_attention(q, k, v, cu, max(lens), causal=causal, impl="torch")
    ref = naive_varlen_attention(q, k, v, cu, max(lens), causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_varlen_reference_is_per_sequence_attention():
    """The varlen reference equals attention run on each sequence alone (no leakage between segments)."""
    lens = [3, 7]
    cu = _cu(lens)
    q, k, v = (torch.randn(10, 2, 8, dtype=torch.float64) for _ in range(3))
    out = naive_varlen_attention(q, k, v, cu, 7)
    for s, e in [(0, 3), (3, 10)]:
        torch.testing.assert_close(out[s:e], naive_attention(q[s:e], k[s:e], v[s:e]), rtol=0, atol=0)
    k2 = k.clone()
    k2[3:] += 1.0  # perturb the second sequence only
    torch.testing.assert_close(naive_varlen_attention(q, k2, v, cu, 7)[:3], out[:3], rtol=0, atol=0)


def test_bucketed_path_reuses_plan_and_handles_new_metadata():
    lens_a, lens_b = [4, 9, 2], [9, 4, 2]
    q = torch.randn(15, 2, 16)
    for lens in (lens_a, lens_b, lens_a):
        cu = _cu(lens)
        out = varlen_attention(q, q, q, cu, 9, impl="torch")
        torch.testing.assert_close(out, naive_varlen_attention(q, q, q, cu, 9), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tq", [1, 3])
def test_kvcache_attention_matches_naive(tq):
    q = torch.randn(3, tq, 4, 16, dtype=torch.float64)
    kc = torch.randn(3, 12, 2, 16, dtype=torch.float64)
    vc = torch.randn(3, 12, 2, 16, dtype=torch.float64)
    lens = torch.tensor([3, 12, 5], dtype=torch.int32)
    out = kvcache_attention(q, kc, vc, lens, impl="torch")
    torch.testing.assert_close(out, naive_kvcache_attention(q, kc, vc, lens), rtol=0, atol=1e-12)


def test_kvcache_decode_equals_last_row_of_prefill():
    """Decode is checked against prefill, not against itself."""
    s = 9
    q = torch.randn(s, 4, 8, dtype=torch.float64)
    k = torch.randn(s, 2, 8, dtype=torch.float64)
    v = torch.randn(s, 2, 8, dtype=torch.float64)
    full = naive_attention(q, k, v, causal=True)
    cache_k = torch.zeros(1, 16, 2, 8, dtype=torch.float64)
    cache_v = torch.zeros_like(cache_k)
    cache_k[0, :s], cache_v[0, :s] = k, v
    out = kvcache_attention(q[None, -1:], cache_k, cache_v, torch.tensor([s], dtype=torch.int32))
    torch.testing.assert_close(out[0, 0], full[-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cu_seqlens": torch.tensor([0, 5], dtype=torch.int64)}, "int32"),
        ({"max_seqlen": torch.tensor(5)}, "Python int"),
        ({"k": torch.randn(5, 4, 8)}, "multiple"),
        ({"impl": "cuda"}, "impl must be one of"),
    ],
)
def test_varlen_attention_rejects_bad_input(kwargs, match):
    args = {
        "q": torch.randn(5, 6, 8),
        "k": torch.randn(5, 2, 8),
        "v": torch.randn(5, 2, 8),
        "cu_seqlens": torch.tensor([0, 5], dtype=torch.int32),
        "max_seqlen": 5,
    }
    args.update(kwargs)
    if "k" in kwargs:
        args["v"] = kwargs["k"]
    with pytest.raises(ValueError, match=match):
        varlen_attention(**args)


def test_explicit_triton_on_plain_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match="impl='triton'"):
        varlen_attention(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5, impl="triton")
