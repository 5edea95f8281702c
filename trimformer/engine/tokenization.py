"""Tokenization for the encoder engine: token-id lists (no padding), truncation counted, pairs for cross-encoders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


@dataclass(frozen=True)
class Tokenized:
    """Token ids of ``N`` inputs, special tokens included, no padding.

    Attributes:
        input_ids: ``N`` lists of token ids.
        token_type_ids: ``N`` lists of segment ids (pairs), or ``None`` (single texts: segment 0).
        truncated: indices of the inputs that were cut to the model's ``max_length``.
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    truncated: tuple[int, ...]

    @property
    def num_truncated(self) -> int:
        return len(self.truncated)

    @property
    def num_tokens(self) -> int:
        """Total tokens over all inputs (after truncation)."""
        return sum(len(ids) for ids in self.input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds tokenizer files ``AutoTokenizer`` can load."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def check_texts(texts: Sequence[str] | str, name: str = "texts") -> list[str]:
    """``texts`` as a list of str (a bare str is one text); ``ValueError`` naming the first non-str entry."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise ValueError(f"{name} must be a string or a sequence of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] is {type(t).__name__}, expected str")
    return texts


def tokenize_texts(tokenizer, texts: list[str], max_length: int, *, truncate: bool) -> Tokenized:
    """Tokenize single texts with special tokens; over-long ones are re-tokenized with HF's own truncation.

    Raises:
        ValueError: ``truncate=False`` and an input is longer than ``max_length`` (names the index and the limit).
    """
    kw = {"add_special_tokens": True, "return_attention_mask": False, "return_token_type_ids": False}
    if not texts:
        return Tokenized([], None, ())
    ids = tokenizer(texts, truncation=False, verbose=False, **kw)["input_ids"]
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long and not truncate:
        i = long[0]
        raise ValueError(
            f"input {i} has {len(ids[i])} tokens, more than the model's limit of {max_length} "
            f"({len(long)} input(s) too long; pass truncate=True to cut them)"
        )
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length, **kw)["input_ids"]
        for i, row in zip(long, cut):
            ids[i] = row
    return Tokenized([list(r) for r in ids], None, tuple(long))


def tokenize_text_pairs(
    tokenizer, first: list[str], second: list[str], max_length: int, *, truncate: bool
) -> Tokenized:
    """Tokenize ``(first[i], second[i])`` pairs with segment ids (``[CLS] a [SEP] b [SEP]`` for BERT).

    Over-long pairs are cut with HF's ``longest_first`` strategy (what cross-encoders use).
    """
    kw = {"add_special_tokens": True, "return_attention_mask": False, "return_token_type_ids": True}
    if not first:
        return Tokenized([], [], ())
    enc = tokenizer(first, second, truncation=False, verbose=False, **kw)
    ids, types = enc["input_ids"], enc.get("token_type_ids")
    if types is None:
        types = [[0] * len(row) for row in ids]
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long and not truncate:
        i = long[0]
        raise ValueError(
            f"pair {i} has {len(ids[i])} tokens, more than the model's limit of {max_length} "
            f"({len(long)} pair(s) too long; pass truncate=True to cut them)"
        )
    if long:
        cut = tokenizer(
            [first[i] for i in long],
            [second[i] for i in long],
            truncation="longest_first",
            max_length=max_length,
            **kw,
        )
        cut_types = cut.get("token_type_ids") or [[0] * len(row) for row in cut["input_ids"]]
        for j, i in enumerate(long):
            ids[i], types[i] = cut["input_ids"][j], cut_types[j]
    return Tokenized([list(r) for r in ids], [list(r) for r in types], tuple(long))
