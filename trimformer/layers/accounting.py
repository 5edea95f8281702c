"""Parameters, FLOPs and KV-cache bytes of one attention layer, for every kind (``cca-spec.md`` section 3).

Conventions (those of the paper's Table II):

* FLOPs are ``2 x`` multiply-adds of the matmuls and convolutions; elementwise work (bias adds, norms, RoPE, qk-mean,
  softmax) is not counted.
* Forward attention is counted over the full ``S x S`` score matrix: ``QK^T`` and ``PV`` each cost
  ``2 B S^2 H d`` (a causal kernel does about half of that).
* Decode is one new token per sequence attending to a context of ``S`` cached tokens (itself included). MLA decodes
  in the absorbed form: its KV up-projection is folded into the query and the output instead of being applied to
  the cache.
* Convolutions are counted exactly: depthwise ``C k_seq`` and head-wise grouped ``C d_h k_ch`` weights (``C = Cq +
  Ck``), plus ``C`` per conv bias and ``h_k`` temperatures in the parameters.

:func:`paper_forward_flops` gives the Table II closed forms (conv term omitted), used for the speed-up ratios the
paper quotes.
"""

from __future__ import annotations

from dataclasses import dataclass

from trimformer.layers.cca import AttentionConfig

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (``fp32``, ``bf16``, ``fp16``, ``fp8`` and long forms)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _linear_shapes(config: AttentionConfig) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear projection of the layer."""
    c = config
    e, cq, ck = c.hidden_size, c.q_width, c.kv_width
    if c.kind in ("mha", "gqa"):
        return [(e, cq), (e, ck), (e, ck), (cq, e)]
    if c.kind in ("cca", "ccgqa"):
        return [(e, cq), (e, ck), (e, ck // 2), (e, ck // 2), (cq, e)]
    h, d, dr, r, rq = c.num_heads, c.head_dim, c.rope_head_dim, c.kv_lora_rank, c.q_lora_rank
    q = [(e, rq), (rq, h * (d + dr))] if rq else [(e, h * (d + dr))]
    return [*q, (e, r + dr), (r, 2 * h * d), (h * d, e)]


def _conv_weights(config: AttentionConfig) -> int:
    """Multiply-adds per token of the convolutions (= their weight count)."""
    if config.kind not in ("cca", "ccgqa"):
        return 0
    ch = config.conv_channels
    n = ch * config.conv_kernel_seq if config.num_convs >= 1 else 0
    return n + (ch * config.head_dim * config.conv_kernel_ch if config.num_convs == 2 else 0)


def attention_params(config: AttentionConfig) -> int:
    """Exact parameter count of the layer built from ``config`` (equals ``sum(p.numel())`` of the module)."""
    c = config
    shapes = _linear_shapes(c)
    n = sum(i * o for i, o in shapes)
    if c.bias and c.kind == "mla":  # DeepSeek: biases on the down-projections and the output only
        n += c.q_lora_rank + c.kv_lora_rank + c.rope_head_dim + c.hidden_size
    elif c.bias:
        n += sum(o for _, o in shapes)
    if c.kind in ("cca", "ccgqa"):
        n += _conv_weights(c) + (c.conv_channels * c.num_convs if c.conv_bias else 0) + c.num_kv_heads
    if c.kind == "mla":
        n += c.kv_lora_rank + c.q_lora_rank  # RMSNorm weights of the latents
    return n


def forward_flops(config: AttentionConfig, seq_len: int, batch: int = 1) -> int:
    """Forward FLOPs of ``batch`` sequences of ``seq_len`` tokens (full ``S^2`` attention; see the module notes)."""
    c = config
    tokens = batch * seq_len
    proj = 2 * tokens * (sum(i * o for i, o in _linear_shapes(c)) + _conv_weights(c))
    if c.kind == "mla":
        width = c.num_heads * (c.head_dim + c.rope_head_dim) + c.num_heads * c.head_dim
    else:
        width = 2 * c.q_width
    return proj + 2 * batch * seq_len * seq_len * width


def decode_flops(config: AttentionConfig, context_len: int, batch: int = 1) -> int:
    """FLOPs of decoding one token per sequence over ``context_len`` cached tokens (MLA: absorbed form)."""
    c = config
    if c.kind == "mla":
        h, d, r = c.num_heads, c.head_dim, c.kv_lora_rank
        weights = sum(i * o for i, o in _linear_shapes(c) if (i, o) != (r, 2 * h * d)) + 2 * h * d * r
        attention = context_len * h * ((r + c.rope_head_dim) + r)
    else:
        weights = sum(i * o for i, o in _linear_shapes(c)) + _conv_weights(c)
        attention = context_len * 2 * c.q_width
    return 2 * batch * (weights + attention)


def kv_cache_elements_per_token(config: AttentionConfig) -> int:
    """Cached elements per token per layer: ``2 h_k d_h`` (MHA, GQA, CCA, CCGQA) or ``r + d_rope`` (MLA)."""
    if config.kind == "mla":
        return config.kv_lora_rank + config.rope_head_dim
    return 2 * config.kv_width


def kv_cache_bytes_per_token(config: AttentionConfig, dtype: str = "bf16") -> int:
    """KV-cache bytes per token per layer in ``dtype``."""
    return kv_cache_elements_per_token(config) * dtype_bytes(dtype)


def state_elements_per_sequence(config: AttentionConfig) -> int:
    """Constant per-sequence state of a CCA layer: ``(Cq + Ck) P + Ck/2`` (conv + value shift); 0 otherwise."""
    if config.kind not in ("cca", "ccgqa"):
        return 0
    return config.conv_channels * config.conv_padding + config.kv_width // 2


def paper_forward_flops(config: AttentionConfig, seq_len: int, batch: int = 1) -> int:
    """Table II forward FLOPs (no conv term), reading the compressions off ``config`` with ``E = hidden_size``.

    MHA ``8BSE^2 + 4BES^2``; GQA ``(1 + 1/G) 4BSE^2 + 4BES^2`` with ``G = h / h_kv``; CCA/CCGQA
    ``(1/C1 + 1/C2) 4BSE^2 + 4BES^2/C1`` with ``C1 = E/Cq``, ``C2 = E/Ck``; MLA ``2BSE^2 + 4BSE^2/c_q + 6BSE^2/c_kv
    + 4BES^2`` with ``c_kv = E/r``, ``c_q = E/r_q`` (a full-rank query projection counts as ``c_q = 2``).
    """
    c = config
    e, b, s = c.hidden_size, batch, seq_len
    if c.kind == "mla":
        c_q = e / c.q_lora_rank if c.q_lora_rank else 2.0
        c_kv = e / c.kv_lora_rank
        return round(2 * b * s * e * e + 4 * b * s * e * e / c_q + 6 * b * s * e * e / c_kv + 4 * b * e * s * s)
    c1, c2 = e / c.q_width, e / c.kv_width
    return round((1 / c1 + 1 / c2) * 4 * b * s * e * e + 4 * b * e * s * s / c1)


@dataclass(frozen=True)
class AttentionCost:
    """All counts of one layer at one sequence length (see the module notes for conventions)."""

    name: str
    config: AttentionConfig
    params: int
    forward_flops: int
    paper_forward_flops: int
    decode_flops: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int


def attention_cost(
    config: AttentionConfig, seq_len: int, *, batch: int = 1, dtype: str = "bf16", name: str | None = None
) -> AttentionCost:
    """Parameters, forward FLOPs at ``seq_len``, decode FLOPs at context ``seq_len``, cache and state bytes."""
    nbytes = dtype_bytes(dtype)
    return AttentionCost(
        name=name or config.kind.upper(),
        config=config,
        params=attention_params(config),
        forward_flops=forward_flops(config, seq_len, batch),
        paper_forward_flops=paper_forward_flops(config, seq_len, batch),
        decode_flops=decode_flops(config, seq_len, batch),
        kv_bytes_per_token=kv_cache_bytes_per_token(config, dtype),
        state_bytes_per_sequence=state_elements_per_sequence(config) * nbytes,
    )


def _div(a: int, b: int, what: str) -> int:
    if b < 1 or a % b:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b


def paper_configs(
    hidden_size: int = 2048,
    heads: int = 16,
    head_dim: int | None = None,
    *,
    gqa_groups: int = 4,
    mla_kv_compression: int = 2,
    mla_q_compression: int = 2,
    mla_rope_dim: int | None = None,
    cca_compression: int = 4,
    ccgqa: tuple[int, int] = (2, 8),
    conv_kernels: tuple[int, int] = (2, 2),
    bias: bool = False,
) -> dict[str, AttentionConfig]:
    """The paper's comparison set at one width (defaults: E = 2048, 16 heads of 128; ``cca-spec.md`` 1.9, 3, 5).

    * ``MHA``: ``heads`` x ``head_dim`` (default ``hidden_size / heads``).
    * ``GQA-G``: ``heads`` query heads, ``heads / G`` kv heads.
    * ``MLA``: ``kv_lora_rank = E / mla_kv_compression`` (2 gives the paper's ~4x smaller cache),
      ``q_lora_rank = E / mla_q_compression`` (1 = full-rank queries), RoPE dims ``head_dim / 2`` by default.
    * ``CCA-Cx``: ``heads / C`` query and kv heads of ``head_dim``.
    * ``CCGQA-C1x/C2x``: ``heads / C1`` query and ``heads / C2`` kv heads (ZAYA1: 2 and 8).
    """
    d = head_dim if head_dim is not None else _div(hidden_size, heads, "hidden_size / heads")
    c1, c2 = ccgqa
    if c2 < c1:
        raise ValueError(f"CCGQA needs C2 >= C1 (compress keys/values at least as much as queries), got {c1}, {c2}")
    common = {"hidden_size": hidden_size, "head_dim": d, "bias": bias}
    conv = {"conv_kernel_seq": conv_kernels[0], "conv_kernel_ch": conv_kernels[1]}
    hq_cca = _div(heads, cca_compression, "heads / cca_compression")
    return {
        "MHA": AttentionConfig(kind="mha", num_heads=heads, num_kv_heads=heads, **common),
        f"GQA-{gqa_groups}": AttentionConfig(
            kind="gqa", num_heads=heads, num_kv_heads=_div(heads, gqa_groups, "heads / gqa_groups"), **common
        ),
        f"MLA-{mla_q_compression}x/{mla_kv_compression}x": AttentionConfig(
            kind="mla",
            num_heads=heads,
            num_kv_heads=heads,
            kv_lora_rank=_div(hidden_size, mla_kv_compression, "hidden_size / mla_kv_compression"),
            q_lora_rank=0 if mla_q_compression == 1 else _div(hidden_size, mla_q_compression, "hidden_size / mla_q"),
            rope_head_dim=mla_rope_dim if mla_rope_dim is not None else d // 2,
            **common,
        ),
        f"CCA-{cca_compression}x": AttentionConfig(kind="cca", num_heads=hq_cca, num_kv_heads=hq_cca, **conv, **common),
        f"CCGQA-{c1}x/{c2}x": AttentionConfig(
            kind="ccgqa",
            num_heads=_div(heads, c1, "heads / C1"),
            num_kv_heads=_div(heads, c2, "heads / C2"),
            **conv,
            **common,
        ),
    }
