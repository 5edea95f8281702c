"""The server's tokenizer-stage path (``ServedModel.tokenize``: a thread's raw Rust tokenizer copy) against
``Encoder.tokenize`` (transformers' own call) as the oracle, for WordPiece (MiniLM) and a byte-level BPE tokenizer,
over-long texts included; a copy that disagrees on the probe set is not used."""

import shutil
import threading

from trimformer.engine.encoder import Encoder
from trimformer.serve import ServedModel

TEXTS = [
    "",
    "Hello, World!",
    "naïve café — ünïcödé ✓ 日本語 🙂",
    "  spaces   everywhere  ",
    "[CLS] typed [SEP] markers [MASK] <s> </s>",
    "UPPER lower MiXeD 123 4.5",
    " ".join(["long"] * 300),  # over the limit: cut, its index reported
    "short again",
    "x" * 2000,
]


def _check(model: ServedModel) -> None:
    got = model.tokenize(TEXTS)
    want = Encoder.tokenize(model.encoder, TEXTS, truncate=True)
    assert got == want
    assert got.truncated  # the over-long texts were cut, their indices reported as the oracle does
    assert model._local.raw is not None  # the raw path was taken


def test_wordpiece_tokenizer_matches_encoder_tokenize(tiny_dir):
    _check(ServedModel.load(tiny_dir, device="cpu", dtype="float32"))


def test_byte_level_bpe_tokenizer_matches_encoder_tokenize(tiny_dir, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.train_from_iterator([" ".join(TEXTS)] * 3 + ["the quick brown fox jumps over the lazy dog"] * 5, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", 0))
    folder = tmp_path / "bpe"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, folder / name)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", model_max_length=128,
    )  # fmt: skip
    fast.save_pretrained(folder)
    model = ServedModel.load(folder, device="cpu", dtype="float32")
    assert model.max_length == 128
    _check(model)


def test_a_copy_that_disagrees_on_the_probe_is_not_used(tiny_dir, monkeypatch):
    model = ServedModel.load(tiny_dir, device="cpu", dtype="float32")
    monkeypatch.setattr(ServedModel, "_tokenize_raw", lambda self, enc, raw, texts: enc.tokenize(texts[:1]))
    out = {}

    def in_thread():  # a fresh thread: no copy decided yet
        out["got"] = model.tokenize(TEXTS)
        out["raw"] = model._local.raw

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert out["raw"] is None
    assert out["got"] == Encoder.tokenize(model.encoder, TEXTS, truncate=True)
