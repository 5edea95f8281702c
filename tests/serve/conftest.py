"""Fixtures for the server tests: random-weight model folders (embedding, reranker, classifier) and the real
packaged all-MiniLM-L6-v2. Servers and HTTP helpers are in ``tests/serve/helpers.py``."""

import shutil
from pathlib import Path

import pytest
import torch

from trimformer.engine.encoder import default_model_path
from trimformer.serve import ServedModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    """One intra-op thread: the CI machine has 2 cores shared by the pytest workers and the servers."""


def _copy_tokenizer(folder: Path) -> None:
    src = default_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, folder / name)


def _randomize(model) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "LayerNorm.weight" in name else 0.2 * noise)


def _tiny(cls, config_cls, folder: Path, **kw) -> Path:
    """A random-weight checkpoint with the MiniLM tokenizer (vocab 30522), saved with save_pretrained."""
    cfg = config_cls(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, **kw,
    )  # fmt: skip
    model = cls(cfg).eval()
    _randomize(model)
    model.save_pretrained(folder)
    _copy_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny random BERT embedding model (no sentence-transformers files: mean pooling, not normalised)."""
    from transformers import BertConfig, BertModel

    return _tiny(BertModel, BertConfig, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def reranker_dir(tmp_path_factory) -> Path:
    """Tiny random BERT cross-encoder (one label)."""
    from transformers import BertConfig, BertForSequenceClassification

    return _tiny(BertForSequenceClassification, BertConfig, tmp_path_factory.mktemp("reranker"), num_labels=1)


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
    """Tiny random XLM-R classifier with three named labels."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    labels = {0: "negative", 1: "neutral", 2: "positive"}
    return _tiny(
        XLMRobertaForSequenceClassification, XLMRobertaConfig, tmp_path_factory.mktemp("classifier"),
        id2label=labels, label2id={v: k for k, v in labels.items()}, pad_token_id=1,
    )  # fmt: skip


@pytest.fixture(scope="session")
def minilm() -> ServedModel:
    """The packaged all-MiniLM-L6-v2 (real weights), fp32 on the CPU."""
    return ServedModel.load(None, device="cpu", dtype="float32")
