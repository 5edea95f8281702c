"""Sequence-classification heads vs HF ``*ForSequenceClassification`` (fp32, random weights, packed sequences)."""

import json

import pytest
import torch

from trimformer.models.encoders import load_encoder, read_config
from trimformer.models.encoders.heads import (
    HEAD_MODEL_TYPES,
    classifier_config,
    head_key_map,
    load_head,
)
from trimformer.ops.varlen import PackedBatch

VOCAB = 311
LENS = [1, 3, 17, 40]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _models():
    """``{model_type: (HF class, config)}`` with a regression head, a 3-label head, ... (dropout off)."""
    import transformers as T

    common = {"vocab_size": VOCAB, "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0}
    small = {"num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 70}
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    return {
        "bert": (T.BertForSequenceClassification, T.BertConfig(hidden_size=48, num_labels=1, **small, **common)),
        "roberta": (
            T.RobertaForSequenceClassification,
            T.RobertaConfig(hidden_size=32, id2label=labels, pad_token_id=1, type_vocab_size=1, **small, **common),
        ),
        "xlm-roberta": (
            T.XLMRobertaForSequenceClassification,
            T.XLMRobertaConfig(hidden_size=48, num_labels=1, pad_token_id=1, **small, **common),
        ),
        "distilbert": (
            T.DistilBertForSequenceClassification,
            T.DistilBertConfig(
                vocab_size=VOCAB, dim=32, n_heads=2, n_layers=2, hidden_dim=70, id2label=labels, dropout=0.0,
                attention_dropout=0.0, seq_classif_dropout=0.0,
            ),
        ),
        "albert": (
            T.AlbertForSequenceClassification,
            T.AlbertConfig(
                embedding_size=24, hidden_size=48, num_labels=2, classifier_dropout_prob=0.0, **small, **common
            ),
        ),
    }  # fmt: skip


def _randomize(model):
    """Every parameter random with a visible scale, so a swapped or dropped head tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm.weight" in name.lower() else 0.3 * noise)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for model_type, (cls, cfg) in _models().items():
        cfg._attn_implementation = "eager"
        hf = cls(cfg).eval()
        _randomize(hf)
        folder = tmp_path_factory.mktemp(model_type)
        hf.save_pretrained(folder)
        out[model_type] = (folder, hf)
    return out


def _hf_logits(hf, ids: list[list[int]]) -> torch.Tensor:
    """HF logits of each sequence run alone (no padding involved)."""
    with torch.no_grad():
        return torch.cat([hf(input_ids=torch.tensor([row])).logits for row in ids])


@pytest.mark.parametrize("model_type", sorted(_models()))
def test_head_matches_hf(saved, model_type):
    folder, hf = saved[model_type]
    config = read_config(folder)
    encoder = load_encoder(folder, device="cpu", dtype="float32")
    head, info = load_head(folder, config, device="cpu")
    assert info.num_labels == hf.config.num_labels == head.num_labels
    assert info.id2label == tuple(hf.config.id2label[i] for i in range(hf.config.num_labels))
    g = torch.Generator().manual_seed(11)
    ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENS]
    batch = PackedBatch.from_token_lists(ids, position_offset=config.position_offset)
    with torch.inference_mode():
        ours = head(encoder.forward_packed(batch), batch.cu_seqlens)
    ref = _hf_logits(hf, ids)
    assert ours.shape == ref.shape == (len(LENS), info.num_labels) and ours.dtype == torch.float32
    assert ref.abs().max() > 0.1  # logits far from zero: a dropped tensor would show
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_head_on_half_precision_encoder_stays_float32(saved):
    folder, hf = saved["bert"]
    config = read_config(folder)
    encoder = load_encoder(folder, device="cpu", dtype="bfloat16")
    head, _ = load_head(folder, config, device="cpu")
    ids = [[5, 6, 7, 8], [9, 10]]
    batch = PackedBatch.from_token_lists(ids, position_offset=config.position_offset)
    with torch.inference_mode():
        ours = head(encoder.forward_packed(batch), batch.cu_seqlens)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, _hf_logits(hf, ids), rtol=0.05, atol=0.05)


def test_classifier_config_reads_labels_and_problem_type(saved, tmp_path):
    folder, _ = saved["roberta"]
    info = classifier_config(folder)
    assert info.id2label == ("negative", "neutral", "positive") and info.num_labels == 3
    assert info.architecture == "RobertaForSequenceClassification"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["problem_type"] = "multi_label_classification"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert classifier_config(tmp_path).problem_type == "multi_label_classification"
    cfg["problem_type"] = "ranking"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown problem_type 'ranking'"):
        classifier_config(tmp_path)
    cfg["problem_type"] = None
    cfg["id2label"] = {"0": "a", "2": "c"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"id2label must map 0..1"):
        classifier_config(tmp_path)


def test_plain_encoder_has_no_head(tmp_path):
    from trimformer.engine.encoder import default_model_path

    assert classifier_config(default_model_path()) is None
    folder = default_model_path()
    with pytest.raises(ValueError, match="has no sequence-classification head"):
        load_head(folder, read_config(folder))


def test_missing_or_misshaped_head_weights(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = saved["distilbert"]
    config = read_config(folder)
    state = load_file(str(folder / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v for k, v in state.items() if not k.startswith("pre_classifier.")}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks its weights: missing pre_classifier.bias, pre_classifier.weight"):
        load_head(tmp_path, config)
    state["classifier.weight"] = torch.zeros(4, config.hidden_size)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"classifier.weight: checkpoint \(4, 32\) vs expected \(3, 32\)"):
        load_head(tmp_path, config)


def test_unsupported_family_names_the_supported_ones():
    assert HEAD_MODEL_TYPES == ("albert", "bert", "distilbert", "roberta", "xlm-roberta")
    with pytest.raises(ValueError, match="supported for albert, bert, distilbert, roberta, xlm-roberta"):
        head_key_map("deberta-v2")
