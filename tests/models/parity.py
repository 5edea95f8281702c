"""Helpers shared by the encoder parity tests: random-weight HF checkpoints, ragged token sequences, HF run on each
sequence alone (the truth: no padding, positions from 0) and right/left-padded batches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


def randomize(model: torch.nn.Module, *, norm_names: Iterable[str] = ("LayerNorm.weight",), seed: int = 7) -> None:
    """Every parameter random (norm scales near 1), so a swapped or dropped tensor cannot go unnoticed."""
    norm_names = tuple(norm_names)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if any(n in name for n in norm_names) else 0.15 * noise)


def save_random_models(configs: Mapping, make_folder, *, norm_names: Iterable[str] = ("LayerNorm.weight",)) -> dict:
    """``{name: (folder, hf_model)}``: eager-attention HF models of ``configs`` with random weights, saved with
    ``save_pretrained`` to ``make_folder(name)``."""
    from transformers import AutoModel

    out = {}
    for name, cfg in configs.items():
        cfg._attn_implementation = "eager"
        hf = AutoModel.from_config(cfg).eval()
        randomize(hf, norm_names=norm_names)
        folder = Path(make_folder(name))
        hf.save_pretrained(folder)
        out[name] = (folder, hf)
    return out


def random_sequences(vocab: int, lens: Iterable[int], *, seed: int = 0, low: int = 1) -> list[torch.Tensor]:
    """One ``[n]`` int64 id tensor per length, ids uniform in ``[low, vocab)``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g) for n in lens]


def hf_alone(hf, seqs: list[torch.Tensor], types: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """HF's ``last_hidden_state`` of each sequence run alone: ``[n_i, H]`` each."""
    with torch.no_grad():
        return [
            hf(input_ids=x[None], **({} if types is None else {"token_type_ids": types[i][None]})).last_hidden_state[0]
            for i, x in enumerate(seqs)
        ]


def padded(seqs: list[torch.Tensor], side: str, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, S], mask [B, S])`` with ``side`` ("right" or "left") padding and 3 extra padding columns."""
    s = max(len(x) for x in seqs) + 3
    ids = torch.full((len(seqs), s), fill, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    for i, x in enumerate(seqs):
        sl = slice(0, len(x)) if side == "right" else slice(s - len(x), s)
        ids[i, sl], mask[i, sl] = x, 1
    return ids, mask


def save_word_tokenizer(folder, words: list[str]):
    """A word-level tokenizer over ``words`` ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, then the words) saved to
    ``folder`` as a fast HF tokenizer; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=512,
    )  # fmt: skip
    fast.save_pretrained(folder)
    return fast


def fp16_errors(folder, hf, seqs: list[torch.Tensor]) -> tuple[float, float]:
    """``(ours, hf16)``: max abs error against HF fp32 run alone of our fp16 CUDA forward of ``seqs`` (model folder
    ``folder``) and of HF itself in fp16 on the GPU, the baseline our error is judged by."""
    from trimformer import Encoder

    enc = Encoder.from_pretrained(folder, device="cuda", dtype=torch.float16)
    truth = torch.cat(hf_alone(hf, seqs))
    hf16 = type(hf)(hf.config).to("cuda", torch.float16).eval()
    hf16.load_state_dict(hf.state_dict())
    base = torch.cat(hf_alone(hf16, [x.cuda() for x in seqs])).float().cpu()
    ours = enc.forward_packed(enc.pack([x.tolist() for x in seqs])).float().cpu()
    return (ours - truth).abs().max().item(), (base - truth).abs().max().item()


def embed_cli_vectors(tmp_path: Path, texts: list[str], model_dir: Path, flags: list[str]):
    """``trimformer embed`` of ``texts`` from a file with ``flags`` (pooling/normalisation) on the CPU: the saved
    ``[N, D]`` numpy array (asserts the command exits 0)."""
    import numpy as np

    from trimformer.cli import main

    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "vecs.npy"
    argv = ["embed", str(tmp_path / "texts.txt"), "--model", str(model_dir), "--device", "cpu", "--output", str(out),
            *flags, "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return np.load(out)
