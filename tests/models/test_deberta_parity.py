"""Padding-free DeBERTa-v2/v3 vs HF transformers (fp32, random weights): ragged batches, right and left padding,
log buckets, shared keys, separate position projections, absolute positions, token types, ``embed_proj`` and the
first-layer convolution; strict weight loading; ``Encoder.embed`` and the CLI with a small word-level tokenizer.

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

VOCAB = 997
LENS = [1, 2, 17, 64, 129, 300]
WORDS = [f"w{i}" for i in range(VOCAB - 4)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _configs():
    from transformers import DebertaV2Config

    common = {"vocab_size": VOCAB, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "num_hidden_layers": 2, "intermediate_size": 150}  # fmt: skip
    return {
        # v3-style: log buckets (reached by the long sequences), shared keys, LayerNorm-ed rel embeddings, no
        # absolute positions, no token types
        "v3": DebertaV2Config(
            hidden_size=64, num_attention_heads=2, max_position_embeddings=512, relative_attention=True,
            position_buckets=32, max_relative_positions=64, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
            share_att_key=True, position_biased_input=False, type_vocab_size=0, **common,
        ),
        # v2-style: plain distances clamped to the span, own position projections, absolute positions, token types,
        # a factorised embedding (embed_proj) and the first-layer convolution
        "v2": DebertaV2Config(
            hidden_size=96, num_attention_heads=3, max_position_embeddings=320, relative_attention=True,
            max_relative_positions=100, pos_att_type="c2p|p2c", position_biased_input=True, type_vocab_size=2,
            conv_kernel_size=3, conv_groups=2, conv_act="gelu", embedding_size=48, **common,
        ),
        # one term only; buckets without shared keys
        "c2p": DebertaV2Config(
            hidden_size=64, num_attention_heads=2, max_position_embeddings=512, relative_attention=True,
            position_buckets=16, max_relative_positions=40, pos_att_type=["c2p"], position_biased_input=False,
            **common,
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = lambda n: tmp_path_factory.mktemp(f"deberta-{n}")  # noqa: E731
    return save_random_models(_configs(), folder, norm_names=("LayerNorm.weight",))


def _sequences(seed=0, lens=LENS):
    return random_sequences(VOCAB, lens, seed=seed)


@pytest.fixture(scope="module")
def encoders(saved):
    return {n: Encoder.from_pretrained(folder, device="cpu", dtype=torch.float32) for n, (folder, _) in saved.items()}


@pytest.mark.parametrize("name", ["v3", "v2", "c2p"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_call_matcheshf_alone(saved, encoders, name, side):
    _, hf = saved[name]
    enc = encoders[name]
    assert enc.model_type == "deberta-v2"
    seqs = _sequences()
    types = None
    if enc.config.type_vocab_size > 1:
        g = torch.Generator().manual_seed(3)
        types = [torch.randint(0, 2, (len(x),), generator=g) for x in seqs]
    truth = hf_alone(hf, seqs, types)
    ids, mask = padded(seqs, side)
    out = enc(ids, mask, None if types is None else padded(types, side)[0])
    for i, x in enumerate(seqs):
        valid = mask[i].bool()
        err = (out[i][valid] - truth[i]).abs().max().item()
        assert err <= 1e-4, f"{name} {side} seq {i} (len {len(x)}): max abs {err:.2e}"
        assert not out[i][~valid].any()


def test_buckets_and_conv_really_matter(saved, encoders):
    """Guards for the test above: log buckets (vs distances clamped at the same span) and the conv branch change
    the output."""
    _, hf = saved["v3"]
    seqs = _sequences(seed=1, lens=[200])
    truth = hf_alone(hf, seqs)[0]
    enc = encoders["v3"]
    unbucketed = type(enc.model)(
        enc.config.__class__(**{**enc.config.__dict__, "position_buckets": -1, "max_relative_positions": 32})
    )
    unbucketed.load_state_dict(enc.model.state_dict())
    out = unbucketed.forward_packed(enc.pack([seqs[0].tolist()]))
    assert (out - truth).abs().max() > 1e-3
    conv_model = encoders["v2"].model
    batch = encoders["v2"].pack([x.tolist() for x in _sequences(seed=2, lens=[5, 9])])
    with torch.inference_mode():
        with_conv = conv_model.forward_packed(batch)
        conv, conv_model.conv = conv_model.conv, None
        try:
            without = conv_model.forward_packed(batch)
        finally:
            conv_model.conv = conv
    assert (with_conv - without).abs().max() > 1e-2


@pytest.mark.interpret
def test_triton_kernel_in_the_model_matches_hf(saved):
    folder, hf = saved["v3"]
    enc = Encoder.from_pretrained(folder, device="cpu", dtype=torch.float32, impl="triton")
    seqs = _sequences(seed=4, lens=[1, 17, 40])
    out = enc.forward_packed(enc.pack([x.tolist() for x in seqs]))
    torch.testing.assert_close(out, torch.cat(hf_alone(hf, seqs)), rtol=0, atol=1e-4)


def test_task_head_checkpoint_loads_and_strict_errors(saved, encoders, tmp_path):
    from safetensors.torch import save_file
    from transformers import DebertaV2ForSequenceClassification

    folder, hf = saved["v3"]
    clf = DebertaV2ForSequenceClassification(hf.config).eval()
    clf.deberta.load_state_dict(hf.state_dict())
    clf.save_pretrained(tmp_path / "clf")
    seqs = _sequences(seed=5, lens=[3, 30])
    ref = encoders["v3"].forward_packed(encoders["v3"].pack([x.tolist() for x in seqs]))
    enc = Encoder.from_pretrained(tmp_path / "clf", device="cpu", dtype="fp32")
    torch.testing.assert_close(enc.forward_packed(enc.pack([x.tolist() for x in seqs])), ref, rtol=0, atol=0)

    state = read_state_dict(folder)
    state["encoder.layer.1.attention.self.kee_proj.weight"] = state.pop(
        "encoder.layer.1.attention.self.key_proj.weight"
    )
    state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(149, 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        Encoder.from_pretrained(bad, device="cpu")
    msg = str(info.value)
    assert "missing keys (1): encoder.layer.1.attention.self.key_proj.weight" in msg
    assert "unexpected keys (1): encoder.layer.1.attention.self.kee_proj.weight" in msg
    assert "shape mismatches (1): encoder.layer.0.intermediate.dense.weight: checkpoint (149, 64)" in msg


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"pos_att_type": ["c2p", "p2p"]}, r"pos_att_type \['p2p'\] is not supported"),
        ({"conv_kernel_size": 4}, "conv_kernel_size must be odd"),
        ({"attention_head_size": 16}, "attention_head_size 16 x 2 heads != hidden_size 64"),
        ({"position_buckets": 64, "max_relative_positions": 20}, "position_buckets 64 needs max_relative_positions"),
        ({"hidden_act": "mish"}, "unsupported activation 'mish'"),
    ],
)
def test_bad_configs_raise(saved, tmp_path, patch, match):
    folder, _ = saved["v3"]
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **patch}))
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        Encoder.from_pretrained(tmp_path, device="cpu")


def test_too_long_sequence_raises(encoders):
    enc = encoders["v2"]
    with pytest.raises(ValueError, match="at most 320"):
        enc.forward_packed(enc.pack([[5] * 321]))


def test_relative_only_model_runs_past_max_position_embeddings(saved, encoders):
    """No absolute positions (v3 style): like HF, a sequence longer than ``max_position_embeddings`` runs (and
    matches HF alone); the tokenizer-facing ``Encoder.max_length`` stays at the trained length."""
    _, hf = saved["c2p"]
    enc = encoders["c2p"]
    assert enc.max_length == 512
    seqs = _sequences(seed=3, lens=[7, 530])
    with torch.no_grad():
        ours = enc.model.forward_packed(enc.pack([x.tolist() for x in seqs]))
    torch.testing.assert_close(ours, torch.cat(hf_alone(hf, seqs)), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- engine, CLI


def test_encoder_embed_and_cli(saved, tmp_path):
    folder, hf = saved["v3"]
    model_dir = tmp_path / "model"
    shutil.copytree(folder, model_dir)
    tok = save_word_tokenizer(model_dir, WORDS)
    g = torch.Generator().manual_seed(6)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)) for n in (0, 3, 40, 90)]
    enc = Encoder.from_pretrained(model_dir, device="cpu", dtype="fp32")
    vectors = enc.embed(texts, pooling="mean", normalize=False)
    assert vectors.shape == (4, 64)
    for i, text in enumerate(texts):
        ids = torch.tensor(tok(text)["input_ids"])
        with torch.no_grad():
            truth = hf(input_ids=ids[None]).last_hidden_state[0].mean(0)
        torch.testing.assert_close(vectors[i], truth, rtol=0, atol=1e-4)
    cli = embed_cli_vectors(tmp_path, texts, model_dir, ["--pooling", "mean", "--no-normalize"])
    np.testing.assert_allclose(cli, vectors.numpy(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["v3", "v2"])
def test_gpu_fp16_within_three_times_hf_fp16(saved, name):
    """Ours in fp16 (Triton kernel) vs HF fp32 stays within 3x HF fp16's own error against HF fp32."""
    folder, hf = saved[name]
    err, base_err = fp16_errors(folder, hf, _sequences(seed=8))
    assert err <= 3 * base_err + 1e-3, f"{name}: ours {err:.3e} vs HF fp16 {base_err:.3e}"
