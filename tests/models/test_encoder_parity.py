"""Padding-free encoders vs HF transformers (fp32, random weights), weight loading and its strict checks.

The truth for every family is HF run on each sequence alone, unpadded: with left padding HF's own batched output
shifts absolute positions, ours must not.
"""

import json
import shutil

import pytest
import torch

from tests.models.parity import hf_alone, padded, save_random_models
from trimformer import Encoder
from trimformer.models.encoders import SUPPORTED_MODEL_TYPES, read_config, read_state_dict, to_hf_state_dict
from trimformer.ops.varlen import PackedBatch

LENS = [1, 2, 17, 64, 129]
VOCAB = 997


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: CI runs pytest-xdist workers on 2 cores, and two OpenMP threads per worker then stall on
    every barrier (measured 10-20x slower for these small forwards). Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _configs():
    import transformers as T

    common = {"vocab_size": VOCAB, "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0}
    return {
        "bert": T.BertConfig(
            hidden_size=96, num_attention_heads=2, num_hidden_layers=2, intermediate_size=200,
            max_position_embeddings=131, **common,
        ),
        "roberta": T.RobertaConfig(
            hidden_size=64, num_attention_heads=2, num_hidden_layers=3, intermediate_size=150,
            max_position_embeddings=133, type_vocab_size=1, pad_token_id=1, **common,
        ),
        "xlm-roberta": T.XLMRobertaConfig(
            hidden_size=96, num_attention_heads=2, num_hidden_layers=2, intermediate_size=130,
            max_position_embeddings=133, type_vocab_size=2, pad_token_id=1, **common,
        ),
        "distilbert": T.DistilBertConfig(
            vocab_size=VOCAB, dim=64, n_heads=2, n_layers=3, hidden_dim=150, max_position_embeddings=131,
            sinusoidal_pos_embds=True, dropout=0.0, attention_dropout=0.0,
        ),
        "albert": T.AlbertConfig(
            embedding_size=40, hidden_size=96, num_attention_heads=2, num_hidden_layers=3, num_hidden_groups=2,
            inner_group_num=2, intermediate_size=150, max_position_embeddings=131, hidden_act="gelu_new", **common,
        ),
    }  # fmt: skip


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """``{model_type: (folder, hf_model)}``: random-weight HF models saved with save_pretrained (safetensors)."""
    norms = ("LayerNorm.weight", "layer_norm.weight")
    return save_random_models(_configs(), tmp_path_factory.mktemp, norm_names=norms)


@pytest.fixture(scope="session")
def encoders(saved):
    return {t: Encoder.from_pretrained(folder, device="cpu", dtype=torch.float32) for t, (folder, _) in saved.items()}


def _sequences(model_type, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = 1 if model_type in ("roberta", "xlm-roberta") else 0
    seqs = []
    for n in LENS:
        ids = torch.randint(2, VOCAB, (n,), generator=g)
        ids[ids == pad] = pad + 1  # real tokenizers never emit the pad id inside a text
        seqs.append(ids)
    return seqs


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_call_matcheshf_alone(saved, encoders, model_type, side):
    _, hf = saved[model_type]
    enc = encoders[model_type]
    seqs = _sequences(model_type)
    use_types = enc.config.type_vocab_size > 1
    g = torch.Generator().manual_seed(3)
    types = [torch.randint(0, 2, (len(x),), generator=g) for x in seqs] if use_types else None
    truth = hf_alone(hf, seqs, types)
    ids, mask = padded(seqs, side, fill=0)
    type_pad = padded(types, side, fill=0)[0] if use_types else None
    out = enc(ids, mask, type_pad)
    assert out.shape == (len(seqs), ids.shape[1], enc.hidden_size)
    for i in range(len(seqs)):
        valid = mask[i].bool()
        err = (out[i][valid] - truth[i]).abs().max().item()
        assert err <= 1e-4, f"{model_type} {side} seq {i} (len {len(seqs[i])}): max abs {err:.2e}"
        assert out[i][~valid].abs().max().item() == 0 if (~valid).any() else True


def test_left_padding_really_shifts_hf_positions(saved):
    """Guard for the test above: HF's own left-padded batch differs from the unpadded truth."""
    _, hf = saved["bert"]
    seqs = _sequences("bert")[:3]
    ids, mask = padded(seqs, "left", fill=0)
    with torch.no_grad():
        batched = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    truth = hf_alone(hf, seqs)
    assert (batched[2][mask[2].bool()] - truth[2]).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_packed_forward_equals_padded_call(encoders, model_type):
    enc = encoders[model_type]
    seqs = _sequences(model_type, seed=5)
    batch = enc.pack([x.tolist() for x in seqs])
    packed = enc.forward_packed(batch)
    ids, mask = padded(seqs, "right", fill=0)
    out = enc(ids, mask)
    torch.testing.assert_close(packed, out[mask.bool()], rtol=0, atol=1e-5)


def test_bert_without_token_types_uses_segment_zero(saved, encoders):
    _, hf = saved["bert"]
    seqs = _sequences("bert", seed=9)
    truth = hf_alone(hf, seqs)
    out = encoders["bert"].forward_packed(encoders["bert"].pack([x.tolist() for x in seqs]))
    torch.testing.assert_close(out, torch.cat(truth), rtol=0, atol=1e-4)


def test_pytorch_model_bin_and_task_head_checkpoints_load(saved, tmp_path, encoders):
    from transformers import BertForMaskedLM

    folder, hf = saved["bert"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(folder / "config.json", bin_dir / "config.json")
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    # a task model: keys under "bert." plus a head ("cls.*") that the encoder does not run
    mlm = BertForMaskedLM(hf.config).eval()
    mlm.bert.load_state_dict(hf.state_dict(), strict=False)
    head_dir = tmp_path / "mlm"
    mlm.save_pretrained(head_dir)
    seqs = _sequences("bert", seed=2)
    ref = encoders["bert"].forward_packed(encoders["bert"].pack([x.tolist() for x in seqs]))
    for d in (bin_dir, head_dir):
        enc = Encoder.from_pretrained(d, device="cpu", dtype="fp32")
        out = enc.forward_packed(enc.pack([x.tolist() for x in seqs]))
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_inverse_key_map_round_trips(saved, encoders, model_type):
    folder, _ = saved[model_type]
    enc = encoders[model_type]
    hf_state = read_state_dict(folder)
    back = to_hf_state_dict(enc.model.state_dict(), enc.config)
    assert set(back) <= set(hf_state)
    for key, tensor in back.items():
        assert torch.equal(tensor, hf_state[key]), key
    leftovers = set(hf_state) - set(back)
    assert all(k.startswith("pooler") for k in leftovers), leftovers


def _copy_with_state(src, dst, state):
    from safetensors.torch import save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))


def test_strict_loading_lists_missing_unexpected_and_mismatched(saved, tmp_path):
    folder, _ = saved["bert"]
    state = read_state_dict(folder)
    renamed = dict(state)
    renamed["encoder.layer.1.attention.self.kee.weight"] = renamed.pop("encoder.layer.1.attention.self.key.weight")
    _copy_with_state(folder, tmp_path / "renamed", renamed)
    with pytest.raises(ValueError) as info:
        Encoder.from_pretrained(tmp_path / "renamed", device="cpu")
    msg = str(info.value)
    assert "missing keys (1): encoder.layer.1.attention.self.key.weight" in msg
    assert "unexpected keys (1): encoder.layer.1.attention.self.kee.weight" in msg

    bad_shape = dict(state)
    bad_shape["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(199, 96)
    _copy_with_state(folder, tmp_path / "shape", bad_shape)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): encoder.layer.0.intermediate.dense.weight: "):
        Encoder.from_pretrained(tmp_path / "shape", device="cpu")


def test_unsupported_model_type_and_missing_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; supported: albert, bert, distilbert"):
        Encoder.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="does not exist"):
        Encoder.from_pretrained(tmp_path / "nope", device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' is not supported"):
        read_config(tmp_path)


def test_albert_layer_sharing_schedule(encoders):
    cfg = encoders["albert"].config
    # 3 steps over 2 groups: steps 0, 1 -> group 0; step 2 -> group 1; each group runs its 2 inner layers
    assert cfg.layer_schedule == (0, 1, 0, 1, 2, 3)
    assert len(encoders["albert"].model.layers) == 4


def test_sequence_longer_than_position_table_raises(encoders):
    enc = encoders["bert"]
    with pytest.raises(ValueError, match="at most 131"):
        enc.forward_packed(PackedBatch.from_token_lists([[5] * 132]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_budget_of_hf(saved, dtype):
    """Ours in fp16/bf16 vs HF fp32 stays within 3x HF-in-the-same-dtype vs HF fp32 (flash-attention's rule)."""
    folder, hf = saved["bert"]
    enc = Encoder.from_pretrained(folder, device="cpu", dtype=dtype)
    seqs = _sequences("bert", seed=4)[:4]
    truth = torch.cat(hf_alone(hf, seqs))
    hf_lo = type(hf)(hf.config).to(dtype).eval()
    hf_lo.load_state_dict(hf.state_dict())
    base = torch.cat(hf_alone(hf_lo, seqs)).float()
    ours = enc.forward_packed(enc.pack([x.tolist() for x in seqs])).float()
    err, base_err = (ours - truth).abs().max().item(), (base - truth).abs().max().item()
    assert err <= 3 * base_err + 1e-3, f"{dtype}: ours {err:.3e} vs HF {base_err:.3e}"
