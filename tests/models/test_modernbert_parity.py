"""Padding-free ModernBERT vs HF transformers (fp32, random weights, eager attention): ragged batches, right and left
padding, local (sliding-window) and global layers, RoPE per layer type, GeGLU, optional biases; old and new
``config.json`` layouts; strict weight loading; ``Encoder.embed`` and the CLI with a word-level tokenizer.

The truth is HF run on each sequence alone (no padding), as in ``test_encoder_parity.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.models.parity import (
    embed_cli_vectors,
    fp16_errors,
    hf_alone,
    padded,
    random_sequences,
    save_random_models,
    save_word_tokenizer,
)
from trimformer import Encoder
from trimformer.models.encoders import read_state_dict
from trimformer.models.encoders.modernbert import parse_config
from trimformer.ops.varlen import PackedBatch

VOCAB = 997
LENS = [1, 2, 17, 64, 129, 300]
WORDS = [f"w{i}" for i in range(VOCAB - 4)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _configs():
    from transformers import ModernBertConfig

    special = {"pad_token_id": 0, "bos_token_id": 2, "cls_token_id": 2, "eos_token_id": 3, "sep_token_id": 3}
    return {
        # ModernBERT-base layout: global every 3rd layer, no biases; a 16-token local window (8 each side)
        "base": ModernBertConfig(
            vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_hidden_layers=3, intermediate_size=96,
            max_position_embeddings=512, local_attention=16, **special,
        ),
        # every bias on, global every 2nd layer, a wider window, other RoPE bases and activation
        "biased": ModernBertConfig(
            vocab_size=VOCAB, hidden_size=96, num_attention_heads=3, num_hidden_layers=3, intermediate_size=80,
            max_position_embeddings=400, local_attention=64, global_attn_every_n_layers=2, norm_bias=True,
            attention_bias=True, mlp_bias=True, hidden_activation="gelu_new", global_rope_theta=5000.0,
            local_rope_theta=300.0, **special,
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = lambda n: tmp_path_factory.mktemp(f"modernbert-{n}")  # noqa: E731
    return save_random_models(_configs(), folder, norm_names=("norm.weight",))


def _sequences(seed=0, lens=LENS):
    return random_sequences(VOCAB, lens, seed=seed)


@pytest.fixture(scope="module")
def encoders(saved):
    return {n: Encoder.from_pretrained(folder, device="cpu", dtype=torch.float32) for n, (folder, _) in saved.items()}


@pytest.mark.parametrize("name", ["base", "biased"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_call_matcheshf_alone(saved, encoders, name, side):
    _, hf = saved[name]
    enc = encoders[name]
    assert enc.model_type == "modernbert"
    seqs = _sequences()
    truth = hf_alone(hf, seqs)
    ids, mask = padded(seqs, side)
    out = enc(ids, mask)
    for i, x in enumerate(seqs):
        valid = mask[i].bool()
        err = (out[i][valid] - truth[i]).abs().max().item()
        assert err <= 1e-4, f"{name} {side} seq {i} (len {len(x)}): max abs {err:.2e}"
        assert not out[i][~valid].any()


def test_local_window_really_matters(saved, encoders):
    """Guard: the same weights with every layer global differ from HF on a sequence longer than the window."""
    _, hf = saved["base"]
    seqs = _sequences(seed=1, lens=[100])
    truth = hf_alone(hf, seqs)[0]
    model = encoders["base"].model
    assert [layer.window for layer in model.layers] == [None, 8, 8]
    batch = encoders["base"].pack([seqs[0].tolist()])
    try:
        for layer in model.layers:
            layer.window = None
        with torch.inference_mode():
            out = model.forward_packed(batch)
    finally:
        for layer, kind in zip(model.layers, model.config.layer_types):
            layer.window = 8 if kind == "sliding_attention" else None
    assert (out - truth).abs().max() > 1e-3


@pytest.mark.interpret
def test_triton_kernels_in_the_model_match_hf(saved):
    folder, hf = saved["base"]
    enc = Encoder.from_pretrained(folder, device="cpu", dtype=torch.float32, impl="triton")
    seqs = _sequences(seed=4, lens=[1, 17, 40])
    out = enc.forward_packed(enc.pack([x.tolist() for x in seqs]))
    torch.testing.assert_close(out, torch.cat(hf_alone(hf, seqs)), rtol=0, atol=1e-4)


def test_legacy_config_layout_parses_like_the_new_one(saved):
    folder, _ = saved["biased"]
    new = json.loads((folder / "config.json").read_text())
    legacy = {k: v for k, v in new.items() if k not in ("layer_types", "rope_parameters")}
    legacy.update(global_attn_every_n_layers=2, global_rope_theta=5000.0, local_rope_theta=300.0)
    a, b = parse_config(new), parse_config(legacy)
    assert a == b
    assert a.layer_types == ("full_attention", "sliding_attention", "full_attention")
    assert (a.window, a.global_rope_theta, a.local_rope_theta) == (32, 5000.0, 300.0)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        parse_config({**new, "rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}})
    with pytest.raises(ValueError, match="layer_types must list 3 entries"):
        parse_config({**new, "layer_types": ["full_attention", "chunked_attention", "full_attention"]})


def test_task_head_checkpoint_loads_and_strict_errors(saved, encoders, tmp_path):
    from safetensors.torch import save_file
    from transformers import ModernBertForMaskedLM

    folder, hf = saved["base"]
    mlm = ModernBertForMaskedLM(hf.config).eval()
    mlm.model.load_state_dict(hf.state_dict())
    mlm.save_pretrained(tmp_path / "mlm")
    seqs = _sequences(seed=5, lens=[3, 30])
    ref = encoders["base"].forward_packed(encoders["base"].pack([x.tolist() for x in seqs]))
    enc = Encoder.from_pretrained(tmp_path / "mlm", device="cpu", dtype="fp32")
    torch.testing.assert_close(enc.forward_packed(enc.pack([x.tolist() for x in seqs])), ref, rtol=0, atol=0)

    state = read_state_dict(folder)
    state["layers.2.attn.Wq.weight"] = state.pop("layers.2.attn.Wqkv.weight")
    state["layers.0.mlp.Wi.weight"] = torch.zeros(190, 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        Encoder.from_pretrained(bad, device="cpu")
    msg = str(info.value)
    assert "missing keys (1): layers.2.attn.Wqkv.weight" in msg
    assert "unexpected keys (1): layers.2.attn.Wq.weight" in msg
    assert "shape mismatches (1): layers.0.mlp.Wi.weight: checkpoint (190, 64) vs expected (192, 64)" in msg


def test_token_types_rejected(encoders):
    ids, mask = padded(_sequences(seed=6, lens=[4]), "right")
    with pytest.raises(ValueError, match="no token types"):
        encoders["base"](ids, mask, torch.ones_like(ids))


# ----------------------------------------------------------------------------------------------- engine, CLI


def test_encoder_embed_and_cli(saved, tmp_path):
    folder, hf = saved["base"]
    model_dir = tmp_path / "model"
    shutil.copytree(folder, model_dir)
    tok = save_word_tokenizer(model_dir, WORDS)
    g = torch.Generator().manual_seed(6)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)) for n in (0, 3, 40, 90)]
    enc = Encoder.from_pretrained(model_dir, device="cpu", dtype="fp32")
    vectors = enc.embed(texts, pooling="cls", normalize=True)
    assert vectors.shape == (4, 64)
    for i, text in enumerate(texts):
        ids = torch.tensor(tok(text)["input_ids"])
        with torch.no_grad():
            truth = torch.nn.functional.normalize(hf(input_ids=ids[None]).last_hidden_state[0, 0], dim=0)
        torch.testing.assert_close(vectors[i], truth, rtol=0, atol=1e-5)
    cli = embed_cli_vectors(tmp_path, texts, model_dir, ["--pooling", "cls", "--normalize"])
    np.testing.assert_allclose(cli, vectors.numpy(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["base", "biased"])
def test_gpu_fp16_within_three_times_hf_fp16(saved, name):
    """Ours in fp16 (Triton kernels) vs HF fp32 stays within 3x HF fp16's (sdpa) own error against HF fp32."""
    folder, hf = saved[name]
    err, base_err = fp16_errors(folder, hf, _sequences(seed=8))
    assert err <= 3 * base_err + 1e-3, f"{name}: ours {err:.3e} vs HF fp16 {base_err:.3e}"


def test_set_impl_switches_every_submodule(saved):
    folder, hf = saved["base"]
    model = Encoder.from_pretrained(folder, device="cpu", dtype=torch.float32).model
    model.set_impl("naive")
    impls = {m.impl for m in model.modules() if hasattr(m, "impl")}
    assert impls == {"naive"}
    seqs = _sequences(seed=5, lens=[3, 20])
    with torch.no_grad():
        out = model.forward_packed(PackedBatch.from_token_lists([x.tolist() for x in seqs]))
    torch.testing.assert_close(out, torch.cat(hf_alone(hf, seqs)), rtol=0, atol=1e-4)
