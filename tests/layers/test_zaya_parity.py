"""Parity with HF transformers' ZayaAttention (Zyphra's ZAYA1 CCGQA code): the external oracle (spec test 11)."""

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.models.zaya.configuration_zaya import ZayaConfig
from transformers.models.zaya.modeling_zaya import ZayaAttention, ZayaRotaryEmbedding

from trimformer.layers import AttentionCache, AttentionConfig, CCAttention
from trimformer.layers.zaya_compat import (
    cca_from_zaya,
    config_from_zaya,
    load_zaya_state_dict,
    zaya_config_kwargs,
    zaya_state_dict,
)

E = 48
# (query heads, kv heads, head dim, attention bias): group sizes 1 and 4, and odd groups (3) / odd head counts
CASES = [(4, 4, 16, False), (8, 2, 16, False), (6, 2, 8, False), (3, 1, 16, True), (4, 1, 8, True)]


def zaya(hq, hk, dh, bias, **kw):
    config = ZayaConfig(
        hidden_size=E,
        num_attention_heads=hq,
        num_key_value_heads=hk,
        head_dim=dh,
        num_hidden_layers=1,
        attention_bias=bias,
        vocab_size=32,
        num_experts=2,
        moe_intermediate_size=16,
        router_hidden_size=8,
        eos_token_id=1,
        **kw,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(hq * 10 + hk)
    module = ZayaAttention(config, 0).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)  # includes the conv weights/biases and the (linear) temperature
    return config, module


def hf_forward(module, config, x, mask):
    """HF ZayaAttention on a left-padded batch: positions from the mask, causal + padding 4-D mask, 2-D conv mask."""
    b, s = mask.shape
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cos, sin = ZayaRotaryEmbedding(config)(x, pos, "hybrid")
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & mask[:, None, :].bool()
    causal = torch.zeros(b, 1, s, s).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        return module(x, attention_mask={"causal": causal, "conv": mask}, position_embeddings=(cos, sin))[0]


@pytest.mark.parametrize("hq,hk,dh,bias", CASES, ids=[f"hq{c[0]}-hk{c[1]}-dh{c[2]}-bias{c[3]}" for c in CASES])
def test_matches_hf_zaya_attention(hq, hk, dh, bias):
    config, hf = zaya(hq, hk, dh, bias)
    ours = cca_from_zaya(hf)
    assert ours.config.kind == ("cca" if hq == hk else "ccgqa") and ours.config.rope_fraction == 0.5
    x = torch.randn(3, 7, E)
    lens = [7, 4, 6]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate(lens):
        mask[row, 7 - n :] = 1
    with torch.no_grad():
        y = ours(x, attention_mask=mask)
    for row, n in enumerate(lens):
        # HF zeroes padding *hidden states*; with projection biases their bias rows then enter the conv window, so a
        # padded HF row only equals the unpadded sequence without biases (ZAYA1). Ours always equals the unpadded run.
        ref = hf_forward(hf, config, x[row : row + 1, 7 - n :], torch.ones(1, n, dtype=torch.long))[0]
        torch.testing.assert_close(y[row, 7 - n :], ref, rtol=1e-5, atol=1e-5)
    if not bias:  # HF's own left-padding path
        ref = hf_forward(hf, config, x, mask)
        torch.testing.assert_close(y * mask[..., None], ref * mask[..., None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hk,dh,bias", [CASES[1], CASES[3]])
def test_decode_matches_hf_cache(hq, hk, dh, bias):
    """HF's own cached decode (conv state + delayed value state) against ours, prefill 4 then 3 single steps."""
    config, hf = zaya(hq, hk, dh, bias)
    ours = cca_from_zaya(hf)
    x = torch.randn(2, 7, E)
    rope = ZayaRotaryEmbedding(config)
    hf_cache = DynamicCache(config=config)
    cache = AttentionCache.allocate(ours.config, 2, 8, num_layers=1)
    n = 4
    with torch.no_grad():
        cos, sin = rope(x, torch.arange(n)[None].expand(2, n), "hybrid")
        causal = torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e30)
        ref = [hf(x[:, :n], attention_mask={"causal": causal}, position_embeddings=(cos, sin), cache=hf_cache)[0]]
        out = [ours(x[:, :n], cache=cache)]
        for t in range(n, 7):
            cos, sin = rope(x, torch.full((2, 1), t), "hybrid")
            ref.append(
                hf(x[:, t : t + 1], attention_mask={"causal": None}, position_embeddings=(cos, sin), cache=hf_cache)[0]
            )
            out.append(ours(x[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(out, 1), torch.cat(ref, 1), rtol=1e-5, atol=1e-5)


def test_weights_round_trip_both_ways():
    config, hf = zaya(8, 2, 16, True)
    ours = cca_from_zaya(hf.state_dict(prefix="model.layers.0.self_attn."), config, prefix="model.layers.0.self_attn.")
    exported = zaya_state_dict(ours)
    assert exported.keys() == hf.state_dict().keys()
    for key, value in hf.state_dict().items():
        assert torch.equal(exported[key], value), key
    # export into a fresh HF module: both compute the same function
    fresh_config, fresh = zaya(8, 2, 16, True)
    fresh.load_state_dict(exported)
    x = torch.randn(1, 5, E)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x), hf_forward(fresh, fresh_config, x, torch.ones(1, 5, dtype=torch.long)), rtol=1e-5, atol=1e-5
        )


def test_config_mapping():
    zaya1 = ZayaConfig()  # the ZAYA1-8B defaults
    cfg = config_from_zaya(zaya1)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2048, 8, 2, 128)
    assert (cfg.conv_kernel_seq, cfg.conv_kernel_ch, cfg.temperature_mode, cfg.bias) == (2, 2, "linear", False)
    assert (cfg.rope_theta, cfg.rope_fraction) == (5e6, 0.5)
    assert sum(p.numel() for p in CCAttention(cfg, device="meta").parameters()) == 5_575_682
    rebuilt = config_from_zaya(ZayaConfig(**zaya_config_kwargs(cfg)))
    assert rebuilt == cfg


def test_incompatible_inputs_raise():
    config, hf = zaya(4, 2, 8, False)
    ours = cca_from_zaya(hf)
    with pytest.raises(ValueError, match="lacks"):
        load_zaya_state_dict(ours, {k: v for k, v in hf.state_dict().items() if "temp" not in k})
    with pytest.raises(ValueError, match="shape"):
        load_zaya_state_dict(ours, {**hf.state_dict(), "qk_norm.temp": torch.zeros(3)})
    exp = CCAttention(AttentionConfig(hidden_size=E, num_heads=4, num_kv_heads=2, head_dim=8, temperature_mode="exp"))
    with pytest.raises(ValueError, match="ZAYA attention needs"):
        zaya_state_dict(exp)
    with pytest.raises(ValueError, match="zaya_config is required"):
        cca_from_zaya(hf.state_dict())
    sliding = ZayaConfig(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=8)
    with pytest.raises(ValueError, match="only full-attention"):
        config_from_zaya(sliding, 1)
