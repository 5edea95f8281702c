"""Accounting against the spec's numbers (section 3, acceptance tests 1, 2, 12), the modules' parameter counts and
PyTorch's FlopCounterMode run on the reference layers."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trimformer.layers import AttentionCache, AttentionConfig, build_attention
from trimformer.layers.accounting import (
    attention_cost,
    attention_params,
    decode_flops,
    dtype_bytes,
    forward_flops,
    kv_cache_bytes_per_token,
    kv_cache_elements_per_token,
    paper_configs,
    paper_forward_flops,
    state_elements_per_sequence,
)


def test_zaya1_numbers():
    """Spec tests 1-2: 5,575,682 parameters, 1024 B of bf16 cache per token per layer (1/8 of MHA), 2688 state."""
    zaya1 = AttentionConfig(kind="ccgqa", hidden_size=2048, num_heads=8, num_kv_heads=2, head_dim=128)
    assert attention_params(zaya1) == 5_575_682
    assert kv_cache_bytes_per_token(zaya1, "bf16") == 1024
    mha = paper_configs()["MHA"]
    assert kv_cache_bytes_per_token(mha, "bf16") == 8 * 1024
    assert state_elements_per_sequence(zaya1) == 2560 + 128


def test_paper_configs_match_spec_totals():
    cfgs = paper_configs()
    params = {name: attention_params(c) for name, c in cfgs.items()}
    assert params["MHA"] == 16_777_216 and params["GQA-4"] == 10_485_760
    c = 1024  # CCA-4x: 4 + 4 heads of 128
    assert params["CCA-4x"] == 4 * 2048 * 512 + c * 3 + c * (128 * 2 + 1) + 4
    assert params["CCGQA-2x/8x"] == 5_575_682
    kv = {name: kv_cache_elements_per_token(c) * 16384 for name, c in cfgs.items()}  # worked example, S = 16k
    assert kv["MHA"] == 67_108_864 and kv["GQA-4"] == kv["CCA-4x"] == 16_777_216 and kv["CCGQA-2x/8x"] == 8_388_608


@pytest.mark.parametrize(
    "config",
    [
        dict(kind="mha", num_heads=4, num_kv_heads=4, head_dim=8, bias=True),
        dict(kind="gqa", num_heads=6, num_kv_heads=2, head_dim=8),
        dict(kind="mla", num_heads=4, head_dim=8, kv_lora_rank=16, q_lora_rank=12, rope_head_dim=4, bias=True),
        dict(kind="mla", num_heads=4, head_dim=8, kv_lora_rank=16, rope_head_dim=6),
        dict(kind="cca", num_heads=2, num_kv_heads=2, head_dim=8, bias=True, conv_kernel_seq=3),
        dict(kind="ccgqa", num_heads=4, num_kv_heads=2, head_dim=8, num_convs=1, conv_bias=False),
        dict(kind="ccgqa", num_heads=3, num_kv_heads=1, head_dim=8, num_convs=0),
    ],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k in ("kind", "bias", "num_convs", "q_lora_rank")),
)
def test_params_equal_module_count(config):
    cfg = AttentionConfig(hidden_size=32, **config)
    assert attention_params(cfg) == sum(p.numel() for p in build_attention(cfg, device="meta").parameters())


TABLE = {  # cca-spec.md section 3, forward-FLOP ratio MHA / method at E = 2048 for S = 512, 2048, 16384
    "GQA-4": (1.50, 1.33, 1.08),
    "GQA-8": (1.64, 1.41, 1.10),
    "MLA-2x/2x": (1.12, 1.09, 1.03),
    "MLA-2x/4x": (1.38, 1.26, 1.07),
    "CCA-4x": (4.00, 4.00, 4.00),
    "CCGQA-2x/8x": (3.00, 2.67, 2.16),
    "CCA-8x": (8.00, 8.00, 8.00),
}


def test_table_ii_forward_flop_ratios():
    """Spec test 12: the Table II formulas give the quoted ratios (4.00 for CCA-4x, 2.16 for CCGQA-2x/8x at 16k)."""
    cfgs = {**paper_configs(), **paper_configs(gqa_groups=8), **paper_configs(mla_kv_compression=4)}
    cfgs["CCA-8x"] = paper_configs(cca_compression=8)["CCA-8x"]
    mha = cfgs["MHA"]
    for name, ratios in TABLE.items():
        got = tuple(
            round(paper_forward_flops(mha, s) / paper_forward_flops(cfgs[name], s), 2) for s in (512, 2048, 16384)
        )
        assert got == ratios, name


def test_exact_flops_against_closed_forms():
    e, b, s = 2048, 2, 4096
    cfgs = paper_configs()
    for name in ("MHA", "GQA-4"):
        g = 16 // cfgs[name].num_kv_heads
        assert forward_flops(cfgs[name], s, b) == paper_forward_flops(cfgs[name], s, b)
        assert decode_flops(cfgs[name], s, b) == (1 + 1 / g) * 4 * b * e * e + 4 * b * e * s  # Table II decode
    for name, (c1, c2) in (("CCA-4x", (4, 4)), ("CCGQA-2x/8x", (2, 8))):
        cfg = cfgs[name]
        ch = cfg.conv_channels
        conv = ch * 2 + ch * 128 * 2  # exact conv multiply-adds per token
        assert forward_flops(cfg, s, b) == paper_forward_flops(cfg, s, b) + 2 * b * s * conv
        assert decode_flops(cfg, s, b) == (1 / c1 + 1 / c2) * 4 * b * e * e + 4 * b * e * s / c1 + 2 * b * conv


@pytest.mark.parametrize("name", ["MHA", "GQA-4", "MLA-2x/2x", "CCA-4x", "CCGQA-2x/8x"])
def test_flops_match_pytorch_flop_counter(name):
    """FlopCounterMode on the reference layers (einsum attention, F.conv1d) over one sequence and one decode step.

    Two documented differences: the MLA reference pads v with zeros to the q/k head dim (2 S^2 H d_rope extra in the
    forward, 2 S H d_rope in absorbed decode), and the padded-window conv reference evaluates conv1 on k_ch - 1 extra
    boundary rows per sequence (2 (k_ch - 1) C k_seq)."""
    cfg = paper_configs(256, 8)[name]
    layer = build_attention(cfg, impl="naive")
    s = 48
    x = torch.randn(1, s, 256)
    cache = AttentionCache.allocate(cfg, 1, s, num_layers=1)
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        layer(x)
    with torch.no_grad():
        layer(x[:, :-1], cache=cache)
        with FlopCounterMode(display=False) as dec:
            layer(x[:, -1:], cache=cache)
    extra_fwd = extra_dec = 0
    if cfg.kind == "mla":
        extra_fwd = 2 * s * s * cfg.num_heads * cfg.rope_head_dim
        extra_dec = 2 * s * cfg.num_heads * cfg.rope_head_dim
    if cfg.kind in ("cca", "ccgqa"):
        extra_fwd = extra_dec = 2 * (cfg.conv_kernel_ch - 1) * cfg.conv_channels * cfg.conv_kernel_seq
    assert fwd.get_total_flops() == forward_flops(cfg, s) + extra_fwd
    assert dec.get_total_flops() == decode_flops(cfg, s) + extra_dec


def test_cost_bundle_and_errors():
    cost = attention_cost(paper_configs()["CCGQA-2x/8x"], 16384, dtype="fp32", name="zaya1")
    assert (cost.name, cost.params, cost.kv_bytes_per_token, cost.state_bytes_per_sequence) == (
        "zaya1",
        5_575_682,
        2048,
        2688 * 4,
    )
    assert dtype_bytes("fp8") == 1
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_bytes("int3")
    with pytest.raises(ValueError, match="C2 >= C1"):
        paper_configs(ccgqa=(8, 2))
    with pytest.raises(ValueError, match="not divisible"):
        paper_configs(heads=12, cca_compression=5, head_dim=128)
