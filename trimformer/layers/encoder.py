"""Padding-free post-LN Transformer encoder layer (BERT, RoBERTa, XLM-R, DistilBERT, ALBERT) on packed tokens.

One layer maps packed hidden states ``[T, H]`` to ``[T, H]``; it never sees padding. It computes through the
functional ops so kernels can be swapped without touching models:

    qkv  = linear(x, W_qkv, b_qkv)               # one fused GEMM, W_qkv [3H, H]: qkv [T, 3, heads, head_dim]
    a    = varlen_attention(q, k, v, cu_seqlens, max_seqlen)   # q, k, v: strided views of qkv, no copies
    x    = linear_add_layer_norm(a, W_o, b_o, x, ln1)          # LayerNorm(a W_o + b_o + x): GEMM + one fused kernel
    f    = linear(x, W_1, b_1, act)                            # [T, I], bias + activation fused after the GEMM
    out  = linear_add_layer_norm(f, W_2, b_2, x, ln2)

On CUDA (``impl="auto"``) that is cuBLAS for the GEMMs, the Triton varlen attention kernel reading Q, K and V
straight out of the fused QKV output, the fused bias + residual + LayerNorm kernel, and the fused bias + exact GELU
kernel after the FFN GEMM (a Triton GEMM with that epilogue exists, ``linear(impl="triton")``, but measured slower
than cuBLAS on the H100): 8 kernels per layer, no host syncs. Below 512 tokens the out-projection and FFN2 may
instead run as a split-K Triton GEMM whose fp32 partial products the add + LayerNorm kernel sums (measured per
shape, ``linear_add_layer_norm``); still two kernels each. Up to 1024 tokens on sm_90+ the Triton kernels launch
with programmatic dependent launch (``trimformer.ops.triton_utils.pdl_mode``): each starts, and prefetches its
weights into L2, while the previous one runs, and the tuner then also puts the small-M QKV and out-projection GEMMs
on Triton. On CPU every op takes its PyTorch path with in-place epilogues on the GEMM temporaries.
"""

from __future__ import annotations

import torch
from torch import nn

from trimformer.ops.activation import canonical_activation
from trimformer.ops.attention import varlen_attention
from trimformer.ops.linear import linear, linear_add_layer_norm


class EncoderLayer(nn.Module):
    """A post-LN encoder layer over packed sequences.

    Parameters (names are the keys of :meth:`state_dict`):
        ``qkv.weight`` ``[3H, H]`` and ``qkv.bias`` ``[3H]`` (query rows first, then key, then value);
        ``out.weight`` ``[H, H]``, ``out.bias`` ``[H]``; ``attn_norm.weight/bias`` ``[H]``;
        ``ffn_in.weight`` ``[I, H]``, ``ffn_in.bias`` ``[I]``; ``ffn_out.weight`` ``[H, I]``, ``ffn_out.bias`` ``[H]``;
        ``ffn_norm.weight/bias`` ``[H]``.

    Args:
        hidden_size: ``H``.
        num_heads: attention heads; ``H`` must be a multiple of it.
        intermediate_size: ``I``.
        activation: an HF activation name (``"gelu"``, ``"gelu_new"``, ``"relu"``, ...).
        layer_norm_eps: LayerNorm epsilon.
        impl: implementation passed to every op (``"auto"``, ``"torch"``, ``"naive"``, ``"triton"``).
        device, dtype: where and in which dtype the parameters are created (uninitialised: load weights after).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-12,
        *,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads})")
        canonical_activation(activation)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.eps = float(layer_norm_eps)
        self.impl = impl
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, **kw)
        self.out = nn.Linear(hidden_size, hidden_size, **kw)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=self.eps, **kw)
        self.ffn_in = nn.Linear(hidden_size, intermediate_size, **kw)
        self.ffn_out = nn.Linear(intermediate_size, hidden_size, **kw)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=self.eps, **kw)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, heads={self.num_heads}x{self.head_dim}, "
            f"intermediate={self.intermediate_size}, act={self.activation}, impl={self.impl}"
        )

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Run the layer on packed tokens.

        Args:
            x: ``[T, H]`` packed hidden states (the dtype of the parameters).
            cu_seqlens: ``[N + 1]`` int32 on ``x``'s device; pass the same tensor object to every layer of a forward.
            max_seqlen: longest sequence as a host ``int``.

        Returns:
            ``[T, H]``.
        """
        t, impl = x.shape[0], self.impl
        qkv = linear(x, self.qkv.weight, self.qkv.bias, impl=impl).view(t, 3, self.num_heads, self.head_dim)
        attn = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, max_seqlen, impl=impl)
        h = linear_add_layer_norm(
            attn.reshape(t, self.hidden_size),
            self.out.weight,
            self.out.bias,
            x,
            self.attn_norm.weight,
            self.attn_norm.bias,
            eps=self.eps,
            impl=impl,
        )
        f = linear(h, self.ffn_in.weight, self.ffn_in.bias, self.activation, impl=impl)
        return linear_add_layer_norm(
            f,
            self.ffn_out.weight,
            self.ffn_out.bias,
            h,
            self.ffn_norm.weight,
            self.ffn_norm.bias,
            eps=self.eps,
            impl=impl,
        )
