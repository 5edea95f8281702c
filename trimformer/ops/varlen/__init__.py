"""Packed-batch metadata (``cu_seqlens``, host ``max_seqlen``, restarting position ids) and pad/unpad helpers."""

from trimformer.ops.varlen.naive import naive_pad, naive_padding_mask, naive_unpad
from trimformer.ops.varlen.pack import PackedBatch, check_varlen_metadata, pad, unpad

__all__ = ["PackedBatch", "check_varlen_metadata", "naive_pad", "naive_padding_mask", "naive_unpad", "pad", "unpad"]
