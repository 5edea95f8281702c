"""EncoderLayer on packed tokens vs HF's BertLayer on the padded batch (the external oracle), and invariances."""

import pytest
import torch

from trimformer.layers import EncoderLayer
from trimformer.ops.varlen import PackedBatch, unpad

LENS = [1, 2, 17, 64, 129]


def _hf_layer(hidden, heads, inter, act):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = BertConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=inter,
        hidden_act=act,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    return BertLayer(cfg).eval()


def _ours_from_hf(hf, hidden, heads, inter, act, dtype=torch.float32):
    layer = EncoderLayer(hidden, heads, inter, act, 1e-12, dtype=dtype)
    a = hf.attention
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.cat([a.self.query.weight, a.self.key.weight, a.self.value.weight]))
        layer.qkv.bias.copy_(torch.cat([a.self.query.bias, a.self.key.bias, a.self.value.bias]))
        layer.out.load_state_dict(a.output.dense.state_dict())
        layer.attn_norm.load_state_dict(a.output.LayerNorm.state_dict())
        layer.ffn_in.load_state_dict(hf.intermediate.dense.state_dict())
        layer.ffn_out.load_state_dict(hf.output.dense.state_dict())
        layer.ffn_norm.load_state_dict(hf.output.LayerNorm.state_dict())
    return layer.eval()


@pytest.mark.parametrize("hidden,heads,act", [(96, 2, "gelu"), (64, 2, "gelu_new"), (64, 2, "relu")])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_layer_matches_hf_padded_layer(hidden, heads, act, side):
    inter = 3 * hidden + 5
    hf = _hf_layer(hidden, heads, inter, act)
    ours = _ours_from_hf(hf, hidden, heads, inter, act)
    s = max(LENS) + 2
    mask = torch.zeros(len(LENS), s, dtype=torch.long)
    for i, n in enumerate(LENS):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, s - n :] = 1
    x = torch.randn(len(LENS), s, hidden)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        ref = hf(x, additive)
        ref = ref[0] if isinstance(ref, tuple) else ref
        batch = PackedBatch.from_padded(torch.zeros_like(mask), mask)
        out = ours(unpad(x, batch), batch.cu_seqlens, batch.max_seqlen)
    torch.testing.assert_close(out, ref[mask.bool()], rtol=0, atol=1e-5)


def test_layer_is_batch_invariant():
    torch.manual_seed(1)
    layer = _ours_from_hf(_hf_layer(96, 2, 200, "gelu"), 96, 2, 200, "gelu")
    lens = [5, 40, 3, 129, 17]
    batch = PackedBatch.from_token_lists([[0] * n for n in lens])
    x = torch.randn(batch.num_tokens, 96)
    with torch.no_grad():
        together = layer(x, batch.cu_seqlens, batch.max_seqlen)
        bounds = batch.cu_seqlens.tolist()
        for i, n in enumerate(lens):
            alone = layer(x[bounds[i] : bounds[i + 1]], torch.tensor([0, n], dtype=torch.int32), n)
            torch.testing.assert_close(together[bounds[i] : bounds[i + 1]], alone, rtol=0, atol=1e-5)


def test_torch_impl_matches_naive_impl_fp64():
    layer = EncoderLayer(64, 2, 130, "gelu", 1e-12, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    batch = PackedBatch.from_token_lists([[0] * n for n in (1, 33, 7)])
    x = torch.randn(batch.num_tokens, 64, dtype=torch.float64)
    with torch.no_grad():
        layer.impl = "torch"
        a = layer(x, batch.cu_seqlens, batch.max_seqlen)
        layer.impl = "naive"
        b = layer(x, batch.cu_seqlens, batch.max_seqlen)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.interpret
def test_triton_layer_matches_hf_layer():
    """Every op on its Triton kernel (CPU interpreter, fp32): split-K out-projection / FFN2 reduced in the LayerNorm
    kernel, varlen attention, GEMMs with the GELU epilogue; against HF's BertLayer on the padded batch."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton CPU interpreter (TRITON_INTERPRET=1) or a GPU")
    torch.manual_seed(3)
    hf = _hf_layer(64, 2, 96, "gelu")
    ours = _ours_from_hf(hf, 64, 2, 96, "gelu")
    ours.impl = "triton"
    lens = [3, 40, 17]
    batch = PackedBatch.from_token_lists([[0] * n for n in lens])
    x = torch.randn(len(lens), max(lens), 64)
    mask = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    with torch.no_grad():
        ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        ref = hf(x, attention_mask=ext)
        ref = ref[0] if isinstance(ref, tuple) else ref
        out = ours(unpad(x, batch), batch.cu_seqlens, batch.max_seqlen)
    torch.testing.assert_close(out, ref[mask.bool()], rtol=0, atol=2e-5)


def test_layer_rejects_bad_shapes_and_activations():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        EncoderLayer(100, 3, 64)
    with pytest.raises(ValueError, match="unsupported activation"):
        EncoderLayer(64, 2, 64, "mish")
