"""Padding-free DeBERTa-v2/v3 encoder layer (disentangled attention, post-LN) and the optional first-layer conv.

One layer maps packed hidden states ``[T, H]`` to ``[T, H]``:

    qkv  = x @ W_qkv^T + b_qkv                                  # fused Q, K, V GEMM
    a    = disentangled_attention(q, k, v, ..., pos_key=Kr, pos_query=Qr)
    x    = add_layer_norm(a @ W_o^T, x, x_bias=b_o)
    out  = add_layer_norm(act(x @ W_1^T + b_1) @ W_2^T, x, x_bias=b_2)

``Kr``/``Qr`` are the shared relative embeddings (LayerNorm-ed once per forward) through this layer's position
projections (``pos_key_proj``/``pos_query_proj``, or the content key/query projections when ``share_att_key``):
:meth:`DebertaLayer.position_projections` computes them, ``[2 span, heads, head_dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trimformer.ops.activation import bias_act, canonical_activation
from trimformer.ops.disentangled import disentangled_attention
from trimformer.ops.norm import add_layer_norm


class DebertaLayer(nn.Module):
    """A DeBERTa-v2 layer over packed sequences.

    Parameters: ``qkv.weight [3H, H]``/``qkv.bias [3H]``; ``pos_key.weight/bias [H, H]`` (when c2p and not
    ``share_att_key``), ``pos_query.weight/bias`` (when p2c and not shared); ``out``, ``attn_norm``, ``ffn_in``,
    ``ffn_out``, ``ffn_norm`` as in :class:`~trimformer.layers.EncoderLayer`.

    Args:
        hidden_size, num_heads, intermediate_size, activation, layer_norm_eps: the usual sizes.
        relative_attention: add the disentangled terms at all (else plain attention, HF's scale still counts
            ``pos_att_type``).
        c2p, p2c: which terms (``pos_att_type``).
        share_att_key: project the relative embeddings with the content key/query projections.
        position_buckets, max_relative_positions: bucketing (``max_relative_positions`` already resolved, > 0).
        impl: op implementation; device, dtype: of the uninitialised parameters.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        activation: str,
        layer_norm_eps: float,
        *,
        relative_attention: bool,
        c2p: bool,
        p2c: bool,
        share_att_key: bool,
        position_buckets: int,
        max_relative_positions: int,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads})")
        canonical_activation(activation)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.activation, self.eps, self.impl = activation, float(layer_norm_eps), impl
        self.relative_attention = relative_attention
        self.c2p, self.p2c, self.share_att_key = c2p, p2c, share_att_key
        self.position_buckets, self.max_relative_positions = position_buckets, max_relative_positions
        self.scale = (self.head_dim * (1 + int(c2p) + int(p2c))) ** -0.5
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, **kw)
        own_pos = relative_attention and not share_att_key
        self.pos_key = nn.Linear(hidden_size, hidden_size, **kw) if own_pos and c2p else None
        self.pos_query = nn.Linear(hidden_size, hidden_size, **kw) if own_pos and p2c else None
        self.out = nn.Linear(hidden_size, hidden_size, **kw)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=self.eps, **kw)
        self.ffn_in = nn.Linear(hidden_size, intermediate_size, **kw)
        self.ffn_out = nn.Linear(intermediate_size, hidden_size, **kw)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=self.eps, **kw)

    def extra_repr(self) -> str:
        terms = "+".join(t for t, on in (("c2p", self.c2p), ("p2c", self.p2c)) if on) or "none"
        return (
            f"hidden={self.hidden_size}, heads={self.num_heads}x{self.head_dim}, rel={self.relative_attention} "
            f"({terms}, buckets={self.position_buckets}, shared={self.share_att_key}), impl={self.impl}"
        )

    def position_projections(self, rel: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(Kr, Qr)``, each ``[2 span, heads, head_dim]`` or ``None`` when its term is off.

        Args:
            rel: ``[2 span, H]`` relative embeddings (after the encoder's LayerNorm when ``norm_rel_ebd``).
        """
        if not self.relative_attention:
            return None, None
        h = self.hidden_size
        shape = (rel.shape[0], self.num_heads, self.head_dim)
        kr = qr = None
        if self.c2p:
            w, b = (self.qkv.weight[h : 2 * h], self.qkv.bias[h : 2 * h]) if self.share_att_key else (
                self.pos_key.weight, self.pos_key.bias)  # fmt: skip
            kr = F.linear(rel, w, b).view(shape)
        if self.p2c:
            w, b = (self.qkv.weight[:h], self.qkv.bias[:h]) if self.share_att_key else (
                self.pos_query.weight, self.pos_query.bias)  # fmt: skip
            qr = F.linear(rel, w, b).view(shape)
        return kr, qr

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        pos_key: torch.Tensor | None,
        pos_query: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run the layer on packed tokens.

        Args:
            x: ``[T, H]`` packed hidden states.
            cu_seqlens: ``[N + 1]`` int32; max_seqlen: host int.
            pos_key, pos_query: this layer's :meth:`position_projections`.

        Returns:
            ``[T, H]``.
        """
        t = x.shape[0]
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).view(t, 3, self.num_heads, self.head_dim)
        attn = disentangled_attention(
            qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, max_seqlen,
            pos_key=pos_key, pos_query=pos_query,
            c2p=self.relative_attention and self.c2p, p2c=self.relative_attention and self.p2c,
            position_buckets=self.position_buckets, max_relative_positions=self.max_relative_positions,
            scale=self.scale, impl=self.impl,
        )  # fmt: skip
        h = add_layer_norm(
            F.linear(attn.reshape(t, self.hidden_size), self.out.weight), x, self.attn_norm.weight,
            self.attn_norm.bias, eps=self.eps, x_bias=self.out.bias, inplace=True, impl=self.impl,
        )  # fmt: skip
        f = bias_act(F.linear(h, self.ffn_in.weight), self.ffn_in.bias, self.activation, inplace=True, impl=self.impl)
        return add_layer_norm(
            F.linear(f, self.ffn_out.weight), h, self.ffn_norm.weight, self.ffn_norm.bias,
            eps=self.eps, x_bias=self.ffn_out.bias, inplace=True, impl=self.impl,
        )  # fmt: skip


class PackedConv(nn.Module):
    """DeBERTa-v2's ``ConvLayer`` on packed tokens: ``LayerNorm(residual + act(conv1d(x)))``.

    The 1-D convolution (``kernel_size`` odd, ``groups``, zero padding) runs inside each sequence: neighbours
    across a sequence boundary count as zeros, exactly as HF's masked padded layout. A neighbour ``t + o`` is in
    the same sequence iff its local position is ``position[t] + o``.

    Parameters: ``conv.weight [H, H / groups, K]``, ``conv.bias [H]``, ``norm.weight/bias [H]``.
    """

    def __init__(
        self,
        hidden_size: int,
        kernel_size: int,
        groups: int,
        activation: str,
        layer_norm_eps: float,
        *,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be a positive odd integer, got {kernel_size}")
        if groups <= 0 or hidden_size % groups:
            raise ValueError(f"conv_groups ({groups}) must divide hidden_size ({hidden_size})")
        canonical_activation(activation)
        self.kernel_size, self.groups, self.activation, self.eps, self.impl = (
            kernel_size, groups, activation, float(layer_norm_eps), impl)  # fmt: skip
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, groups=groups, **kw)
        self.norm = nn.LayerNorm(hidden_size, eps=self.eps, **kw)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(residual + act(conv(x)))``.

        Args:
            x: ``[T, H]`` the first layer's input (the embeddings); residual: ``[T, H]`` its output.
            positions: ``[T]`` int64 local position of every token in its sequence (starting at 0).

        Returns:
            ``[T, H]``.
        """
        t, h = x.shape
        half = self.kernel_size // 2
        offsets = torch.arange(-half, half + 1, device=x.device)
        idx = torch.arange(t, device=x.device)[:, None] + offsets[None, :]  # [T, K]
        clamped = idx.clamp(0, max(t - 1, 0))
        same_seq = (idx >= 0) & (idx < t) & (positions[clamped] == positions[:, None] + offsets[None, :])
        g = self.groups
        neighbours = (x[clamped] * same_seq[..., None].to(x.dtype)).view(t, self.kernel_size, g, h // g)
        weight = self.conv.weight.view(g, h // g, h // g, self.kernel_size)  # [g, out, in, K]
        y = torch.einsum("tkgi,goik->tgo", neighbours, weight).reshape(t, h)
        y = bias_act(y, self.conv.bias, self.activation, inplace=True, impl=self.impl)
        return add_layer_norm(y, residual, self.norm.weight, self.norm.bias, eps=self.eps, inplace=True, impl=self.impl)
