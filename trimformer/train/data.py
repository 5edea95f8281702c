"""Training data: corpora available offline, a deterministic train/validation split by file, and document packing.

* Corpora: ``"stdlib"`` (the Python standard library's ``.py`` sources, on every machine with Python) or any folder
  of text files. Each file is one document.
* Split: a file goes to validation when ``sha1(relative path) mod 10**6 < val_fraction * 10**6``: deterministic,
  independent of the training seed and of the number of processes, and stable when files are added.
* Packing: each document becomes ``[bos] + tokens + [eos]``; an epoch is the documents in a seeded random order
  concatenated into one stream; epochs follow each other forever. Block ``i`` of the stream is tokens
  ``[i L, (i + 1) L)`` (``L = seq_len``). A micro-batch of ``n`` blocks is one packed row of ``T = n L`` tokens whose
  ``cu_seqlens`` start a new segment at every block start and every document start inside a block, so nothing
  (attention, convolution, loss) crosses a document boundary and no token is padding.
* Resume: block ``i`` is a pure function of ``(corpus, tokenizer, seed, i)``, so the data position is one integer
  (blocks consumed), saved in the checkpoint.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def stdlib_root() -> Path:
    """Folder of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(corpus: str, *, extensions: tuple[str, ...] | None = None) -> tuple[Path, list[Path]]:
    """``(root, files)`` of a corpus, files sorted by relative path.

    Args:
        corpus: ``"stdlib"`` (``*.py`` under :func:`stdlib_root`, without ``site-packages``) or a folder path.
        extensions: keep only these suffixes (e.g. ``(".txt", ".md")``); default: ``.py`` for the stdlib, every
            file for a folder (binary files, those with NUL bytes, are skipped when read).
    """
    if corpus == "stdlib":
        root, extensions = stdlib_root(), extensions or (".py",)
    else:
        root = Path(corpus)
        if not root.is_dir():
            raise ValueError(f"corpus must be 'stdlib' or a folder of text files, got {corpus!r}")
    files = [
        f for f in root.rglob("*")
        if f.is_file() and not _SKIP_DIRS.intersection(f.relative_to(root).parts)
        and (extensions is None or f.suffix in extensions)
    ]  # fmt: skip
    files.sort(key=lambda f: f.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"no files found in corpus {corpus!r} (root {root})")
    return root, files


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Whether a file (by its ``/``-separated relative path) belongs to the validation split."""
    h = int.from_bytes(hashlib.sha1(relative_path.encode("utf-8")).digest()[:8], "big")
    return h % 1_000_000 < round(val_fraction * 1_000_000)


@dataclass
class TokenizedSplit:
    """All documents of one split, framed and concatenated.

    Attributes:
        tokens: ``[N_tok]`` uint16/int32, documents back to back, each ``[bos] + ids + [eos]``.
        doc_starts: ``[D + 1]`` int64 offsets of the documents in ``tokens`` (last = ``N_tok``).
        fingerprint: hex digest of the tokenizer name, file paths and token counts (checked on resume).
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    fingerprint: str

    @property
    def num_tokens(self) -> int:
        return int(self.doc_starts[-1])

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1


def tokenize_corpus(
    corpus: str,
    tokenizer,
    *,
    val_fraction: float = 0.02,
    extensions: tuple[str, ...] | None = None,
    max_files: int | None = None,
) -> dict[str, TokenizedSplit]:
    """Read, split and tokenize a corpus: ``{"train": ..., "val": ...}``.

    Raises:
        ValueError: bad ``val_fraction`` or a split without documents.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root, files = corpus_files(corpus, extensions=extensions)
    if max_files is not None:
        files = files[:max_files]
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    digests = {"train": hashlib.sha1(tokenizer.name.encode()), "val": hashlib.sha1(tokenizer.name.encode())}
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    frame_b = np.array([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [], dtype=dtype)
    frame_e = np.array([tokenizer.eos_token_id], dtype=dtype)
    for f in files:
        raw = f.read_bytes()
        if b"\0" in raw:
            continue  # binary file
        rel = f.relative_to(root).as_posix()
        ids = tokenizer.encode_array(raw.decode("utf-8", errors="replace")).astype(dtype)
        split = "val" if is_validation(rel, val_fraction) else "train"
        parts[split].append(np.concatenate([frame_b, ids, frame_e]))
        digests[split].update(f"{rel}:{ids.size};".encode())
    out = {}
    for split, docs in parts.items():
        if not docs:
            raise ValueError(f"corpus {corpus!r} has no {split} documents (val_fraction={val_fraction}, "
                             f"{len(files)} files)")  # fmt: skip
        starts = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([d.size for d in docs], out=starts[1:])
        out[split] = TokenizedSplit(np.concatenate(docs), starts, digests[split].hexdigest()[:16])
    return out


@dataclass
class PackedDocs:
    """One packed micro-batch (host metadata built on the CPU).

    Attributes:
        input_ids: ``[T]`` int64.
        cu_seqlens: ``[N + 1]`` int32 segment boundaries (blocks and documents).
        max_seqlen: longest segment (host int).
        num_targets: next-token targets in the batch, ``T - N`` (a segment's first token is nobody's target).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_targets: int

    def to(self, device) -> PackedDocs:
        """The batch with its tensors on ``device``."""
        return PackedDocs(
            self.input_ids.to(device, non_blocking=True), self.cu_seqlens.to(device, non_blocking=True),
            self.max_seqlen, self.num_targets,
        )  # fmt: skip


class BlockStream:
    """The infinite stream of ``seq_len``-token blocks of a split (see the module docstring).

    Args:
        split: the tokenized documents.
        seq_len: ``L``, tokens per block (the longest segment a model sees).
        seed: shuffles the document order of every epoch (epoch ``e`` uses ``(seed, e)``).
        shuffle: ``False`` keeps file order in every epoch (validation).
    """

    def __init__(self, split: TokenizedSplit, seq_len: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def blocks_per_epoch(self) -> int:
        """Whole blocks in one epoch (the last partial block of an epoch continues into the next epoch)."""
        return self.split.num_tokens // self.seq_len

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(order, starts)``: document order of an epoch and each document's start in the epoch stream."""
        if self._epoch is None or self._epoch[0] != epoch:
            n = self.split.num_docs
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            lengths = np.diff(self.split.doc_starts)[order]
            starts = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=starts[1:])
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def span(self, start: int, stop: int) -> tuple[np.ndarray, list[int]]:
        """Tokens ``[start, stop)`` of the stream and the offsets (relative to ``start``) where documents begin."""
        total = self.split.num_tokens
        pieces, doc_offsets = [], []
        pos = start
        while pos < stop:
            epoch, inner = divmod(pos, total)
            order, starts = self._layout(epoch)
            d = int(np.searchsorted(starts, inner, side="right")) - 1
            while pos < stop and d < len(order):
                doc_lo = starts[d]
                take_lo, take_hi = inner, min(starts[d + 1], inner + (stop - pos))
                if take_lo == doc_lo:
                    doc_offsets.append(pos - start)
                src = self.split.doc_starts[order[d]]
                pieces.append(self.split.tokens[src + take_lo - doc_lo : src + take_hi - doc_lo])
                pos += take_hi - take_lo
                inner = take_hi
                d += 1
        return np.concatenate(pieces), doc_offsets

    def batch(self, first_block: int, num_blocks: int) -> PackedDocs:
        """Blocks ``[first_block, first_block + num_blocks)`` packed into one row with ``cu_seqlens``."""
        if first_block < 0 or num_blocks < 1:
            raise ValueError(f"need first_block >= 0 and num_blocks >= 1, got {first_block}, {num_blocks}")
        L = self.seq_len
        tokens, doc_offsets = self.span(first_block * L, (first_block + num_blocks) * L)
        bounds = sorted(set(doc_offsets) | set(range(0, num_blocks * L, L)) | {num_blocks * L})
        cu = np.asarray(bounds, dtype=np.int32)
        return PackedDocs(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            cu_seqlens=torch.from_numpy(cu),
            max_seqlen=int(np.diff(cu).max()),
            num_targets=int(tokens.size - (cu.size - 1)),
        )
