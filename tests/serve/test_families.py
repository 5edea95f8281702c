"""DeBERTa-v2 and ModernBERT checkpoints are served like the BERT family: /v1/embeddings and /embed over real HTTP
return what ``Encoder.embed`` returns for each text, and the embeddings match HF run on each text alone."""

from __future__ import annotations

import httpx
import pytest
import torch
import torch.nn.functional as F

from tests.serve.conftest import _copy_tokenizer, _randomize
from tests.serve.helpers import running
from trimformer.serve import ServedModel

TEXTS = ["a", "the quick brown fox jumps over the lazy dog", "padding free " * 20, "serve me too"]


def _deberta():
    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, relative_attention=True, position_buckets=16, max_relative_positions=32,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
        type_vocab_size=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return DebertaV2Model(cfg)


def _modernbert():
    from transformers import ModernBertConfig, ModernBertModel

    cfg = ModernBertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=130, local_attention=8, pad_token_id=0, cls_token_id=101, sep_token_id=102,
        bos_token_id=101, eos_token_id=102,
    )  # fmt: skip
    return ModernBertModel(cfg)


@pytest.mark.parametrize("build", [_deberta, _modernbert], ids=["deberta-v2", "modernbert"])
def test_family_served_over_http_matches_encoder_and_hf(build, tmp_path):
    hf = build().eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    _copy_tokenizer(tmp_path)
    served = ServedModel.load(str(tmp_path), device="cpu", dtype="float32")
    want = served.encoder.embed(TEXTS)
    with running(served) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/v1/embeddings", json={"input": TEXTS, "model": "m"})
            assert r.status_code == 200, r.text
            got = torch.tensor([row["embedding"] for row in r.json()["data"]])
            tei = client.post("/embed", json={"inputs": TEXTS, "normalize": False})
            assert tei.status_code == 200, tei.text
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(tei.json()), want, atol=1e-5, rtol=0)
    # the oracle: HF on each text alone, mean pooling (no sentence-transformers files -> mean, not normalised)
    tok = served.encoder.tokenizer
    for i, text in enumerate(TEXTS):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            ref = hf(**ids).last_hidden_state[0].mean(0)
        assert F.cosine_similarity(ref, want[i], dim=0) > 1 - 1e-6
        torch.testing.assert_close(want[i], ref, atol=1e-4, rtol=0)
