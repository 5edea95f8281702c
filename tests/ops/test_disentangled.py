"""Packed disentangled attention (DeBERTa-v2/v3): torch path and Triton kernel against the naive reference, the
naive reference against HF's own ``DisentangledSelfAttention``, the index table, and input validation.

``interpret`` tests run the Triton kernel on CPU under ``TRITON_INTERPRET=1`` (small blocks so several key blocks,
a masked tail block and sequences shorter than one block are all exercised); ``gpu`` tests run fp16/bf16 on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from trimformer.ops.disentangled import (
    disentangled_attention,
    log_bucket_position,
    naive_disentangled_attention,
    relative_positions,
)
from trimformer.ops.disentangled.buckets import relative_index
from trimformer.testing import assert_close_budget

LENS = [1, 5, 37, 70]
# (position_buckets, max_relative_positions, span): log buckets reached by length 70; plain clamped distances with
# a span shorter than the longest sequence (clamping at both ends); buckets with a tiny span.
BUCKETING = [(16, 40, 16), (-1, 24, 24), (8, 12, 8)]
TERMS = [(True, True), (True, False), (False, True), (False, False)]


def _cu(lens, device="cpu"):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(lens, heads, d, span, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, heads, d, generator=g) for _ in range(3))
    pk, pq = (torch.randn(2 * span, heads, d, generator=g) for _ in range(2))
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v, pk, pq))


def _kw(c2p, p2c, buckets, max_rel):
    return {"c2p": c2p, "p2c": p2c, "position_buckets": buckets, "max_relative_positions": max_rel}


def _ref(q, k, v, pk, pq, cu, kw):
    return naive_disentangled_attention(
        q.double(), k.double(), v.double(), cu, int((cu[1:] - cu[:-1]).max()), pos_key=pk.double(),
        pos_query=pq.double(), **kw,
    )  # fmt: skip


def test_naive_matches_hf_disentangled_self_attention():
    """The reference is checked against HF's module itself (one padded-free sequence, c2p + p2c, log buckets)."""
    from transformers import DebertaV2Config
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention, build_relative_position

    cfg = DebertaV2Config(
        hidden_size=32, num_attention_heads=2, relative_attention=True, position_buckets=16,
        max_relative_positions=40, pos_att_type=["c2p", "p2c"], attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )  # fmt: skip
    attn = DisentangledSelfAttention(cfg).double().eval()
    n = 70
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, n, 32, generator=g, dtype=torch.float64)
    rel_emb = torch.randn(32, 32, generator=g, dtype=torch.float64)  # 2 * position_buckets rows
    rel_pos = build_relative_position(x, x, bucket_size=16, max_position=40)
    with torch.no_grad():
        truth = attn(x, torch.ones(1, 1, n, n), relative_pos=rel_pos, rel_embeddings=rel_emb)[0][0]
        split = lambda lin, t: lin(t).view(t.shape[0], 2, 16)  # noqa: E731
        q, k, v = (split(lin, x[0]) for lin in (attn.query_proj, attn.key_proj, attn.value_proj))
        pk, pq = split(attn.pos_key_proj, rel_emb), split(attn.pos_query_proj, rel_emb)
        ours = naive_disentangled_attention(
            q, k, v, _cu([n]), n, pos_key=pk, pos_query=pq, **_kw(True, True, 16, 40)
        ).reshape(n, 32)
    torch.testing.assert_close(ours, truth, rtol=0, atol=1e-6)  # HF rounds its scale to float32


def test_bucket_table_matches_reference_positions():
    for buckets, max_rel, span in [*BUCKETING, (256, 512, 256)]:
        for length in (1, 70, 300):
            index = relative_index(length, span, buckets, max_rel, torch.device("cpu"))
            rel = relative_positions(length, buckets, max_rel)
            expect = torch.clamp(rel + span, 0, 2 * span - 1)
            i = torch.arange(length)
            got = index.table.long()[i[:, None] - i[None, :] + index.length - 1] + index.lo
            assert torch.equal(got, expect), (buckets, max_rel, length)
            assert index.lo == int(expect.min()) or length < index.length


def test_log_buckets_are_odd_and_exact_near_zero():
    r = torch.arange(-600, 601)
    b = log_bucket_position(r, 256, 512)
    assert torch.equal(b, -log_bucket_position(-r, 256, 512))
    near = r.abs() < 128
    assert torch.equal(b[near], r[near])
    assert int(b[r.abs() < 512].abs().max()) == 255  # distances below max_relative_positions fill the 2 x 256 rows


@pytest.mark.parametrize("buckets,max_rel,span", BUCKETING)
@pytest.mark.parametrize("c2p,p2c", TERMS)
def test_torch_path_matches_naive(buckets, max_rel, span, c2p, p2c):
    q, k, v, pk, pq = _inputs(LENS, 2, 16, span)
    cu = _cu(LENS)
    kw = _kw(c2p, p2c, buckets, max_rel)
    out = disentangled_attention(q, k, v, cu, max(LENS), pos_key=pk, pos_query=pq, impl="torch", **kw)
    torch.testing.assert_close(out.double(), _ref(q, k, v, pk, pq, cu, kw), rtol=0, atol=2e-6)


def test_default_scale_counts_the_terms():
    q, k, v, pk, pq = _inputs([9], 1, 16, 8)
    cu = _cu([9])
    for c2p, p2c in TERMS:
        kw = _kw(c2p, p2c, -1, 8)
        out = disentangled_attention(q, k, v, cu, 9, pos_key=pk, pos_query=pq, impl="torch", **kw)
        scale = 1.0 / math.sqrt(16 * (1 + c2p + p2c))
        ref = naive_disentangled_attention(q, k, v, cu, 9, pos_key=pk, pos_query=pq, scale=scale, **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_torch_path_gradients_match_naive():
    q, k, v, pk, pq = (x.double().requires_grad_() for x in _inputs([3, 20], 2, 8, 8))
    cu = _cu([3, 20])
    kw = _kw(True, True, 8, 12)
    out = disentangled_attention(q, k, v, cu, 20, pos_key=pk, pos_query=pq, impl="torch", **kw)
    ref = naive_disentangled_attention(q, k, v, cu, 20, pos_key=pk, pos_query=pq, **kw)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v, pk, pq))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v, pk, pq))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_bad_inputs_raise():
    q, k, v, pk, pq = _inputs([4], 2, 8, 4)
    cu = _cu([4])
    with pytest.raises(ValueError, match="c2p is on but pos_key is None"):
        disentangled_attention(q, k, v, cu, 4, pos_key=None, pos_query=pq)
    with pytest.raises(ValueError, match=r"pos_query must be \[2 \* span, H, D\]"):
        disentangled_attention(q, k, v, cu, 4, pos_key=pk, pos_query=pq[:, :1])
    with pytest.raises(ValueError, match="same rows"):
        disentangled_attention(q, k, v, cu, 4, pos_key=pk, pos_query=pq[:6])
    with pytest.raises(ValueError, match="int32"):
        disentangled_attention(q, k, v, cu.long(), 4, pos_key=pk, pos_query=pq)
    with pytest.raises(ValueError, match="max_relative_positions >"):
        disentangled_attention(q, k, v, cu, 4, pos_key=pk, pos_query=pq, position_buckets=8, max_relative_positions=4)
    with pytest.raises(ValueError, match="impl must be one of"):
        disentangled_attention(q, k, v, cu, 4, pos_key=pk, pos_query=pq, impl="cuda")
    with pytest.raises(ValueError, match="forward-only"):
        disentangled_attention(q.requires_grad_(), k, v, cu, 4, pos_key=pk, pos_query=pq, impl="triton")


# ----------------------------------------------------------------------------------------------- interpreter


@pytest.mark.interpret
@pytest.mark.parametrize("buckets,max_rel,span", BUCKETING)
@pytest.mark.parametrize("c2p,p2c", TERMS)
def test_triton_matches_naive(buckets, max_rel, span, c2p, p2c):
    from trimformer.ops.disentangled import forward

    q, k, v, pk, pq = _inputs(LENS, 2, 16, span)
    cu = _cu(LENS)
    kw = _kw(c2p, p2c, buckets, max_rel)
    ref = _ref(q, k, v, pk, pq, cu, kw)
    out = disentangled_attention(q, k, v, cu, max(LENS), pos_key=pk, pos_query=pq, impl="triton", **kw)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    if (c2p, p2c) == (True, True):  # BLOCK_N < BLOCK_M, several masked and unmasked key blocks
        forward.default_config.cache_clear()
        small = forward.DisentangledConfig(32, 16, 4, 1)
        index = relative_index(max(LENS), span, buckets, max_rel, q.device)
        rows = slice(index.lo, index.hi + 1)
        c2p_s = torch.einsum("thd,rhd->thr", q, pk[rows]).contiguous()
        p2c_s = torch.einsum("thd,rhd->thr", k, pq[rows]).contiguous()
        scale = 1.0 / math.sqrt(16 * 3)
        out = forward.disentangled_attention_fwd(
            q, k, v, cu, max(LENS), c2p_s, p2c_s, index.table, index.length, scale=scale, config=small
        )
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


@pytest.mark.interpret
def test_triton_fp16_within_budget_and_odd_head_dim():
    q, k, v, pk, pq = _inputs(LENS, 2, 24, 16)
    cu = _cu(LENS)
    kw = _kw(True, True, 16, 40)
    ref = _ref(q, k, v, pk, pq, cu, kw)
    half = [x.half() for x in (q, k, v, pk, pq)]
    out = disentangled_attention(*half[:3], cu, max(LENS), pos_key=half[3], pos_query=half[4], impl="triton", **kw)
    base = disentangled_attention(*half[:3], cu, max(LENS), pos_key=half[3], pos_query=half[4], impl="torch", **kw)
    assert_close_budget(out, ref, base, factor=3.0, name="disentangled fp16")


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernel_within_budget(dtype):
    lens = [1, 17, 128, 255, 300, 512]
    q, k, v, pk, pq = _inputs(lens, 12, 64, 256, device="cuda")
    cu = _cu(lens, "cuda")
    kw = _kw(True, True, 256, 512)
    ref = _ref(q.cpu(), k.cpu(), v.cpu(), pk.cpu(), pq.cpu(), cu.cpu(), kw)
    lo = [x.to(dtype) for x in (q, k, v, pk, pq)]
    out = disentangled_attention(*lo[:3], cu, max(lens), pos_key=lo[3], pos_query=lo[4], impl="triton", **kw)
    base = disentangled_attention(*lo[:3], cu, max(lens), pos_key=lo[3], pos_query=lo[4], impl="torch", **kw)
    assert_close_budget(out.cpu(), ref, base.cpu(), factor=3.0, name=f"disentangled {dtype}")
