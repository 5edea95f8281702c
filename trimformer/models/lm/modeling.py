"""Llama-style pre-norm causal LM (RMSNorm, SwiGLU) whose attention is any trimformer attention layer.

Each decoder layer is ``h = x + Attn(RMSNorm(x)); y = h + MLP(RMSNorm(h))`` with ``MLP(x) = W_down(silu(W_gate x) *
W_up x)``; the attention layer comes from :func:`trimformer.layers.build_attention` (MHA, GQA, MLA, CCA, CCGQA with
all CCA options), so positions (RoPE) live inside it.

The model computes only on real tokens: a padded batch is unpadded once at the embedding (one host read of the mask)
and every layer runs on packed ``[T, E]`` rows with ``cu_seqlens``; outputs are put back into the caller's layout
at the end. Three input layouts:

* dense ``input_ids [B, S]`` without a mask (no host sync at all; ``[B, 1]`` with a cache is the decode step);
* dense ``[B, S]`` with ``attention_mask [B, S']`` (1 = token; left padding for generation; with a cache the last
  ``S`` columns of the mask describe the new tokens);
* packed ``input_ids [T]`` or ``[1, T]`` with ``cu_seqlens [N + 1]`` int32 (training on packed documents: no
  attention, convolution or loss across documents).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from trimformer.layers import AttentionBase, build_attention
from trimformer.models.lm.cache import TrimformerCache
from trimformer.models.lm.configuration import TrimformerConfig

_IGNORED_KWARGS = ("cache_position", "output_attentions", "return_dict", "token_type_ids", "num_items_in_batch")


# transformers 5.24 renamed the cache field of model outputs from ``past_key_values`` to ``cache`` (the old name stays
# a warning-emitting alias); the outputs below carry whichever name this transformers release reads.
CACHE_FIELD = "cache" if isinstance(getattr(ModelOutput, "past_key_values", None), property) else "past_key_values"


@dataclass
class TrimformerModelOutput(ModelOutput):
    """Output of :class:`TrimformerModel`: ``last_hidden_state`` in the caller's layout, hidden states and the cache
    (field ``cache`` on transformers >= 5.24, ``past_key_values`` before)."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    if CACHE_FIELD == "cache":
        cache: TrimformerCache | None = None
    else:
        past_key_values: TrimformerCache | None = None


@dataclass
class TrimformerCausalLMOutput(ModelOutput):
    """Output of :class:`TrimformerForCausalLM`: ``loss``, ``logits``, ``hidden_states`` and the cache (field
    ``cache`` on transformers >= 5.24, ``past_key_values`` before: the name that release's ``generate`` reads)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    if CACHE_FIELD == "cache":
        cache: TrimformerCache | None = None
    else:
        past_key_values: TrimformerCache | None = None


@dataclass
class _Layout:
    """The caller's layout and the packed metadata every layer shares."""

    cu_seqlens: torch.Tensor  # [N + 1] int32
    max_seqlen: int
    shape: tuple[int, ...]  # (B, S) dense or (T,) / (1, T) packed
    indices: torch.Tensor | None  # [T] flat dense positions of real tokens (masked dense input only)
    dense: bool  # the caller passed [B, S] (columns of a cache advance by S) rather than packed documents

    def restore(self, packed: torch.Tensor) -> torch.Tensor:
        """``[T, F]`` packed rows -> the caller's layout ``[*shape, F]`` (zeros at padding)."""
        if self.indices is None:
            return packed.reshape(*self.shape, packed.shape[-1])
        out = packed.new_zeros(self.shape[0] * self.shape[1], packed.shape[-1])
        out[self.indices] = packed
        return out.reshape(*self.shape, packed.shape[-1])


class TrimformerMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``; ``[*, E] -> [*, E]``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TrimformerDecoderLayer(nn.Module):
    """Pre-norm block: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual (packed ``[T, E]`` rows)."""

    def __init__(self, config: TrimformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = build_attention(config.attention_config, impl=config.attn_impl)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = TrimformerMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, cache=None) -> torch.Tensor:
        """``x [T, E]`` packed rows; ``cache`` an ``AttentionCache`` (entry ``layer_idx`` is advanced in place)."""
        h = x + self.self_attn(
            self.input_layernorm(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache, layer_idx=self.layer_idx
        )
        return h + self.mlp(self.post_attention_layernorm(h))


class TrimformerPreTrainedModel(PreTrainedModel):
    """Weight initialisation and HF plumbing shared by the trimformer LM classes."""

    config_class = TrimformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TrimformerDecoderLayer"]
    _is_stateful = True  # CCA conv / value-shift states cannot be rewound (no assisted decoding)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Linear/embedding ~ N(0, ``initializer_range``), RMSNorm weights 1; attention layers run their own
        ``reset_parameters`` (identity-initialised convolutions, temperature 1) unless some weight was loaded."""
        if isinstance(module, AttentionBase):
            if not any(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                module.reset_parameters()
            return
        super()._init_weights(module)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand us a DynamicCache: the model allocates a TrimformerCache itself


class TrimformerModel(TrimformerPreTrainedModel):
    """Embedding, decoder layers and the final RMSNorm (no LM head)."""

    def __init__(self, config: TrimformerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TrimformerDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _layout(self, x: torch.Tensor, attention_mask, cu_seqlens, max_seqlen, decode: bool) -> tuple:
        """Packed rows ``[T, E]`` of the embedded input ``x`` and their :class:`_Layout`."""
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("pass either attention_mask (dense input) or cu_seqlens (packed input), not both")
            if x.dim() == 3 and x.shape[0] != 1:
                raise ValueError(f"packed input must be [T] or [1, T] tokens, got batch {x.shape[0]}")
            if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
                raise ValueError(f"cu_seqlens must be 1-D int32 [N + 1], got {cu_seqlens.dtype} "
                                 f"{tuple(cu_seqlens.shape)}")  # fmt: skip
            packed = x.reshape(-1, x.shape[-1])
            cu_seqlens = cu_seqlens.to(packed.device)
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            return packed, _Layout(cu_seqlens, max_seqlen, tuple(x.shape[:-1]), None, False)
        if x.dim() != 3:
            raise ValueError(f"dense input must be [B, S] tokens (or packed with cu_seqlens), got {tuple(x.shape)}")
        b, s, e = x.shape
        if attention_mask is None or decode:  # a decode step's new tokens are real whatever the mask says
            cu = torch.arange(b + 1, dtype=torch.int32, device=x.device) * s
            return x.reshape(b * s, e), _Layout(cu, s, (b, s), None, True)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < s:
            raise ValueError(f"attention_mask must be [B, >= S] = [{b}, >= {s}], got {tuple(attention_mask.shape)}")
        mask = attention_mask[:, -s:].to(device=x.device, dtype=torch.bool)
        lengths = mask.sum(1)
        indices = mask.reshape(-1).nonzero().squeeze(1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return x.reshape(b * s, e)[indices], _Layout(cu, int(lengths.max()), (b, s), indices, True)

    def packed_forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: TrimformerCache | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, _Layout, tuple[torch.Tensor, ...] | None]:
        """Run the decoder on packed rows.

        Returns:
            ``(hidden [T, E] after the final norm, layout, per-layer packed hidden states or None)``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dtype not in (torch.int32, torch.int64) or input_ids.dim() not in (1, 2):
                raise ValueError(f"input_ids must be int [B, S] or [T], got {input_ids.dtype} {tuple(input_ids.shape)}")
            if input_ids.dim() == 1 and cu_seqlens is None:
                cu_seqlens = torch.tensor([0, input_ids.shape[0]], dtype=torch.int32, device=input_ids.device)
            x = self.embed_tokens(input_ids)
        else:
            x = inputs_embeds
        if x.dim() == 2 and cu_seqlens is None:
            cu_seqlens = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
        decode = cache is not None and x.dim() == 3 and x.shape[1] == 1 and cu_seqlens is None
        packed, layout = self._layout(x, attention_mask, cu_seqlens, max_seqlen, decode)
        layer_cache = None
        if cache is not None:
            if layout.cu_seqlens.numel() - 1 != cache.attention_cache.batch_size:
                raise ValueError(f"the input holds {layout.cu_seqlens.numel() - 1} sequences but the cache has "
                                 f"{cache.attention_cache.batch_size} rows")  # fmt: skip
            layer_cache = cache.prepare(layout.max_seqlen, layout.shape[1] if layout.dense else layout.max_seqlen)
        states = [packed] if output_hidden_states else None
        h = packed
        for layer in self.layers:
            h = layer(h, layout.cu_seqlens, layout.max_seqlen, layer_cache)
            if states is not None:
                states.append(h)
        h = self.norm(h)
        if states is not None:
            states[-1] = h
        return h, layout, tuple(states) if states is not None else None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: TrimformerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: TrimformerCache | None = None,
        **kwargs,
    ) -> TrimformerModelOutput:
        """Hidden states after the final norm, in the caller's layout (see the module docstring for layouts).

        ``position_ids`` is accepted for API compatibility and not used: positions restart at each sequence's first
        real token and continue from the cache.
        """
        _check_kwargs(kwargs)
        cache = _resolve_cache(self, past_key_values, cache, use_cache, input_ids, inputs_embeds, attention_mask)
        h, layout, states = self.packed_forward(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen, cache=cache, output_hidden_states=bool(output_hidden_states),
        )  # fmt: skip
        states = tuple(layout.restore(s) for s in states) if states is not None else None
        return TrimformerModelOutput(last_hidden_state=layout.restore(h), hidden_states=states, **{CACHE_FIELD: cache})


def _check_kwargs(kwargs: dict) -> None:
    unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions is not supported: the attention kernels never materialise the scores")


def _resolve_cache(model, past_key_values, cache, use_cache, input_ids, inputs_embeds, attention_mask):
    """The :class:`TrimformerCache` of this forward: the one given, a new one when ``use_cache``, or ``None``."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache as either past_key_values or cache, not two different ones")
    given = cache if cache is not None else past_key_values
    if given is not None and not isinstance(given, TrimformerCache):
        if hasattr(given, "get_seq_length") and given.get_seq_length() == 0:
            given = None  # an empty HF cache handed in by a generate() that did not ask us: replace it
        else:
            raise ValueError(f"the cache must be a TrimformerCache (see TrimformerCache.allocate), got "
                             f"{type(given).__name__}")  # fmt: skip
    if given is not None or not use_cache:
        return given
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref.dim() < 2 or (input_ids is not None and ref.dim() != 2):
        raise ValueError("use_cache=True needs dense [B, S] input")
    b, s = ref.shape[:2]
    dtype = model.get_input_embeddings().weight.dtype if inputs_embeds is None else inputs_embeds.dtype
    config = model.config
    return TrimformerCache.allocate(config.attention_config, b, s + 128, num_layers=config.num_hidden_layers,
                                    dtype=dtype, device=ref.device)  # fmt: skip


class TrimformerForCausalLM(TrimformerPreTrainedModel, GenerationMixin):
    """Causal LM: :class:`TrimformerModel` + a linear LM head (optionally tied to the embedding).

    ``generate()`` works with the compressed caches: the model allocates a growable :class:`TrimformerCache` on the
    first forward with ``use_cache=True`` (``generate`` asks for one), or takes one passed in.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TrimformerConfig) -> None:
        super().__init__(config)
        self.model = TrimformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: TrimformerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: TrimformerCache | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> TrimformerCausalLMOutput:
        """Next-token logits (and the mean next-token loss when ``labels`` are given).

        Args:
            input_ids: ``[B, S]`` dense or ``[T]`` / ``[1, T]`` packed (with ``cu_seqlens``) int64 token ids.
            attention_mask: ``[B, S']`` (1 = token) for dense input; with a cache the last ``S`` columns are used.
            position_ids: accepted for API compatibility; positions are derived from the mask/documents/cache.
            past_key_values, cache: a :class:`TrimformerCache` to read and extend (either name).
            inputs_embeds: ``[B, S, E]`` / ``[T, E]`` instead of ``input_ids``.
            labels: same shape as the input ids; position ``t`` is trained to predict ``labels[t + 1]`` of the same
                sequence/document (never across a document boundary or from padding); ``-100`` is ignored.
            use_cache: allocate a growable cache when none is given (``None`` = no cache).
            output_hidden_states: also return the embeddings and every layer's output (caller's layout).
            logits_to_keep: ``k > 0`` returns logits of the last ``k`` positions only (a tensor: those positions).
            cu_seqlens: ``[N + 1]`` int32 document boundaries for packed input.
            max_seqlen: longest document (host int; computed from ``cu_seqlens`` when omitted, a host read).
            return_logits: ``False`` returns ``logits=None`` (training needs only the loss; saves the copy).

        Returns:
            :class:`TrimformerCausalLMOutput` with ``logits [*, V]`` in the caller's layout (zeros at padding).
        """
        _check_kwargs(kwargs)
        cache = _resolve_cache(self, past_key_values, cache, use_cache, input_ids, inputs_embeds, attention_mask)
        h, layout, states = self.model.packed_forward(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen, cache=cache, output_hidden_states=bool(output_hidden_states),
        )  # fmt: skip
        full = isinstance(logits_to_keep, int) and logits_to_keep == 0
        packed_logits = self.lm_head(h) if full or labels is not None else None
        loss = self._loss(packed_logits, labels, layout) if labels is not None else None
        if not return_logits:
            logits = None
        elif full:
            logits = layout.restore(packed_logits)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(layout.restore(h)[..., keep, :])
        states = tuple(layout.restore(s) for s in states) if states is not None else None
        return TrimformerCausalLMOutput(loss=loss, logits=logits, hidden_states=states, **{CACHE_FIELD: cache})

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """Mean cross-entropy (fp32; fp64 for fp64 logits) of packed ``logits [T, V]`` against the next label of the
        same document."""
        if tuple(labels.shape) != layout.shape:
            raise ValueError(f"labels must have the shape of the input ids {layout.shape}, got {tuple(labels.shape)}")
        flat = labels.reshape(-1).to(logits.device)
        targets = (flat[layout.indices] if layout.indices is not None else flat).long()
        t = targets.shape[0]
        starts = torch.zeros(t + 1, dtype=torch.bool, device=logits.device)
        starts[layout.cu_seqlens.long()] = True  # a document's first token is nobody's target
        nxt = torch.where(starts[1:t], torch.full_like(targets[1:], -100), targets[1:])
        wide = logits[:-1] if logits.dtype == torch.float64 else logits[:-1].float()
        return F.cross_entropy(wide, nxt, ignore_index=-100)
