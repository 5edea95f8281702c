"""Triton attention kernels (varlen forward, backward, cache decode) against the naive references.

``interpret`` tests run the kernels on CPU under ``TRITON_INTERPRET=1`` (fp32/fp16, tiny shapes, small blocks so
the multi-block loops, the causal band and the sequence-end masks are all exercised). ``gpu`` tests run fp16/bf16
at real shapes on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from trimformer.ops.attention import (
    kvcache_attention,
    naive_attention,
    naive_kvcache_attention,
    naive_varlen_attention,
    varlen_attention,
)
from trimformer.testing import assert_close_budget

triton = pytest.importorskip("triton")

from trimformer.ops.attention import backward, decode, forward  # noqa: E402

SMALL_FWD = forward.FwdConfig(32, 16, 4, 1)  # BLOCK_M > BLOCK_N: several key blocks, band of two blocks
WIDE_FWD = forward.FwdConfig(16, 32, 4, 1)  # BLOCK_N > BLOCK_M
SMALL_BWD = backward.BwdConfig(16, 32, 32, 16, 4, 1)
LENS = [1, 5, 37, 70]  # a length-1 sequence, lengths that are not multiples of any block


def _cu(lens, device="cpu"):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _qkv(lens, hq, hk, d, dtype, device="cpu"):
    t = sum(lens)
    return tuple(torch.randn(t, h, d, device=device).to(dtype) for h in (hq, hk, hk))


def _ref(q, k, v, cu, max_len, causal, scale=None):
    return naive_varlen_attention(q.double(), k.double(), v.double(), cu, max_len, causal=causal, scale=scale)


# ----------------------------------------------------------------------------------------------- interpreter


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [48, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config", [None, SMALL_FWD, WIDE_FWD], ids=["single-tile", "bm32-bn16", "bm16-bn32"])
def test_forward_matches_naive(dtype, d, causal, config):
    hq, hk = (4, 2) if config is SMALL_FWD else (2, 2)
    q, k, v = _qkv(LENS, hq, hk, d, dtype)
    cu = _cu(LENS)
    out = forward.varlen_attention_fwd(q, k, v, cu, max(LENS), causal=causal, scale=d**-0.5, config=config)
    ref = _ref(q, k, v, cu, max(LENS), causal)
    assert out.dtype == dtype and out.shape == q.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    else:
        baseline = naive_varlen_attention(q, k, v, cu, max(LENS), causal=causal)
        assert_close_budget(out, ref, baseline, name=f"fwd fp16 d={d} causal={causal}")


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
def test_forward_tma_key_value_blocks(causal):
    """Full key blocks read through TMA descriptors of the fused QKV layout (GQA: two query heads per key head)
    give the same result as pointer loads; a head layout without a 2-D view falls back to pointers."""
    lens, hq, hk, d = [1, 16, 37, 70, 5], 4, 2, 32
    t, cu = sum(lens), _cu(lens)
    qkv = torch.randn(t, hq + 2 * hk, d).half()
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    assert forward.kv_tma_reason(k, v) is None
    assert "strides" in forward.kv_tma_reason(k.transpose(0, 1).contiguous().transpose(0, 1), v)
    ref = _ref(q, k, v, cu, max(lens), causal)
    tma = forward.FwdConfig(32, 16, 4, 1, tma=True)
    out = forward.varlen_attention_fwd(q, k, v, cu, max(lens), causal=causal, scale=d**-0.5, config=tma)
    plain = forward.varlen_attention_fwd(q, k, v, cu, max(lens), causal=causal, scale=d**-0.5, config=SMALL_FWD)
    assert_close_budget(out, ref, naive_varlen_attention(q, k, v, cu, max(lens), causal=causal), name="tma fwd")
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
def test_forward_lse_and_scale(causal):
    lens, d, scale = [3, 40], 32, 0.37
    q, k, v = _qkv(lens, 2, 1, d, torch.float32)
    cu = _cu(lens)
    out, lse = forward.varlen_attention_fwd(q, k, v, cu, 40, causal=causal, scale=scale, return_lse=True,
                                            config=SMALL_FWD)  # fmt: skip
    torch.testing.assert_close(out.double(), _ref(q, k, v, cu, 40, causal, scale), rtol=0, atol=2e-6)
    for s, e in [(0, 3), (3, 43)]:
        logits = torch.einsum("qhd,khd->hqk", q[s:e].double(), k[s:e].double().expand(-1, 2, -1)) * scale
        if causal:
            logits = logits.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(lse[:, s:e].double(), torch.logsumexp(logits, -1), rtol=0, atol=1e-5)


@pytest.mark.interpret
def test_forward_strided_inputs_empty_segments_and_batch_invariance():
    lens = [9, 0, 33, 2]  # an empty segment in the middle
    cu = _cu(lens)
    qkv = torch.randn(sum(lens), 3, 2, 16)  # fused QKV projection layout: q, k, v are strided views
    q, k, v = qkv.unbind(1)
    assert q.stride(0) == 96
    out = varlen_attention(q, k, v, cu, 33, impl="triton")
    torch.testing.assert_close(out.double(), _ref(q, k, v, cu, 33, False), rtol=0, atol=2e-6)
    qkv2 = qkv.clone()
    qkv2[:9] += 3.0  # change only the first sequence
    out2 = varlen_attention(*qkv2.unbind(1), cu, 33, impl="triton")
    torch.testing.assert_close(out2[9:], out[9:], rtol=0, atol=0)
    empty = varlen_attention(q[:0], k[:0], v[:0], torch.zeros(1 + 1, dtype=torch.int32), 0, impl="triton")
    assert empty.shape == (0, 2, 16)


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 48), (2, 2, 32)])
def test_backward_matches_naive_autograd(causal, hq, hk, d):
    q, k, v = (x.requires_grad_() for x in _qkv(LENS, hq, hk, d, torch.float32))
    cu = _cu(LENS)
    out = backward.VarlenAttentionFunction.apply(q, k, v, cu, max(LENS), causal, d**-0.5)
    dout = torch.randn_like(out)
    out.backward(dout)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = naive_varlen_attention(qd, kd, vd, cu, max(LENS), causal=causal)
    ref.backward(dout.double())
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=0, atol=2e-6)
    for name, got, want in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5, msg=name)


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
def test_backward_small_blocks_fp16(causal):
    """Several key and query blocks per program in both backward kernels; fp16 within budget of plain fp16."""
    hq, hk, d = 4, 1, 32
    q, k, v = _qkv(LENS, hq, hk, d, torch.float16)
    cu = _cu(LENS)
    out, lse = forward.varlen_attention_fwd(q, k, v, cu, 70, causal=causal, scale=d**-0.5, return_lse=True)
    dout = torch.randn_like(out)
    grads = backward.varlen_attention_bwd(dout, q, k, v, out, lse, cu, 70, causal=causal, scale=d**-0.5,
                                          config=SMALL_BWD)  # fmt: skip
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    naive_varlen_attention(*ref_in, cu, 70, causal=causal).backward(dout.double())
    low_in = [x.clone().requires_grad_() for x in (q, k, v)]
    naive_varlen_attention(*low_in, cu, 70, causal=causal).backward(dout)
    for name, got, ref, low in zip(("dq", "dk", "dv"), grads, ref_in, low_in):
        assert_close_budget(got, ref.grad, low.grad, factor=3.0, name=name)


@pytest.mark.interpret
def test_api_grad_dispatch():
    lens, d = [6, 20], 16
    cu = _cu(lens)
    q, k, v = _qkv(lens, 2, 2, d, torch.float32)
    plain = varlen_attention(q, k, v, cu, 20, impl="triton")
    assert plain.grad_fn is None  # no autograd bookkeeping when nothing needs a gradient
    qg = q.clone().requires_grad_()
    out = varlen_attention(qg, k, v, cu, 20, impl="triton")
    assert type(out.grad_fn).__name__.startswith("VarlenAttentionFunction")
    with torch.no_grad():
        assert varlen_attention(qg, k, v, cu, 20, impl="triton").grad_fn is None
    out.sum().backward()
    qd = q.double().requires_grad_()
    naive_varlen_attention(qd, k.double(), v.double(), cu, 20).sum().backward()
    torch.testing.assert_close(qg.grad.double(), qd.grad, rtol=0, atol=1e-5)


@pytest.mark.interpret
def test_api_rejects_bf16_in_interpreter_and_auto_stays_on_torch_for_cpu():
    q = torch.randn(5, 2, 16, dtype=torch.bfloat16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="bfloat16"):
        varlen_attention(q, q, q, cu, 5, impl="triton")
    with pytest.raises(ValueError, match="head dim"):
        x = torch.randn(5, 1, 300)
        varlen_attention(x, x, x, cu, 5, impl="triton")
    qf = torch.randn(5, 2, 16)
    torch.testing.assert_close(varlen_attention(qf, qf, qf, cu, 5), naive_attention(qf, qf, qf))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tq,hq,hk,splits", [(1, 4, 2, None), (1, 8, 1, 3), (4, 2, 2, 1), (4, 4, 2, 3)])
def test_decode_matches_naive(dtype, tq, hq, hk, splits):
    b, s_max, d = 3, 100, 48
    q = torch.randn(b, tq, hq, d).to(dtype)
    kc = torch.randn(b, s_max, hk, d).to(dtype)
    vc = torch.randn(b, s_max, hk, d).to(dtype)
    lens = torch.tensor([tq, 100, 37], dtype=torch.int32)  # a row whose cache holds only the new tokens
    out = decode.kvcache_attention_fwd(q, kc, vc, lens, scale=d**-0.5, num_splits=splits)
    ref = naive_kvcache_attention(q.double(), kc.double(), vc.double(), lens)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    else:
        assert_close_budget(out, ref, naive_kvcache_attention(q, kc, vc, lens), name="decode fp16")


@pytest.mark.interpret
def test_decode_equals_last_rows_of_prefill_and_api_dispatch():
    s, d, tq = 23, 16, 2
    q, k, v = (torch.randn(s, h, d) for h in (4, 2, 2))
    full = forward.varlen_attention_fwd(q, k, v, _cu([s]), s, causal=True, scale=d**-0.5)
    kc, vc = torch.zeros(1, 40, 2, d), torch.zeros(1, 40, 2, d)
    kc[0, :s], vc[0, :s] = k, v
    out = kvcache_attention(q[None, -tq:], kc, vc, torch.tensor([s], dtype=torch.int32), impl="triton")
    torch.testing.assert_close(out[0], full[-tq:], rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="require grad"):
        kvcache_attention(q[None, -tq:].requires_grad_(), kc, vc, torch.tensor([s], dtype=torch.int32), impl="triton")


# ----------------------------------------------------------------------------------------------- GPU


def _gpu_lens(n_long):
    return [1, 2, 17, 64, 129, 300, 1000, 2047, *n_long]


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 48, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype,causal", [(torch.float16, False), (torch.bfloat16, True)])
def test_gpu_forward_head_dims(dtype, d, causal):
    lens = _gpu_lens([])
    q, k, v = _qkv(lens, 4, 2, d, dtype, "cuda")
    cu = _cu(lens, "cuda")
    out = varlen_attention(q, k, v, cu, max(lens), causal=causal, impl="triton")
    ref = _ref(q, k, v, cu, max(lens), causal)
    base = naive_varlen_attention(q, k, v, cu, max(lens), causal=causal)
    assert_close_budget(out, ref, base, name=f"fwd {dtype} d={d} causal={causal}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_lengths_1_to_8192_one_batch(dtype, causal):
    lens = [8192, 1, 3, 511, 4000, 1, 64, 129]
    q, k, v = _qkv(lens, 4, 1, 128, dtype, "cuda")
    cu = _cu(lens, "cuda")
    out = torch.full_like(q, float("nan"))
    out.copy_(varlen_attention(q, k, v, cu, 8192, causal=causal, impl="triton"))
    ref = _ref(q, k, v, cu, 8192, causal)
    base = naive_varlen_attention(q, k, v, cu, 8192, causal=causal)
    assert_close_budget(out, ref, base, name=f"fwd long {dtype} causal={causal}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_forward_tma_kv_in_fused_qkv_layout(dtype):
    """BERT-base attention (12 x 64, q/k/v strided views of the fused QKV output, ByteTransformer lengths): the
    opt-in TMA key/value loads (``FwdConfig.tma``) match the pointer-load kernel bit for bit and the fp64 reference."""
    lens = [int(x) for x in torch.randint(205, 1025, (16,))] + [1, 64, 1024]
    cu = _cu(lens, "cuda")
    qkv = torch.randn(sum(lens), 3, 12, 64, device="cuda").to(dtype)
    q, k, v = qkv.unbind(1)
    assert forward.kv_tma_reason(k, v) is None
    run = lambda tma: forward.varlen_attention_fwd(  # noqa: E731
        q, k, v, cu, 1024, causal=False, scale=0.125, config=forward.FwdConfig(128, 64, 8, 3, tma=tma)
    )
    out = run(True)
    ref = _ref(q, k, v, cu, 1024, False)
    assert_close_budget(out, ref, naive_varlen_attention(q, k, v, cu, 1024), name=f"tma fwd {dtype}")
    torch.testing.assert_close(out, run(False), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("max_len", [1, 16, 64, 100, 128, 256])
def test_gpu_forward_short_sequence_paths(max_len):
    lens = [max_len] + [int(x) for x in torch.randint(1, max_len + 1, (40,))]
    q, k, v = _qkv(lens, 12, 12, 64, torch.float16, "cuda")
    cu = _cu(lens, "cuda")
    out = varlen_attention(q, k, v, cu, max_len, impl="triton")
    ref = _ref(q, k, v, cu, max_len, False)
    assert_close_budget(out, ref, naive_varlen_attention(q, k, v, cu, max_len), name=f"short S={max_len}")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_small_grid_uses_narrow_query_tiles(d, causal):
    """One sequence and two heads: the default config shrinks the query tile below the key block (to 64 rows, not
    below, for bidirectional d = 64 with several key blocks: measured faster on the H100)."""
    cfg = forward.default_fwd_config(d, 1000, causal, programs=2, sms=132)
    if d == 64 and not causal:
        assert cfg.block_m == 64 < forward.default_fwd_config(d, 1000, causal, programs=1000, sms=132).block_m
    else:
        assert cfg.block_m < cfg.block_n
    lens = [1000]
    q, k, v = _qkv(lens, 2, 1, d, torch.bfloat16, "cuda")
    cu = _cu(lens, "cuda")
    out = varlen_attention(q, k, v, cu, 1000, causal=causal, impl="triton")
    ref = _ref(q, k, v, cu, 1000, causal)
    assert_close_budget(out, ref, naive_varlen_attention(q, k, v, cu, 1000, causal=causal), name="small grid")


@pytest.mark.gpu
def test_gpu_forward_no_host_sync():
    lens = [5, 300, 77]
    q, k, v = _qkv(lens, 8, 2, 64, torch.float16, "cuda")
    cu = _cu(lens, "cuda")
    varlen_attention(q, k, v, cu, 300, impl="triton")  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        varlen_attention(q, k, v, cu, 300, causal=True, impl="triton")
        varlen_attention(q, k, v, cu, 300)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hk", [(64, 8, 2), (128, 4, 1), (256, 2, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backward_bf16(d, hq, hk, causal):
    lens = [1, 70, 513, 1500, 2048]
    cu = _cu(lens, "cuda")
    q, k, v = (x.requires_grad_() for x in _qkv(lens, hq, hk, d, torch.bfloat16, "cuda"))
    out = varlen_attention(q, k, v, cu, max(lens), causal=causal, impl="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = naive_varlen_attention(*ref_in, cu, max(lens), causal=causal)
    ref.backward(dout.double())
    low_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    low = naive_varlen_attention(*low_in, cu, max(lens), causal=causal)
    low.backward(dout)
    assert_close_budget(out, ref, low, name="out")
    for name, got, r, lo in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_in, low_in):
        assert _cosine(got, r.grad) >= 0.999, f"{name} cosine {_cosine(got, r.grad):.5f}"
        assert_close_budget(got, r.grad, lo.grad, factor=3.0, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,hq,hk,tq", [(64, 8, 8, 1), (128, 16, 4, 1), (128, 8, 2, 16), (256, 4, 1, 3), (80, 6, 2, 2)])
def test_gpu_decode_matches_naive(dtype, d, hq, hk, tq):
    b, s_max = 5, 4096
    q = torch.randn(b, tq, hq, d, device="cuda", dtype=dtype)
    kc = torch.randn(b, s_max, hk, d, device="cuda", dtype=dtype)
    vc = torch.randn(b, s_max, hk, d, device="cuda", dtype=dtype)
    lens = torch.tensor([tq, 4096, 1000, 63, 2049], dtype=torch.int32, device="cuda")
    out = kvcache_attention(q, kc, vc, lens, impl="triton")
    ref = naive_kvcache_attention(q.double(), kc.double(), vc.double(), lens)
    assert_close_budget(out, ref, naive_kvcache_attention(q, kc, vc, lens), name=f"decode {dtype} d={d}")


@pytest.mark.gpu
def test_gpu_decode_in_cuda_graph():
    b, s_max, hq, hk, d = 4, 2048, 8, 2, 128
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, s_max, hk, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.tensor([1, 100, 2048, 777], dtype=torch.int32, device="cuda")
    static_out = kvcache_attention(q, kc, vc, lens, impl="triton")  # warm-up compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kvcache_attention(q, kc, vc, lens, impl="triton")
    for step in range(3):
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.tensor([1 + step, 100 + 7 * step, 2048, 777 - step], dtype=torch.int32))
        graph.replay()
        ref = naive_kvcache_attention(q.double(), kc.double(), vc.double(), lens)
        base = naive_kvcache_attention(q, kc, vc, lens)
        assert_close_budget(static_out, ref, base, name=f"graph replay {step}")


@pytest.mark.gpu
def test_gpu_auto_dispatch_uses_triton(monkeypatch):
    calls = []
    real = forward.varlen_attention_fwd

    def spy(*args, **kwargs):
        calls.append(kwargs.get("causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(forward, "varlen_attention_fwd", spy)
    lens = [3, 9]
    q, k, v = _qkv(lens, 2, 2, 64, torch.float16, "cuda")
    out = varlen_attention(q, k, v, _cu(lens, "cuda"), 9, causal=True)
    assert calls == [True]
    assert math.isfinite(out.float().sum().item())
