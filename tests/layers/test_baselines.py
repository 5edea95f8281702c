"""Baselines (MHA, GQA, MLA) against HF transformers' LlamaAttention and DeepseekV3Attention (external oracles), plus
packing and the MLA absorbed (cache) form against its expanded form."""

import pytest
import torch
from transformers import DeepseekV3Config, LlamaConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from trimformer.layers import AttentionCache, AttentionConfig, GroupedQueryAttention, build_attention
from trimformer.layers.accounting import attention_params

E = 48


def hf_mask(mask: torch.Tensor) -> torch.Tensor:
    """Additive ``[B, 1, S, S]`` causal + key-padding mask for HF eager attention."""
    s = mask.shape[1]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & mask[:, None, :].bool()
    return torch.zeros(mask.shape[0], 1, s, s).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


def left_padded(lens, s):
    mask = torch.zeros(len(lens), s, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, s - n :] = 1
    return mask


def randomize(module, std=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


@pytest.mark.parametrize("hq,hk,bias", [(4, 4, False), (6, 2, True), (4, 1, False)])
def test_mha_gqa_match_hf_llama_attention(hq, hk, bias):
    d = 8
    hf_cfg = LlamaConfig(
        hidden_size=E,
        num_attention_heads=hq,
        num_key_value_heads=hk,
        head_dim=d,
        attention_bias=bias,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    hf_cfg._attn_implementation = "eager"
    hf = LlamaAttention(hf_cfg, 0).eval()
    randomize(hf)
    cfg = AttentionConfig(
        kind="mha" if hq == hk else "gqa",
        hidden_size=E,
        num_heads=hq,
        num_kv_heads=hk,
        head_dim=d,
        bias=bias,
        rope_theta=500.0,
        rope_fraction=1.0,
    )
    ours = GroupedQueryAttention(cfg)
    ours.load_state_dict(hf.state_dict())  # same parameter names
    assert sum(p.numel() for p in ours.parameters()) == attention_params(cfg)
    mask = left_padded([7, 3, 5], 7)
    x = torch.randn(3, 7, E)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cos, sin = LlamaRotaryEmbedding(hf_cfg)(x, pos)
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=(cos, sin), attention_mask=hf_mask(mask))
        out = ours(x, attention_mask=mask)
    torch.testing.assert_close(out * mask[..., None], ref * mask[..., None], rtol=1e-5, atol=1e-5)
    assert (out[mask == 0] == 0).all()


@pytest.mark.parametrize("q_lora_rank,bias", [(0, False), (12, True)])
def test_mla_matches_hf_deepseek_v3_attention(q_lora_rank, bias):
    h, d, dr, r = 4, 8, 4, 16
    hf_cfg = DeepseekV3Config(
        hidden_size=E,
        num_attention_heads=h,
        num_key_value_heads=h,
        q_lora_rank=q_lora_rank or None,
        kv_lora_rank=r,
        qk_rope_head_dim=dr,
        qk_nope_head_dim=d,
        v_head_dim=d,
        rope_interleave=False,
        attention_bias=bias,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV3Attention(hf_cfg, 0).eval()
    randomize(hf)
    cfg = AttentionConfig(
        kind="mla",
        hidden_size=E,
        num_heads=h,
        head_dim=d,
        kv_lora_rank=r,
        q_lora_rank=q_lora_rank,
        rope_head_dim=dr,
        bias=bias,
        rope_theta=500.0,
    )
    ours = build_attention(cfg)
    rename = {"kv_a_proj_with_mqa": "kv_a_proj", "q_a_layernorm": "q_a_norm", "kv_a_layernorm": "kv_a_norm"}
    sd = {}
    for key, value in hf.state_dict().items():
        mod, rest = key.split(".", 1)
        sd[f"{rename.get(mod, mod)}.{rest}"] = value
    ours.load_state_dict(sd)
    assert sum(p.numel() for p in ours.parameters()) == attention_params(cfg)
    mask = left_padded([6, 2, 4], 6)
    x = torch.randn(3, 6, E)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, pos)
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=(cos, sin), attention_mask=hf_mask(mask))
        out = ours(x, attention_mask=mask)
        cache = AttentionCache.allocate(cfg, 3, 8, num_layers=1)
        absorbed = ours(x, attention_mask=mask, cache=cache)  # absorbed form over the latent cache
    torch.testing.assert_close(out * mask[..., None], ref * mask[..., None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(absorbed * mask[..., None], ref * mask[..., None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mha", "gqa", "mla"])
def test_packed_documents_equal_separate_runs(kind):
    hk = {"mha": 4, "gqa": 2, "mla": 4}[kind]
    cfg = AttentionConfig(
        kind=kind,
        hidden_size=E,
        num_heads=4,
        num_kv_heads=hk,
        head_dim=8,
        kv_lora_rank=16,
        rope_head_dim=4,
        rope_fraction=0.5,
    )
    layer = build_attention(cfg).double()
    randomize(layer)
    lens = [5, 1, 8, 3]
    x = torch.randn(sum(lens), E, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    y = layer(x, cu_seqlens=cu, max_seqlen=max(lens))
    for i in range(len(lens)):
        s, e = cu[i].item(), cu[i + 1].item()
        torch.testing.assert_close(y[s:e], layer(x[None, s:e])[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["mha", "gqa", "cca", "ccgqa"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_projections_equal_separate_ones(kind, bias):
    """From ``fused_projection_min_rows`` rows on, the input projections run as one GEMM over concatenated weights:
    same output, same gradient for the input and every parameter, and the separate ``nn.Linear`` calls are skipped."""
    hk = 2 if kind in ("gqa", "ccgqa") else 4
    cfg = AttentionConfig(kind=kind, hidden_size=E, num_heads=4, num_kv_heads=hk, head_dim=8, bias=bias)
    layer = build_attention(cfg, impl="torch").double()
    randomize(layer)
    separate_calls = []
    layer.k_proj.register_forward_hook(lambda *a: separate_calls.append(1))
    x = torch.randn(2, 7, E, dtype=torch.float64)
    dy = torch.randn(2, 7, E, dtype=torch.float64)
    results = []
    for min_rows in (10**9, 14):  # 14 = B * S: the fused path from exactly the threshold
        layer.fused_projection_min_rows = min_rows
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        layer(xi).backward(dy)
        results.append([xi.grad, *(p.grad for p in layer.parameters())])
    assert len(separate_calls) == 1
    assert len(results[0]) == len(results[1]) == 1 + len(list(layer.parameters()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    layer.fused_projection_min_rows = 14
    with torch.no_grad():
        y_fused = layer(x)
        layer.fused_projection_min_rows = 15
        torch.testing.assert_close(y_fused, layer(x), rtol=1e-12, atol=1e-12)
    assert len(separate_calls) == 2


def test_gqa_causality_bit_exact():
    cfg = AttentionConfig(kind="gqa", hidden_size=E, num_heads=6, num_kv_heads=3, head_dim=8)
    layer = build_attention(cfg).double()
    randomize(layer)
    x = torch.randn(2, 9, E, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 4, E, dtype=torch.float64)
    y2 = layer(x2)
    assert torch.equal(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="mha needs num_kv_heads == num_heads"):
        AttentionConfig(kind="mha", num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttentionConfig(kind="gqa", num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        AttentionConfig(kind="mla")
    with pytest.raises(ValueError, match="GroupedQueryAttention needs kind"):
        GroupedQueryAttention(AttentionConfig(kind="cca", num_heads=2, num_kv_heads=2, head_dim=8, hidden_size=16))
