"""``trimformer bench quality``: method configs (KV compression, parameter matching), and a tiny sweep split over two
calls whose CSV rows merge into one table with the comparison against the paper."""

import pytest

from trimformer.bench.common import read_rows
from trimformer.bench.quality import METHOD_ORDER, method_attention
from trimformer.cli import main as cli_main
from trimformer.layers import AttentionConfig
from trimformer.layers.accounting import kv_cache_elements_per_token
from trimformer.models.lm import TrimformerConfig, model_params, param_matched_config


def test_methods_compress_the_kv_cache_as_in_the_paper():
    mha = kv_cache_elements_per_token(AttentionConfig(hidden_size=512, **method_attention("mha", 512)))
    ratios = {m: mha / kv_cache_elements_per_token(AttentionConfig(hidden_size=512, **method_attention(m, 512)))
              for m in METHOD_ORDER}  # fmt: skip
    assert ratios == {"mha": 1, "gqa-4": 4, "mla": 4, "cca-4x": 4, "ccgqa-2x8x": 8, "cca-4x-0conv": 4,
                      "cca-4x-1conv": 4, "cca-4x-2conv": 4, "cca-4x-2conv-vshift": 4}  # fmt: skip
    ladder = [AttentionConfig(hidden_size=512, **method_attention(m, 512)) for m in METHOD_ORDER[5:]]
    assert [(c.num_convs, c.value_shift, c.qk_mean) for c in ladder] == [
        (0, False, False), (1, False, False), (2, False, False), (2, True, False)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown method"):
        method_attention("gqa-8", 512)


def test_base_config_models_are_parameter_matched():
    base = dict(vocab_size=320, hidden_size=512, num_hidden_layers=8, intermediate_size=1408)
    target = model_params(TrimformerConfig(**base, attention=method_attention("mha", 512)))
    assert 20e6 <= target <= 50e6
    for m in METHOD_ORDER:
        cfg = param_matched_config(TrimformerConfig(**base, attention=method_attention(m, 512)), target)
        assert abs(model_params(cfg) - target) / target < 0.005, m


def test_tiny_sweep_in_two_calls_merges(small_corpus, tmp_path):
    common = ["bench", "quality", "--out", str(tmp_path / "res"), "--runs-dir", str(tmp_path / "runs"),
              "--max-steps", "3", "--set", "model.hidden_size=64", "--set", "model.num_hidden_layers=1",
              "--set", "data.seq_len=32", "--set", "train.micro_batch_size=2", "--set", "train.eval_tokens=512",
              "--set", f"data.corpus={small_corpus}", "--set", "data.val_fraction=0.15", "--set",
              "train.progress=false", "--set", "train.warmup_steps=1"]  # fmt: skip
    assert cli_main([*common, "--methods", "mha,ccgqa-2x8x", "--seeds", "0,1"]) == 0
    assert cli_main([*common, "--methods", "gqa-4", "--seeds", "0,1"]) == 0
    rows = read_rows(tmp_path / "res" / "quality.csv")
    val = [r for r in rows if r["metric"] == "val_loss"]
    assert sorted((r["case"], r["params"]["seed"]) for r in val) == [
        ("ccgqa-2x8x", 0), ("ccgqa-2x8x", 1), ("gqa-4", 0), ("gqa-4", 1), ("mha", 0), ("mha", 1)
    ]  # fmt: skip
    assert len({r["params"]["signature"] for r in rows}) == 1
    assert all(r["params"]["tokens"] == 3 * 2 * 32 and len(r["params"]["curve"]) == 1 for r in val)
    md = (tmp_path / "res" / "quality.md").read_text()
    for method in ("| mha |", "| gqa-4 |", "| ccgqa-2x8x |"):
        assert method in md
    assert "CCGQA-2x/8x beats GQA-4 with half its KV cache" in md and "Kendall tau" in md
    assert (tmp_path / "res" / "quality.png").stat().st_size > 1000
    assert cli_main([*common, "--methods", "mha,nope"]) == 2
