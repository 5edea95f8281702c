"""The public Encoder API on the real all-MiniLM-L6-v2: sentence-transformers parity, invariances, options, errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trimformer import Encoder
from trimformer.engine import plan_batches, pool, read_st_settings
from trimformer.engine.encoder import default_model_path

CORPUS = Path(__file__).resolve().parents[2] / "trimformer" / "data" / "sample_corpus.txt"
EXTRA = [
    "",
    "   ",
    "?!",
    "42",
    "A B C D E F G",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "tab\tseparated\twords and   extra   spaces",
    " ".join(["a very long text that will be cut"] * 60),
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: CI runs pytest-xdist workers on 2 cores, and two OpenMP threads per worker then stall on
    every barrier (measured 10-20x slower for these small forwards). Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def enc():
    return Encoder.from_pretrained(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def texts():
    return CORPUS.read_text(encoding="utf-8").splitlines() + EXTRA


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_model_path()), device="cpu")


def test_properties_of_the_packaged_model(enc):
    assert enc.model_type == "bert" and enc.hidden_size == 384
    assert enc.max_length == 256  # sentence_bert_config.json, below the 512 positions
    assert enc.device == torch.device("cpu") and enc.dtype == torch.float32
    assert enc.default_pooling == "mean" and enc.default_normalize is True  # Normalize module, folder absent
    assert Path(enc.name_or_path) == default_model_path()


def test_embed_matches_sentence_transformers(enc, texts, st_model):
    assert len(texts) >= 50
    ours = enc.embed(texts)
    ref = st_model.encode(texts, batch_size=32, convert_to_tensor=True).float().cpu()
    assert ours.shape == (len(texts), 384) and ours.dtype == torch.float32
    assert not ours.is_inference()  # usable outside inference mode (autograd, in-place edits)
    cos = F.cosine_similarity(ours, ref)
    worst = int(cos.argmin())
    assert cos.min() >= 0.99999, f"text {worst} {texts[worst][:40]!r}: cosine {cos[worst]:.7f}"
    # sanity value from the model card
    assert ours[0] @ ours[1] == pytest.approx(0.7553, abs=1e-4)


def test_warmup_is_a_no_op_on_cpu(enc):
    assert enc.device.type == "cpu" and enc.warmup(4096) == 0 and enc.graphs is None


def test_empty_text_is_the_special_tokens_alone(enc):
    tok = enc.tokenize([""])
    assert tok.input_ids == [[101, 102]]  # [CLS] [SEP]
    torch.testing.assert_close(enc.embed([""]), enc.embed_token_ids([[101, 102]]), rtol=0, atol=0)


def test_batch_invariance(enc, texts):
    sample = texts[::3] + [texts[-1]]
    together = enc.embed(sample)
    for budget in (300, 2048):
        torch.testing.assert_close(enc.embed(sample, batch_tokens=budget), together, rtol=0, atol=1e-5)
    for i in (0, 5, 17, len(sample) - 1):  # alone: a batch of one
        torch.testing.assert_close(enc.embed([sample[i]])[0], together[i], rtol=0, atol=1e-5)
    shuffled = list(reversed(sample))
    torch.testing.assert_close(enc.embed(shuffled).flip(0), together, rtol=0, atol=1e-5)


def test_rows_come_back_in_input_order(enc):
    a, b = "short", "a much longer sentence than the first one, with many more tokens in it"
    out = enc.embed([a, b, a])
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=1e-6)
    assert (out[0] - out[1]).abs().max() > 1e-2


def test_truncation_is_counted_and_can_be_refused(enc):
    long_text = " ".join(["word"] * 400)
    tok = enc.tokenize(["short", long_text, long_text])
    assert tok.truncated == (1, 2) and tok.num_truncated == 2
    assert [len(x) for x in tok.input_ids] == [3, 256, 256]
    assert tok.input_ids[1][-1] == 102  # [SEP] kept, as HF truncation does
    with pytest.raises(ValueError, match="input 1 has 402 tokens, more than the model's limit of 256"):
        enc.tokenize(["short", long_text], truncate=False)


def test_tokenize_pairs(enc):
    pairs = enc.tokenize_pairs("what is the capital?", ["Canberra.", "It is Paris, I think."])
    ref = enc.tokenizer(["what is the capital?"] * 2, ["Canberra.", "It is Paris, I think."])
    assert pairs.input_ids == ref["input_ids"] and pairs.token_type_ids == ref["token_type_ids"]
    assert set(pairs.token_type_ids[0]) == {0, 1}
    long_pairs = enc.tokenize_pairs(["q " * 200, "q"], ["p " * 200, "p"])
    assert long_pairs.truncated == (0,) and len(long_pairs.input_ids[0]) == 256
    with pytest.raises(ValueError, match="2 queries for 1 texts"):
        enc.tokenize_pairs(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="pair 0 has"):
        enc.tokenize_pairs("q " * 200, ["p " * 200], truncate=False)
    vecs = enc.embed_token_ids(pairs.input_ids, token_type_ids=pairs.token_type_ids, pooling="cls")
    assert vecs.shape == (2, 384)


def _hf_states(texts):
    from transformers import AutoModel, AutoTokenizer

    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state, batch


def test_pooling_overrides_against_hf_states(enc):
    texts = ["A man is eating food.", "Two dogs are playing fetch on a sandy beach at sunset.", "x"]
    hidden, batch = _hf_states(texts)
    mask = batch["attention_mask"].bool()
    lens = mask.sum(1)
    expected = {
        "cls": hidden[:, 0],
        "last": hidden[torch.arange(3), lens - 1],
        "mean": torch.stack([hidden[i][mask[i]].mean(0) for i in range(3)]),
        "max": torch.stack([hidden[i][mask[i]].max(0).values for i in range(3)]),
        "mean_sqrt_len": torch.stack([hidden[i][mask[i]].sum(0) / lens[i].sqrt() for i in range(3)]),
    }
    for mode, ref in expected.items():
        torch.testing.assert_close(enc.embed(texts, pooling=mode, normalize=False), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(enc.embed(texts, pooling="cls"), F.normalize(hidden[:, 0], dim=-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unsupported pooling 'sum'"):
        enc.embed(texts, pooling="sum")


def test_padded_call_is_a_drop_in_for_hf(enc):
    texts = ["A man is eating food.", "The new movie is awesome and everyone should go and see it.", "ok"]
    hidden, batch = _hf_states(texts)
    ours = enc(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    mask = batch["attention_mask"].bool()
    assert ours.shape == hidden.shape
    torch.testing.assert_close(ours[mask], hidden[mask], rtol=0, atol=1e-4)
    assert ours[~mask].abs().max() == 0
    packed = enc.forward_packed(enc.pack(enc.tokenize(texts).input_ids))
    torch.testing.assert_close(packed, ours[mask], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 30522\)"):
        enc(torch.tensor([[101, 40000]]), torch.ones(1, 2))


def test_embed_token_ids_validation(enc):
    with pytest.raises(ValueError, match="input 1 has no tokens"):
        enc.embed_token_ids([[101, 102], []])
    with pytest.raises(ValueError, match=r"input 0 has token id 30522 outside \[0, 30522\)"):
        enc.embed_token_ids([[101, 30522, 102]])
    with pytest.raises(ValueError, match="more than the model's limit of 256"):
        enc.embed_token_ids([[101] * 257])
    with pytest.raises(ValueError, match="batch_tokens must be a positive integer"):
        enc.embed_token_ids([[101, 102]], batch_tokens=0)
    assert enc.embed_token_ids([]).shape == (0, 384)


def test_cpu_forward_cap(enc):
    assert enc.forward_tokens(16384) == enc.cpu_forward_tokens < 16384
    assert enc.forward_tokens(100) == 100


def test_dtypes_and_devices(monkeypatch):
    path = default_model_path()
    bf16 = Encoder.from_pretrained(path, device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    fp32 = Encoder.from_pretrained(path, device="cpu", dtype=torch.float32)
    texts = ["A man is eating food.", "A man is eating a piece of bread."]
    assert F.cosine_similarity(bf16.embed(texts), fp32.embed(texts)).min() > 0.99
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        Encoder.from_pretrained(path, device="cpu", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Encoder.from_pretrained(path, device="cuda")

    def broken(*args, **kwargs):  # what an old PyTorch says for fp16 matmul on CPU
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr(torch.nn.functional, "linear", broken)
    with pytest.raises(ValueError, match="dtype torch.float16 cannot run on cpu: .*not implemented for 'Half'"):
        Encoder.from_pretrained(path, device="cpu", dtype="fp16")


def _st_folder(tmp_path, modules=None, pooling=None, bert_cfg=None):
    src = default_model_path()
    dst = tmp_path / "model"
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (dst / name).symlink_to(src / name)
    if modules is not None:
        (dst / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (dst / "1_Pooling").mkdir()
        (dst / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if bert_cfg is not None:
        (dst / "sentence_bert_config.json").write_text(json.dumps(bert_cfg))
    return dst


_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


def test_st_settings_variants(tmp_path):
    plain = _st_folder(tmp_path / "a")
    s = read_st_settings(plain)
    assert (s.pooling, s.normalize, s.max_seq_length, s.found) == ("mean", False, None, False)
    enc = Encoder.from_pretrained(plain, device="cpu")
    assert enc.max_length == 512  # tokenizer_config.json model_max_length, no sentence-transformers files

    cls_folder = _st_folder(tmp_path / "b", _MODULES, {"pooling_mode_cls_token": True}, {"max_seq_length": 128})
    enc = Encoder.from_pretrained(cls_folder, device="cpu")
    assert (enc.default_pooling, enc.default_normalize, enc.max_length) == ("cls", False, 128)

    new_style = _st_folder(
        tmp_path / "c",
        [*_MODULES, {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}],
        {"pooling_mode": "lasttoken"},
    )
    s = read_st_settings(new_style)
    assert (s.pooling, s.normalize) == ("last", True)

    combined = _st_folder(tmp_path / "d", _MODULES, {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True})
    enc = Encoder.from_pretrained(combined, device="cpu")
    with pytest.raises(ValueError, match="combines pooling modes"):
        enc.embed(["x"])
    assert enc.embed(["x"], pooling="mean").shape == (1, 384)


def test_folder_without_tokenizer_needs_token_ids(tmp_path):
    src = default_model_path()
    dst = tmp_path / "bare"
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    enc = Encoder.from_pretrained(dst, device="cpu")
    with pytest.raises(ValueError, match="has no tokenizer files"):
        enc.embed(["hello"])
    assert enc.embed_token_ids([[101, 7592, 102]]).shape == (1, 384)


def test_bad_arguments(enc):
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        enc.embed(["ok", 3])
    with pytest.raises(ValueError, match="path must be a folder path"):
        Encoder.from_pretrained(123)
    assert enc.embed("a single string").shape == (1, 384)


def test_plan_batches():
    lengths = [5, 300, 17, 17, 1, 64, 129, 2]
    batches = plan_batches(lengths, 150)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [1]  # longer than the budget: alone
    for b in batches[1:]:
        assert sum(lengths[i] for i in b) <= 150
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert [len(b) for b in plan_batches([1] * 10, 100, max_batch_size=4)] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_tokens"):
        plan_batches([1], 0)


@pytest.mark.parametrize("mode", ["cls", "last", "mean", "max", "mean_sqrt_len"])
def test_pool_matches_per_sequence_loops(mode):
    lens = [1, 4, 9, 2]
    cu = torch.tensor([0, 1, 5, 14, 16], dtype=torch.int32)
    h = torch.randn(16, 8, dtype=torch.float16)
    out = pool(h, cu, mode)
    assert out.dtype == torch.float32
    for i, n in enumerate(lens):
        seg = h[int(cu[i]) : int(cu[i + 1])].float()
        ref = {
            "cls": seg[0],
            "last": seg[-1],
            "mean": seg.mean(0),
            "max": seg.max(0).values,
            "mean_sqrt_len": seg.sum(0) / n**0.5,
        }[mode]
        torch.testing.assert_close(out[i], ref, rtol=1e-6, atol=1e-6)
