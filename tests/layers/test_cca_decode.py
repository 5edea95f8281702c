"""Decode caches: prefill == chunked prefill == step decode == one full forward, for ragged left-padded batches and
packed input, for every attention kind (spec acceptance test 4)."""

import pytest
import torch

from trimformer.layers import AttentionCache, AttentionConfig, build_attention
from trimformer.layers.accounting import kv_cache_elements_per_token, state_elements_per_sequence

E = 24
CONFIGS = {
    "cca": dict(kind="cca", num_heads=3, num_kv_heads=3, head_dim=8, conv_kernel_seq=3, conv_kernel_ch=2, bias=True),
    "ccgqa": dict(kind="ccgqa", num_heads=4, num_kv_heads=2, head_dim=8, conv_kernel_ch=3, temperature_mode="exp"),
    "mha": dict(kind="mha", num_heads=4, num_kv_heads=4, head_dim=6, bias=True, rope_fraction=2 / 3),
    "gqa": dict(kind="gqa", num_heads=6, num_kv_heads=2, head_dim=4),
    "mla": dict(kind="mla", num_heads=3, head_dim=8, kv_lora_rank=12, q_lora_rank=10, rope_head_dim=4, bias=True),
}
LENS, S = [9, 4, 7, 3], 9  # ragged, left-padded; every row is real from column 6 on
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make(kind, dtype, seed=0):
    torch.manual_seed(seed)
    config = AttentionConfig(hidden_size=E, **CONFIGS[kind])
    layer = build_attention(config).to(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0, 0.3 if "proj" in name else 0.5)
    return config, layer


def batch(dtype):
    mask = torch.zeros(len(LENS), S, dtype=torch.bool)
    for b, n in enumerate(LENS):
        mask[b, S - n :] = True
    return torch.randn(len(LENS), S, E, dtype=dtype), mask


def assert_real_close(y, ref, mask, dtype):
    err = (y - ref)[mask].abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref[mask].abs().max().item()), err


def run_chunks(layer, config, x, mask, bounds, dtype, *, packed=False):
    """Feed columns [lo, hi) of the batch per chunk through the cache; decode (no mask) once all rows are real."""
    cache = AttentionCache.allocate(config, len(LENS), S + 2, num_layers=2, dtype=dtype)
    out = torch.zeros_like(x)
    for lo, hi in bounds:
        m = mask[:, lo:hi]
        if packed:
            counts = m.sum(1)
            cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
            y = layer(x[:, lo:hi][m], cu_seqlens=cu, max_seqlen=int(counts.max()), cache=cache, layer_idx=1)
            out[:, lo:hi][m] = y
        elif m.all() and hi - lo == 1:
            out[:, lo:hi] = layer(x[:, lo:hi], cache=cache, layer_idx=1)  # the decode path
        else:
            out[:, lo:hi] = layer(x[:, lo:hi], attention_mask=m, cache=cache, layer_idx=1)
    assert cache.layers[1].seqlens.tolist() == LENS
    assert cache.layers[0].seqlens.tolist() == [0] * len(LENS)  # other layers' entries untouched
    return out


SCHEDULES = {
    "prefill+decode": [(0, 6), (6, 7), (7, 8), (8, 9)],
    "chunked": [(0, 2), (2, 5), (5, 7), (7, 8), (8, 9)],  # chunk (0, 2) is empty for rows 1 and 3
    "token-by-token": [(t, t + 1) for t in range(S)],  # masked single tokens, then decode
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_incremental_equals_full_forward(kind, schedule, dtype):
    config, layer = make(kind, dtype)
    x, mask = batch(dtype)
    with torch.no_grad():
        ref = layer(x, attention_mask=mask)
        y = run_chunks(layer, config, x, mask, SCHEDULES[schedule], dtype)
    assert_real_close(y, ref, mask, dtype)
    assert (y[~mask] == 0).all()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_packed_chunks_with_cache(kind):
    config, layer = make(kind, torch.float64)
    x, mask = batch(torch.float64)
    with torch.no_grad():
        ref = layer(x, attention_mask=mask)
        y = run_chunks(layer, config, x, mask, [(0, 3), (3, 6), (6, 8), (8, 9)], torch.float64, packed=True)
    assert_real_close(y, ref, mask, torch.float64)


@pytest.mark.parametrize("kind", ["ccgqa", "cca", "mla"])
def test_reset_row_starts_a_fresh_sequence(kind):
    config, layer = make(kind, torch.float64)
    x, mask = batch(torch.float64)
    new = torch.randn(1, 3, E, dtype=torch.float64)
    with torch.no_grad():
        ref = layer(x, attention_mask=mask)
        cache = AttentionCache.allocate(config, len(LENS), 16, num_layers=1, dtype=torch.float64)
        layer(x[:, :8], attention_mask=mask[:, :8], cache=cache)
        cache.reset(torch.tensor([2]))  # row 2 restarts; its stale conv/value states must be ignored
        feed = torch.cat([x[:, 8:9].expand(-1, 3, -1).clone(), x[:, :0]], 1)
        feed[2] = new[0]
        m = torch.zeros(len(LENS), 3, dtype=torch.bool)
        m[:, 0] = True
        m[2] = True
        y = layer(feed, attention_mask=m, cache=cache)
    torch.testing.assert_close(y[2], layer(new)[0], rtol=0, atol=1e-10)
    for b in (0, 1, 3):
        torch.testing.assert_close(y[b, 0], ref[b, 8], rtol=0, atol=1e-10)
    assert cache.seqlens.tolist() == [9, 4, 3, 3]


def test_decode_step_reads_nothing_back_to_the_host(monkeypatch):
    config, layer = make("ccgqa", torch.float32)
    x, mask = batch(torch.float32)
    cache = AttentionCache.allocate(config, len(LENS), S, num_layers=1)
    with torch.no_grad():
        layer(x[:, :8], attention_mask=mask[:, :8], cache=cache)

        def forbidden(*args, **kwargs):
            raise AssertionError("host read in the decode path")

        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, forbidden)
        layer(x[:, 8:9], cache=cache)
        monkeypatch.undo()
    assert cache.seqlens.tolist() == LENS


def test_bf16_decode_tracks_full_forward():
    config, layer = make("ccgqa", torch.float64)
    x, mask = batch(torch.float64)
    ref = layer(x, attention_mask=mask).detach()
    layer16 = layer.to(torch.bfloat16)
    with torch.no_grad():
        y = run_chunks(layer16, config, x.bfloat16(), mask, SCHEDULES["prefill+decode"], torch.bfloat16).double()
        full16 = layer16(x.bfloat16(), attention_mask=mask).double()
    scale = ref[mask].abs().max()
    assert (y - ref)[mask].abs().max() <= 2e-2 * scale
    assert (y - ref)[mask].abs().max() <= 3 * (full16 - ref)[mask].abs().max() + 1e-3 * scale


def test_cache_bookkeeping_and_errors():
    configs = [AttentionConfig(hidden_size=E, **CONFIGS[k]) for k in ("ccgqa", "mla", "gqa")]
    cache = AttentionCache.allocate(configs, 2, 5, dtype=torch.bfloat16)
    per_row = sum(5 * kv_cache_elements_per_token(c) + state_elements_per_sequence(c) for c in configs)
    assert cache.nbytes() == 2 * per_row * 2 + 3 * 2 * 4  # bf16 tensors + int32 seqlens
    _, cca = make("ccgqa", torch.bfloat16)
    x = torch.randn(2, 4, E, dtype=torch.bfloat16)
    cca(x, cache=cache, layer_idx=0)
    cca(x[:, :1], cache=cache, layer_idx=0)
    with pytest.raises(ValueError, match="the cache holds 5 positions"):
        cca(x[:, :1], cache=cache, layer_idx=0)
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0] and not cache.layers[0].conv_state.any()
    with pytest.raises(ValueError, match="does not fit"):
        cca(x, cache=cache, layer_idx=1)  # an MLA entry
    with pytest.raises(ValueError, match="allocate it in that dtype"):
        cca(x.float(), cache=cache, layer_idx=0)
    with pytest.raises(ValueError, match="holds 1 sequences but the cache has 2 rows"):
        cca(x[0], cache=cache, layer_idx=0)
    with pytest.raises(ValueError, match="layer_idx=7"):
        cca(x, cache=cache, layer_idx=7)
    with pytest.raises(ValueError, match="num_layers"):
        AttentionCache.allocate(configs[0], 2, 5)
