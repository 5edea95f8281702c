"""RoPE op: rotate-half formula vs the complex-number reference and vs HF transformers (external oracle)."""

import pytest
import torch
from transformers.models.zaya.configuration_zaya import ZayaConfig
from transformers.models.zaya.modeling_zaya import ZayaRotaryEmbedding
from transformers.models.zaya.modeling_zaya import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from trimformer.ops.rope import apply_rotary, naive_apply_rotary, naive_rotary_cos_sin, rotary_cos_sin


@pytest.mark.parametrize("rotary_dim", [0, 2, 8, 16])
@pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["packed", "dense"])
def test_apply_rotary_matches_complex_reference(rotary_dim, lead):
    x = torch.randn(*lead, 3, 16, dtype=torch.float64)
    pos = torch.randint(0, 1000, lead)
    cos, sin = rotary_cos_sin(pos, rotary_dim, 10000.0, dtype=torch.float64)
    out = apply_rotary(x, cos, sin, rotary_dim)
    ref = naive_apply_rotary(x, cos, sin, rotary_dim)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])  # NoPE dims pass through bit-exactly
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)
    torch.testing.assert_close(apply_rotary(x, cos, sin, impl="naive"), ref, rtol=0, atol=0)


def test_cos_sin_match_reference_and_hf():
    pos = torch.arange(0, 5000, 37)
    cos, sin = rotary_cos_sin(pos, 64, 5e6, dtype=torch.float64)
    rcos, rsin = naive_rotary_cos_sin(pos, 64, 5e6, dtype=torch.float64)
    torch.testing.assert_close(cos, rcos, rtol=0, atol=1e-12)
    torch.testing.assert_close(sin, rsin, rtol=0, atol=1e-12)
    config = ZayaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=128)
    hf_cos, hf_sin = ZayaRotaryEmbedding(config)(torch.zeros(1), pos[None], "hybrid")  # fp32, halves duplicated
    cos32, sin32 = rotary_cos_sin(pos, 64, 5e6)
    torch.testing.assert_close(cos32, hf_cos[0, :, :32], rtol=0, atol=0)
    torch.testing.assert_close(sin32, hf_sin[0, :, 32:], rtol=0, atol=0)


def test_partial_rotation_matches_hf_apply_rotary_pos_emb():
    q = torch.randn(1, 4, 9, 16)  # HF layout [B, H, S, D]
    k = torch.randn(1, 2, 9, 16)
    pos = torch.arange(3, 12)
    cos, sin = rotary_cos_sin(pos, 8, 10000.0)
    hf_q, hf_k = hf_apply_rotary_pos_emb(q, k, torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None])
    ours_q = apply_rotary(q[0].transpose(0, 1), cos, sin)  # [S, H, D]
    ours_k = apply_rotary(k[0].transpose(0, 1), cos, sin)
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


def test_scores_depend_only_on_relative_position():
    q = torch.randn(1, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 8, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rotary_cos_sin(torch.tensor([pq]), 8, 100.0, dtype=torch.float64)
        ck, sk = rotary_cos_sin(torch.tensor([pk]), 8, 100.0, dtype=torch.float64)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-10)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-6)


def test_low_precision_rounds_once():
    x = torch.randn(5, 2, 8, dtype=torch.bfloat16)
    cos, sin = rotary_cos_sin(torch.arange(5), 8, 10000.0)
    out = apply_rotary(x, cos, sin)
    ref = naive_apply_rotary(x.double(), cos.double(), sin.double())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref.to(torch.bfloat16).double(), rtol=0, atol=0)


def test_bad_inputs_raise():
    x = torch.randn(4, 2, 8)
    cos, sin = rotary_cos_sin(torch.arange(4), 4, 10000.0)
    with pytest.raises(ValueError, match="rotary_dim must be an even"):
        rotary_cos_sin(torch.arange(4), 3, 10000.0)
    with pytest.raises(ValueError, match="integer tensor"):
        rotary_cos_sin(torch.arange(4.0), 4, 10000.0)
    with pytest.raises(ValueError, match="cos/sin must both be"):
        apply_rotary(x, cos, sin, 6)
    with pytest.raises(ValueError, match="leading dims"):
        apply_rotary(x, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="rotary_dim must be even and <= head dim"):
        apply_rotary(torch.randn(4, 2, 2), cos, sin)
    with pytest.raises(ValueError, match="rotary_cos_sin has no kernel"):
        rotary_cos_sin(torch.arange(4), 4, 10000.0, impl="triton")
    with pytest.raises(ValueError, match="cannot run apply_rotary: dtype torch.float64"):
        apply_rotary(x.double(), cos, sin, impl="triton")
    with pytest.raises(ValueError, match="cannot run apply_rotary: inputs require grad"):
        apply_rotary(x.requires_grad_(), cos, sin, impl="triton")
    with pytest.raises(ValueError, match="cannot run apply_rotary: cos/sin dtype torch.float64"):
        apply_rotary(x.detach(), cos.double(), sin.double(), impl="triton")


# ----------------------------------------------------------------------------------------- Triton kernel


def _kernel_case(tokens, heads, dim, rotary_dim, dtype, device, qkv_view):
    """Rotate ``[T, heads, dim]`` with the kernel (optionally a strided ``[T, heads, dim]`` view of a fused QKV
    buffer, as ModernBERT passes it) and compare with the fp64 reference; also compare PyTorch's own error."""
    g = torch.Generator().manual_seed(tokens * 31 + heads)
    if qkv_view:  # queries and keys of a [T, 3, heads/2, dim] buffer: token stride 3/2 x the view's row
        buf = torch.randn(tokens, 3, heads // 2, dim, generator=g).to(device, dtype)
        x = buf[:, :2].view(tokens, heads, dim)
    else:
        x = torch.randn(tokens, heads, dim, generator=g).to(device, dtype)
    pos = torch.randint(0, 4000, (tokens,), generator=g).to(device)
    cos, sin = rotary_cos_sin(pos, rotary_dim, 10000.0)
    before = x.clone()
    out = apply_rotary(x, cos, sin, rotary_dim, impl="triton")
    assert torch.equal(x, before)  # not in place
    ref = naive_apply_rotary(x.double().cpu(), cos.double().cpu(), sin.double().cpu(), rotary_dim)
    torch_err = (apply_rotary(x, cos, sin, rotary_dim, impl="torch").double().cpu() - ref).abs().max().item()
    err = (out.double().cpu() - ref).abs().max().item()
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)


@pytest.mark.parametrize(("tokens", "heads", "dim", "rotary_dim"), [(1, 2, 16, 16), (37, 6, 48, 32), (70, 4, 16, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("qkv_view", [False, True], ids=["dense", "qkv-view"])
def test_kernel_matches_reference_cpu(tokens, heads, dim, rotary_dim, dtype, qkv_view):
    _kernel_case(tokens, heads, dim, rotary_dim, dtype, "cpu", qkv_view)


@pytest.mark.gpu
@pytest.mark.parametrize(("tokens", "heads", "dim", "rotary_dim"), [(4772, 24, 64, 64), (1000, 16, 128, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference_gpu(tokens, heads, dim, rotary_dim, dtype):
    _kernel_case(tokens, heads, dim, rotary_dim, dtype, "cuda", qkv_view=True)
    x = torch.randn(8, 4, 64, device="cuda", dtype=dtype)
    cos, sin = rotary_cos_sin(torch.arange(8, device="cuda"), 64, 10000.0)
    with torch.no_grad():  # auto takes the kernel on CUDA without autograd, and it equals impl="triton"
        assert torch.equal(apply_rotary(x, cos, sin), apply_rotary(x, cos, sin, impl="triton"))
