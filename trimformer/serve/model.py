"""The model behind the server: an :class:`~trimformer.Encoder`, plus a sequence-classification head for
cross-encoders and classifiers.

Tokenization runs in the batcher's tokenizer-stage threads; each thread tokenizes with its own
:class:`~trimformer.Encoder` view that shares the model's weights but owns a tokenizer (HF fast tokenizers must not
be called from two threads at once). The model itself runs on one thread only (the batcher's worker) through
:meth:`ServedModel.run`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from trimformer.engine.batching import plan_batches
from trimformer.engine.encoder import Encoder, default_model_path
from trimformer.engine.st_config import read_st_settings
from trimformer.engine.tokenization import Tokenized, has_tokenizer
from trimformer.models.encoders.heads import ClassifierConfig, SequenceClassificationHead, classifier_config, load_head

EMBED, CLASSIFY = "embed", "classify"
#: Texts on which a thread's raw Rust tokenizer must reproduce :meth:`Encoder.tokenize` before the server uses it.
_PROBE = (
    "",
    "A man is eating food.",
    "  Leading, trailing  and   inner   spaces  ",
    "naïve café — ÜNÏCÖDÉ ✓ 日本語 한국어 עברית 🙂",
    "[CLS] [SEP] [MASK] <s> </s> <mask> [UNK] tokens typed by a user",
    "tabs\tand\nnewlines\r\n, 'quotes' \"double\" and punctuation!?;:",
    "MiXeD CaSe WoRdS and numbers 3.14159 1,000,000",
)


class ServedModel:
    """An encoder served over HTTP: ``kind`` is ``"embedding"`` or ``"classifier"``.

    Args:
        encoder: the loaded encoder.
        head: the sequence-classification head of a classifier checkpoint, else ``None``.
        classifier: its :class:`~trimformer.models.encoders.heads.ClassifierConfig` (with ``head``).
        model_id: the name reported by the API (default: the folder name).
    """

    def __init__(
        self,
        encoder: Encoder,
        head: SequenceClassificationHead | None = None,
        classifier: ClassifierConfig | None = None,
        *,
        model_id: str | None = None,
    ) -> None:
        if (head is None) != (classifier is None):
            raise ValueError("pass head and classifier together (or neither)")
        self.encoder = encoder
        self.head = head
        self.classifier = classifier
        self.model_id = model_id or Path(encoder.name_or_path).name
        self._st = read_st_settings(encoder.name_or_path)
        self._local = threading.local()

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        model_id: str | None = None,
        cuda_graphs: bool = True,
    ) -> ServedModel:
        """Load a model folder (``None``: the packaged all-MiniLM-L6-v2, reported as ``all-MiniLM-L6-v2``).

        A folder whose ``config.json`` names a ``*ForSequenceClassification`` architecture is served as a
        classifier (``/predict``, and ``/rerank`` when it has one label); any other as an embedding model.
        """
        if path is None:
            path = default_model_path()
            model_id = model_id or "all-MiniLM-L6-v2"
        encoder = Encoder.from_pretrained(path, device=device, dtype=dtype, cuda_graphs=cuda_graphs)
        head = info = None
        if classifier_config(path) is not None:
            head, info = load_head(path, encoder.config, device=encoder.device)
        return cls(encoder, head, info, model_id=model_id)

    # ------------------------------------------------------------------ description
    @property
    def kind(self) -> str:
        return "classifier" if self.head is not None else "embedding"

    @property
    def is_reranker(self) -> bool:
        """A classifier with a single logit: a cross-encoder whose score ranks ``(query, text)`` pairs."""
        return self.classifier is not None and self.classifier.num_labels == 1

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def vocab_size(self) -> int:
        return self.encoder.config.vocab_size

    @property
    def output_width(self) -> int:
        """Width of one result row: the hidden size for embeddings, ``num_labels`` for classifiers."""
        return self.classifier.num_labels if self.classifier is not None else self.encoder.hidden_size

    def info(self) -> dict:
        """Model facts for ``GET /info``."""
        enc = self.encoder
        out = {
            "model_id": self.model_id,
            "model_path": enc.name_or_path,
            "model_family": enc.model_type,
            "model_dtype": str(enc.dtype).removeprefix("torch."),
            "device": str(enc.device),
            "max_input_length": enc.max_length,
            "hidden_size": enc.hidden_size,
        }
        if self.classifier is None:
            out["model_type"] = {"embedding": {"pooling": enc.default_pooling, "normalize": enc.default_normalize}}
        else:
            c = self.classifier
            key = "reranker" if self.is_reranker else "classifier"
            out["model_type"] = {
                key: {
                    "id2label": {str(i): name for i, name in enumerate(c.id2label)},
                    "label2id": {name: i for i, name in enumerate(c.id2label)},
                    "problem_type": c.problem_type,
                }
            }
        return out

    # ------------------------------------------------------------------ tokenization (stage threads)
    def _thread_encoder(self) -> Encoder:
        view = getattr(self._local, "encoder", None)
        if view is None:
            view = Encoder(self.encoder.model, self.encoder.name_or_path, st_settings=self._st, cuda_graphs=False)
            view.tokenizer  # noqa: B018 - load it now, in this thread
            self._local.encoder = view
        return view

    def warm_thread(self) -> None:
        """Load this thread's tokenizer, so the first request does not pay for it (no-op for a folder without
        tokenizer files: such a model serves token-id inputs only)."""
        if has_tokenizer(self.encoder.name_or_path):
            self.tokenize(["warm up"])

    def load_tokenizer(self) -> None:
        """Load the shared encoder's tokenizer once, in the calling thread: transformers imports its tokenizer
        modules lazily, and concurrent first imports from the pool threads can fail."""
        if has_tokenizer(self.encoder.name_or_path):
            self.encoder.tokenize(["warm up"])

    def tokenize(self, texts: list[str]) -> Tokenized:
        """Token ids of ``texts``, over-long ones cut to :attr:`max_length` (their indices in ``.truncated``): what
        :meth:`Encoder.tokenize` returns.

        The caller decides whether truncation was allowed (it answers 413 otherwise); cutting first and checking
        after costs a second pass only over the over-long inputs. The first pass goes straight to this thread's copy
        of the Rust tokenizer when that copy reproduces :meth:`Encoder.tokenize` (see :meth:`_raw_tokenizer`),
        skipping transformers' per-text Python conversion (it held the GIL ~40 us per text, time the event loop
        needs at one text per request).
        """
        enc = self._thread_encoder()
        raw = self._raw_tokenizer()
        if raw is None:
            return enc.tokenize(texts, truncate=True)
        return self._tokenize_raw(enc, raw, texts)

    def _tokenize_raw(self, enc: Encoder, raw, texts: list[str]) -> Tokenized:
        lowered = [t.lower() for t in texts] if self._st.do_lower_case else texts
        ids = [e.ids for e in raw.encode_batch(lowered, add_special_tokens=True)]
        limit = self.max_length
        long = [i for i, row in enumerate(ids) if len(row) > limit]
        if long:
            cut = enc.tokenize([texts[i] for i in long], truncate=True).input_ids
            for i, row in zip(long, cut):
                ids[i] = row
        return Tokenized(ids, None, tuple(long))

    def _raw_tokenizer(self):
        """This thread's copy of the Rust ``tokenizers.Tokenizer`` (truncation and padding off), or ``None`` when
        the model has no fast tokenizer or the copy does not give :meth:`Encoder.tokenize`'s ids on a probe set."""
        if not hasattr(self._local, "raw"):
            self._local.raw = None
            enc = self._thread_encoder()
            backend = getattr(enc.tokenizer, "backend_tokenizer", None)
            if backend is not None:
                from tokenizers import Tokenizer

                raw = Tokenizer.from_str(backend.to_str())
                raw.no_truncation()
                raw.no_padding()
                raw.encode_special_tokens = bool(getattr(enc.tokenizer, "split_special_tokens", False))
                probe = [*_PROBE, " ".join(["probe"] * (self.max_length + 8))]
                if self._tokenize_raw(enc, raw, probe) == enc.tokenize(probe, truncate=True):
                    self._local.raw = raw
        return self._local.raw

    def tokenize_pairs(self, first: list[str], second: list[str]) -> Tokenized:
        """Token ids and segment ids of ``(first[i], second[i])`` pairs (``longest_first`` truncation)."""
        return self._thread_encoder().tokenize_pairs(first, second, truncate=True)

    # ------------------------------------------------------------------ model (worker thread)
    def run(
        self,
        kind: str,
        input_ids: Sequence[Sequence[int]],
        token_type_ids: Sequence[Sequence[int]] | None,
        batch_tokens: int,
    ) -> torch.Tensor:
        """One model call over a packed window of sequences.

        Args:
            kind: ``"embed"`` (pooled, not normalised) or ``"classify"`` (head logits).
            input_ids: ``N`` token-id lists (special tokens included, each within :attr:`max_length`).
            token_type_ids: segment ids of the same shapes, or ``None``.
            batch_tokens: token budget per forward.

        Returns:
            ``[N, D]`` float32 on the CPU, rows in input order (``D`` = :attr:`output_width`).
        """
        if kind == EMBED:
            if self.head is not None:
                raise ValueError("this model is a classifier; it does not produce embeddings")
            return self.encoder.embed_token_ids(
                input_ids, token_type_ids=token_type_ids, normalize=False, batch_tokens=batch_tokens
            )
        if kind != CLASSIFY:
            raise ValueError(f"unknown job kind {kind!r}")
        if self.head is None:
            raise ValueError("this model has no classification head")
        enc = self.encoder
        batches = plan_batches([len(ids) for ids in input_ids], enc.forward_tokens(batch_tokens))
        chunks = []
        with torch.inference_mode():
            for rows in batches:
                types = None if token_type_ids is None else [token_type_ids[i] for i in rows]
                batch = enc.pack([input_ids[i] for i in rows], types)
                chunks.append(self.head(enc.forward_packed(batch), batch.cu_seqlens))
            logits = torch.cat(chunks).cpu()
        out = torch.empty_like(logits)
        out[torch.tensor([i for rows in batches for i in rows])] = logits
        return out
