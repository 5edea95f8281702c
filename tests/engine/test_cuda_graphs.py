"""CUDA-graph bucketing: token buckets, the static ``cu_seqlens`` layout with dummy padding sequences, and that
real sequences are unaffected by the padding (on CPU through ``EncoderModel.encode``; replay itself on the GPU)."""

from __future__ import annotations

import random

import pytest
import torch

from trimformer.engine.cuda_graphs import (
    MIN_STEP,
    PAD_CHUNK,
    GraphedEncoder,
    GraphKey,
    static_cu_seqlens,
    token_bucket,
    warmup_cu_seqlens,
)
from trimformer.models.encoders import EncoderConfig, EncoderModel
from trimformer.ops.varlen import PackedBatch
from trimformer.testing.tolerances import assert_close_budget


def _tiny_model(model_type="bert", device="cpu", dtype=torch.float32, type_vocab=2):
    cfg = EncoderConfig(
        model_type=model_type, vocab_size=97, hidden_size=32, num_heads=2, intermediate_size=48, num_layers=2,
        activation="gelu", layer_norm_eps=1e-12, max_position_embeddings=300, type_vocab_size=type_vocab,
        pad_token_id=1 if model_type == "roberta" else 0, position_offset=2 if model_type == "roberta" else 0,
        embedding_size=32,
    )  # fmt: skip
    model = EncoderModel(cfg, device=device, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(device)
            p.copy_(1.0 + 0.1 * noise if "norm.weight" in name else 0.2 * noise)
    return model.to(dtype).eval().requires_grad_(False)


def _batch(lens, seed=0, types=False, offset=0, device=None):
    rng = random.Random(seed)
    ids = [[rng.randrange(2, 97) for _ in range(n)] for n in lens]
    tt = [[rng.randrange(0, 2) for _ in range(n)] for n in lens] if types else None
    return PackedBatch.from_token_lists(ids, tt, position_offset=offset, device=device)


def test_token_bucket_rounds_up_a_little():
    prev = 0
    for t in range(1, 20000, 7):
        b = token_bucket(t)
        assert t <= b < 1.0625 * t + MIN_STEP and b % MIN_STEP == 0
        assert b >= prev  # monotone: a longer batch never gets a smaller graph
        prev = b
    assert len({token_bucket(t) for t in range(1025, 2049)}) == 16  # a handful of graphs per power of two
    assert token_bucket(270) - 270 < MIN_STEP  # B = 1, S = 512: no longer a 320-token graph


@pytest.mark.parametrize("seed", range(20))
def test_static_cu_seqlens_layout(seed):
    rng = random.Random(seed)
    lens = [rng.randint(1, 400) for _ in range(rng.randint(1, 40))]
    batch = _batch(lens, seed)
    key = GraphKey.for_batch(batch)
    cu = static_cu_seqlens(batch.seqlens, key)
    n = len(lens)
    assert len(cu) == key.seqs + 1 and cu[0] == 0 and cu[-1] == key.tokens
    assert cu[: n + 1] == batch.cu_seqlens.tolist()  # real sequences keep their exact lengths and offsets
    extra = [b - a for a, b in zip(cu[n:], cu[n + 1 :])]
    assert all(0 <= e <= PAD_CHUNK for e in extra) and sum(extra) == key.tokens - batch.num_tokens
    assert key.max_seqlen >= max(lens) and key.max_seqlen >= PAD_CHUNK
    assert key.tokens == token_bucket(batch.num_tokens)
    warm = warmup_cu_seqlens(key)  # the capture-time layout is valid too
    assert len(warm) == key.seqs + 1 and warm[0] == 0 and warm[-1] == key.tokens
    assert all(a <= b for a, b in zip(warm, warm[1:]))


def test_too_many_sequences_for_a_bucket_is_an_error():
    key = GraphKey(tokens=128, seqs=2, max_seqlen=64, has_types=False)
    with pytest.raises(ValueError, match="do not fit"):
        static_cu_seqlens((1, 1, 1), key)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_padding_sequences_do_not_change_real_rows(model_type):
    """The graph's static layout (real tokens, then dummy sequences, then empty slots) run eagerly gives the real
    rows of the plain packed forward."""
    offset = 2 if model_type == "roberta" else 0
    model = _tiny_model(model_type)
    batch = _batch([1, 5, 37, 70], seed=3, types=True, offset=offset)
    key = GraphKey.for_batch(batch)
    t = batch.num_tokens
    pad = key.tokens - t
    ids = torch.cat([batch.input_ids, torch.zeros(pad, dtype=torch.long)])
    pos = torch.cat([batch.position_ids, torch.full((pad,), offset, dtype=torch.long)])
    types = torch.cat([batch.token_type_ids, torch.zeros(pad, dtype=torch.long)])
    cu = torch.tensor(static_cu_seqlens(batch.seqlens, key), dtype=torch.int32)
    with torch.inference_mode():
        padded = model.encode(ids, pos, types, cu, key.max_seqlen)
        plain = model.forward_packed(batch)
    assert pad > 0 and padded.shape[0] == key.tokens
    torch.testing.assert_close(padded[:t], plain, rtol=0, atol=2e-6)


def test_graph_runner_refuses_cpu_models():
    runner = GraphedEncoder(_tiny_model())
    batch = _batch([3, 4])
    assert not runner.eligible(batch)
    with pytest.raises(ValueError, match="cannot run in a CUDA graph"):
        runner(batch)
    with pytest.raises(ValueError, match="must be positive"):
        GraphedEncoder(_tiny_model(), max_tokens=0)


# ----------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_replay_equals_eager_and_never_syncs(dtype):
    model = _tiny_model(device="cuda", dtype=dtype)
    runner = GraphedEncoder(model, max_tokens=4096)
    batches = [_batch(lens, seed=i, types=i % 2 == 1, device="cuda") for i, lens in
               enumerate([[1], [3, 200, 17], [64] * 20, [1, 2, 3, 250], [5, 6]])]  # fmt: skip
    with torch.inference_mode():
        for b in batches:  # capture every bucket first (capture synchronises once)
            runner(b)
        eager = [model.forward_packed(b) for b in batches]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graphed = [runner(b).clone() for b in batches]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    with torch.inference_mode():
        truth = [_tiny_model(device="cuda").forward_packed(b) for b in batches]
    # A replay runs on the bucket's padded token count, and kernels are chosen per row-count bucket (GEMM tuner,
    # split-K, attention tiles), so it need not be bit-identical to the eager call: it must be as accurate.
    for b, e, g, t in zip(batches, eager, graphed, truth):
        assert g.shape == (b.num_tokens, 32)
        assert_close_budget(g.float(), t, e.float(), factor=2.0, name=f"graph replay {dtype} {b.seqlens}")
