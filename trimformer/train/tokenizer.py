"""Tokenizers for training: a byte-level tokenizer that needs no files, and local HF tokenizer folders.

Both expose the same small interface: ``encode(text) -> list[int]`` (no special tokens), ``decode(ids) -> str``,
``vocab_size``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` and ``name`` (recorded in checkpoints so a resume
with another tokenizer is refused).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then the specials ``<bos>`` = 256, ``<eos>`` = 257, ``<pad>`` = 258.

    Lossless for any text; ``decode`` drops the specials and replaces invalid UTF-8 sequences.
    """

    name = "bytes"
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes), without specials."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode` but as a ``uint16`` array (fast path for corpora)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Text of ``ids`` (ints or a 1-D tensor/array); special and out-of-range ids are skipped."""
        data = bytes(int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids) if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``), offline.

    Documents are framed by ``bos`` (when the tokenizer has one) and ``eos``; tokenizers without an eos token use
    their bos or pad token as the separator.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from transformers import AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.name = f"hf:{folder.resolve().name}"
        self.vocab_size = len(self._tok)
        self.bos_token_id = self._tok.bos_token_id
        eos = self._tok.eos_token_id
        if eos is None:
            eos = self._tok.sep_token_id if self._tok.sep_token_id is not None else self.bos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {folder} has no eos, sep or bos token to separate documents")
        self.eos_token_id = eos
        self.pad_token_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else eos

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self._tok.encode(text, add_special_tokens=False)

    def encode_array(self, text: str) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.int32
        return np.asarray(self.encode(text), dtype=dtype)

    def decode(self, ids) -> str:
        return self._tok.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids), skip_special_tokens=True)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"bytes"`` -> :class:`ByteTokenizer`; a folder path -> :class:`HFTokenizer`."""
    if spec == "bytes":
        return ByteTokenizer()
    if not Path(spec).is_dir():
        raise ValueError(f"tokenizer must be 'bytes' or a local HF tokenizer folder, got {spec!r}")
    return HFTokenizer(spec)
