"""Padding-free ModernBERT encoder layer: pre-norm, RoPE, GeGLU, global or sliding-window (local) attention.

One layer maps packed hidden states ``[T, H]`` to ``[T, H]``:

    a   = LayerNorm(x)                         (identity in layer 0, whose input is the normed embeddings)
    q, k, v = a @ W_qkv^T                      # fused, no bias unless ``attention_bias``
    q, k = rope(q, cos, sin), rope(k, cos, sin)  # positions restart in every packed sequence
    x   = x + varlen_attention(q, k, v, window=local ? (w, w) : None) @ W_o^T
    u, g = LayerNorm(x) @ W_i^T                # [T, 2I], split in halves
    out = x + (act(u) * g) @ W_o2^T
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trimformer.ops.activation import bias_act, canonical_activation
from trimformer.ops.attention import varlen_attention
from trimformer.ops.norm import add_layer_norm
from trimformer.ops.rope import apply_rotary


class ModernBertLayer(nn.Module):
    """A ModernBERT layer over packed sequences.

    Parameters: ``attn_norm.weight [H]`` (absent in layer 0) and ``.bias`` when ``norm_bias``; ``qkv.weight
    [3H, H]`` (+ ``qkv.bias`` when ``attention_bias``); ``out.weight [H, H]`` (+ bias); ``mlp_norm``;
    ``ffn_in.weight [2I, H]`` (+ bias when ``mlp_bias``); ``ffn_out.weight [H, I]`` (+ bias).

    Args:
        hidden_size, num_heads, intermediate_size: sizes (``I`` is the GLU width).
        activation: HF activation name of the GLU's gated half (``"gelu"`` for GeGLU).
        norm_eps: LayerNorm epsilon; norm_bias, attention_bias, mlp_bias: which biases exist.
        window: ``None`` for a global layer, else the half-width ``w`` (a token sees ``|i - j| <= w``).
        first: layer 0 (no attention LayerNorm).
        impl: op implementation; device, dtype: of the uninitialised parameters.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        activation: str,
        norm_eps: float,
        *,
        norm_bias: bool,
        attention_bias: bool,
        mlp_bias: bool,
        window: int | None,
        first: bool,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads})")
        canonical_activation(activation)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.intermediate_size, self.activation, self.eps = intermediate_size, activation, float(norm_eps)
        self.window, self.impl = window, impl
        kw = {"device": device, "dtype": dtype}
        self.attn_norm = None if first else nn.LayerNorm(hidden_size, eps=self.eps, bias=norm_bias, **kw)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=attention_bias, **kw)
        self.out = nn.Linear(hidden_size, hidden_size, bias=attention_bias, **kw)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=self.eps, bias=norm_bias, **kw)
        self.ffn_in = nn.Linear(hidden_size, 2 * intermediate_size, bias=mlp_bias, **kw)
        self.ffn_out = nn.Linear(intermediate_size, hidden_size, bias=mlp_bias, **kw)

    def extra_repr(self) -> str:
        kind = "global" if self.window is None else f"local(+-{self.window})"
        return (
            f"hidden={self.hidden_size}, heads={self.num_heads}x{self.head_dim}, glu={self.intermediate_size}, "
            f"act={self.activation}, {kind}, impl={self.impl}"
        )

    def _norm(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return add_layer_norm(x, None, norm.weight, norm.bias, eps=self.eps, impl=self.impl)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Run the layer on packed tokens.

        Args:
            x: ``[T, H]`` packed hidden states (the residual stream).
            cu_seqlens: ``[N + 1]`` int32; max_seqlen: host int.
            cos, sin: ``[T, head_dim // 2]`` float32 RoPE tables of this layer type at each token's local position.

        Returns:
            ``[T, H]``.
        """
        t = x.shape[0]
        a = x if self.attn_norm is None else self._norm(x, self.attn_norm)
        h = self.num_heads
        qkv = F.linear(a, self.qkv.weight, self.qkv.bias).view(t, 3, h, self.head_dim)
        qk = apply_rotary(qkv[:, :2].view(t, 2 * h, self.head_dim), cos, sin, impl=self.impl)  # one launch for both
        attn = varlen_attention(qk[:, :h], qk[:, h:], qkv[:, 2], cu_seqlens, max_seqlen, window=self.window,
                                impl=self.impl)  # fmt: skip
        x = x + F.linear(attn.reshape(t, self.hidden_size), self.out.weight, self.out.bias)
        u, gate = F.linear(self._norm(x, self.mlp_norm), self.ffn_in.weight, self.ffn_in.bias).chunk(2, dim=-1)
        g = bias_act(u, None, self.activation, impl=self.impl).mul_(gate)
        return x.add_(F.linear(g, self.ffn_out.weight, self.ffn_out.bias))
