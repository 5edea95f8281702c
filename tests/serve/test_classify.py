"""/rerank and /predict over real HTTP with random-weight *ForSequenceClassification checkpoints, checked against
HF transformers in fp32 (scores = sigmoid / softmax of HF's logits)."""

import httpx
import pytest
import torch

from tests.serve.helpers import running
from trimformer.serve import ServedModel

QUERY = "what do foxes eat"
DOCS = [
    "Foxes eat small rodents, birds and berries.",
    "The stock market closed higher today.",
    "",
    "A red fox hunting mice in the snow, listening for movement under the surface before it jumps.",
]


def _hf(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _hf_logits(folder, first, second=None) -> torch.Tensor:
    """HF logits of each input run alone (no padding). Pairs are tokenized in list form, as sentence-transformers'
    CrossEncoder does (HF's single-pair call drops an empty second text; the list form keeps its [SEP])."""
    model, tok = _hf(folder)
    rows = []
    with torch.no_grad():
        for i, text in enumerate(first):
            args = ([text], [second[i]]) if second is not None else ([text],)
            enc = tok(*args, return_tensors="pt")
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


def test_rerank_matches_hf_and_sorts(reranker_dir):
    ref = torch.sigmoid(_hf_logits(reranker_dir, [QUERY] * len(DOCS), DOCS)[:, 0])
    model = ServedModel.load(reranker_dir, device="cpu", dtype="float32")
    assert model.kind == "classifier" and model.is_reranker
    with running(model) as (url, _):
        r = httpx.post(url + "/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
        assert r.status_code == 200
        body = r.json()
        assert sorted(item["index"] for item in body) == list(range(len(DOCS)))
        scores = [item["score"] for item in body]
        assert scores == sorted(scores, reverse=True)
        for item in body:
            assert item["text"] == DOCS[item["index"]]
            assert item["score"] == pytest.approx(float(ref[item["index"]]), abs=1e-5)
        assert ref.max() - ref.min() > 1e-3  # the ranking is not decided by ties
        raw = httpx.post(url + "/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
        logits = _hf_logits(reranker_dir, [QUERY] * len(DOCS), DOCS)[:, 0]
        for item in raw:
            assert "text" not in item
            assert item["score"] == pytest.approx(float(logits[item["index"]]), abs=1e-5)
        info = httpx.get(url + "/info").json()
        assert info["model_type"]["reranker"]["id2label"] == {"0": "LABEL_0"}
        # a reranker is not an embedding model
        assert httpx.post(url + "/embed", json={"inputs": "a"}).status_code == 400
        r = httpx.post(url + "/v1/embeddings", json={"input": "a"})
        assert r.status_code == 400 and "use /predict or /rerank" in r.json()["error"]["message"]
        # validation and limits
        r = httpx.post(url + "/rerank", json={"query": QUERY, "texts": []})
        assert r.status_code == 422 and "texts" in r.json()["error"]
        r = httpx.post(url + "/rerank", json={"texts": ["a"]})
        assert r.status_code == 422 and "query: required field is missing" in r.json()["error"]
        long = " ".join(["word"] * 200)
        r = httpx.post(url + "/rerank", json={"query": QUERY, "texts": ["a", long]})
        assert r.status_code == 413 and "pair 1 is longer than the model's limit of 130" in r.json()["error"]
        cut = httpx.post(url + "/rerank", json={"query": QUERY, "texts": ["a", long], "truncate": True})
        assert cut.status_code == 200
        want = torch.sigmoid(_hf_truncated_pair(reranker_dir, QUERY, long, 130))
        got = {item["index"]: item["score"] for item in cut.json()}
        assert got[1] == pytest.approx(float(want), abs=1e-5)


def _hf_truncated_pair(folder, query, text, max_length) -> torch.Tensor:
    model, tok = _hf(folder)
    enc = tok([query], [text], truncation="longest_first", max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0, 0]


def test_predict_matches_hf_softmax_with_labels(classifier_dir):
    pairs = [(QUERY, DOCS[0]), ("is it raining", "")]
    ref_single = torch.softmax(_hf_logits(classifier_dir, DOCS), dim=-1)
    ref_pairs = torch.softmax(_hf_logits(classifier_dir, [a for a, _ in pairs], [b for _, b in pairs]), dim=-1)
    model = ServedModel.load(classifier_dir, device="cpu", dtype="float32")
    assert model.kind == "classifier" and not model.is_reranker
    labels = ("negative", "neutral", "positive")
    with running(model) as (url, _):
        one = httpx.post(url + "/predict", json={"inputs": DOCS[3]})
        assert one.status_code == 200
        body = one.json()
        assert [x["label"] for x in body] == [labels[j] for j in ref_single[3].argsort(descending=True).tolist()]
        for x in body:
            assert x["score"] == pytest.approx(float(ref_single[3, labels.index(x["label"])]), abs=1e-5)
        mixed = [DOCS[0], list(pairs[0]), DOCS[2], list(pairs[1])]
        batch = httpx.post(url + "/predict", json={"inputs": mixed}).json()
        assert len(batch) == 4 and all(len(row) == 3 for row in batch)
        want = [ref_single[0], ref_pairs[0], ref_single[2], ref_pairs[1]]
        for row, ref in zip(batch, want):
            got = torch.tensor([{x["label"]: x["score"] for x in row}[name] for name in labels])
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
            assert [x["score"] for x in row] == sorted((x["score"] for x in row), reverse=True)
        raw = httpx.post(url + "/predict", json={"inputs": [DOCS[1]], "raw_scores": True}).json()[0]
        logits = _hf_logits(classifier_dir, [DOCS[1]])[0]
        for x in raw:
            assert x["score"] == pytest.approx(float(logits[labels.index(x["label"])]), abs=1e-5)
        r = httpx.post(url + "/rerank", json={"query": "q", "texts": ["a"]})
        assert r.status_code == 400 and "not a reranker" in r.json()["error"] and "3" in r.json()["error"]
        r = httpx.post(url + "/predict", json={"inputs": [["only one"]]})
        assert r.status_code == 422 and "item 0 must be a string or a [text, text_pair] list" in r.json()["error"]
        info = httpx.get(url + "/info").json()
        assert info["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
        assert info["model_family"] == "xlm-roberta"
