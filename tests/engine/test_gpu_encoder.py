"""GPU end to end: every encoder family on the fast path (Triton kernels, CUDA graphs) against HF transformers.

Three-way rule (flash-attention's BERT test): ours in fp16/bf16 vs HF fp32 must be within 3x the error of HF itself
run in the same low precision; mean-pooled embeddings have cosine >= 0.9999 (fp16) / 0.999 (bf16) against HF fp32.
The forward issues no host synchronisation, with or without CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from trimformer import Encoder

pytestmark = pytest.mark.gpu
LENS = [1, 7, 64, 129, 300, 511]
FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "albert"]
COSINE = {torch.float16: 0.9999, torch.bfloat16: 0.999}


def _config(model_type):
    import transformers as T

    common = {"vocab_size": 1000, "max_position_embeddings": 514}
    return {
        "bert": T.BertConfig(hidden_size=768, num_attention_heads=12, num_hidden_layers=4, intermediate_size=3072,
                             **common),
        "roberta": T.RobertaConfig(hidden_size=768, num_attention_heads=12, num_hidden_layers=3,
                                   intermediate_size=3072, type_vocab_size=1, pad_token_id=1, **common),
        "xlm-roberta": T.XLMRobertaConfig(hidden_size=384, num_attention_heads=6, num_hidden_layers=3,
                                          intermediate_size=1536, pad_token_id=1, **common),
        "distilbert": T.DistilBertConfig(dim=768, n_heads=12, n_layers=3, hidden_dim=3072, vocab_size=1000,
                                         max_position_embeddings=512),
        "albert": T.AlbertConfig(embedding_size=128, hidden_size=768, num_attention_heads=12, num_hidden_layers=4,
                                 intermediate_size=3072, hidden_act="gelu_new", **common),
    }[model_type]  # fmt: skip


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    from transformers import AutoModel

    torch.manual_seed(0)
    cfg = _config(request.param)
    cfg._attn_implementation = "eager"
    hf = AutoModel.from_config(cfg).eval()  # HF's own initialisation (std 0.02): realistic activations
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    pad = 1 if request.param in ("roberta", "xlm-roberta") else 0
    seqs = []
    for n in LENS:
        ids = torch.randint(3, 1000, (n,), generator=g)
        ids[ids == pad] = pad + 2
        seqs.append(ids)
    with torch.no_grad():
        hf32 = hf.to("cuda")
        truth = [hf32(input_ids=s[None].cuda()).last_hidden_state[0].float() for s in seqs]
    return request.param, folder, hf, seqs, truth


def _hf_low(hf, seqs, dtype):
    model = hf.to(dtype)
    with torch.no_grad():
        out = [model(input_ids=s[None].cuda()).last_hidden_state[0].float() for s in seqs]
    hf.to(torch.float32)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_three_way_parity_and_pooled_cosine(family, dtype):
    name, folder, hf, seqs, truth = family
    low = _hf_low(hf, seqs, dtype)
    enc = Encoder.from_pretrained(folder, device="cuda", dtype=dtype)
    batch = enc.pack([s.tolist() for s in seqs])
    assert enc._graphed(batch)
    ours = enc.forward_packed(batch).float()
    enc.use_cuda_graphs = False
    eager = enc.forward_packed(batch).float()
    torch.testing.assert_close(ours, eager, rtol=0, atol=0)  # the graph replays exactly the eager kernels
    cu = batch.cu_seqlens.tolist()
    for i, (t, l) in enumerate(zip(truth, low)):
        o = ours[cu[i] : cu[i + 1]]
        err_ours, err_hf = (o - t).abs().max().item(), (l - t).abs().max().item()
        assert err_ours <= 3 * err_hf + 1e-6, (
            f"{name} {dtype} seq {i} (len {len(t)}): {err_ours:.3e} vs HF {err_hf:.3e}"
        )
        cos = torch.nn.functional.cosine_similarity(o.mean(0), t.mean(0), dim=0).item()
        assert cos >= COSINE[dtype], f"{name} {dtype} seq {i}: pooled cosine {cos:.6f}"


def test_forward_has_no_host_syncs(family):
    name, folder, *_ = family
    enc = Encoder.from_pretrained(folder, device="cuda", dtype=torch.float16)
    batch = enc.pack([[5] * n for n in (3, 90, 200)])
    for graphs in (True, False):
        enc.use_cuda_graphs = graphs
        enc.forward_packed(batch)  # warm: compile kernels, capture the graph
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = enc.forward_packed(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.shape == (293, enc.hidden_size) and torch.isfinite(out).all()


def test_embed_graphs_on_off_and_batch_invariance(family):
    name, folder, *_ = family
    enc = Encoder.from_pretrained(folder, device="cuda", dtype=torch.float16)
    g = torch.Generator().manual_seed(2)
    lists = [torch.randint(3, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 400, (60,), generator=g)]
    with_graphs = enc.embed_token_ids(lists, pooling="mean", normalize=True, batch_tokens=2048)
    alone = enc.embed_token_ids(lists[:5], pooling="mean", normalize=True, batch_tokens=2048)
    enc.use_cuda_graphs = False
    eager = enc.embed_token_ids(lists, pooling="mean", normalize=True, batch_tokens=2048)
    assert enc.graphs.num_graphs > 0
    torch.testing.assert_close(with_graphs, eager, rtol=0, atol=2e-3)
    torch.testing.assert_close(with_graphs[:5], alone, rtol=0, atol=2e-3)


def test_warmup_prepares_buckets_before_traffic(family):
    """``warmup`` runs two forwards per power of two of tokens (long and 32-token sequences), leaving graphs
    captured for those buckets; a later batch of a warmed size replays without capturing anything new."""
    name, folder, *_ = family
    enc = Encoder.from_pretrained(folder, device="cuda", dtype=torch.float16)
    assert enc.graphs.num_graphs == 0
    runs = enc.warmup(256)
    assert runs == 8  # 16 and 32 tokens once (long = short), 64, 128 and 256 twice
    captured = enc.graphs.num_graphs
    assert captured >= 5
    enc.forward_packed(enc.pack([[100] * 32] * 4))  # 128 tokens as 32-token sequences: warmed
    assert enc.graphs.num_graphs == captured
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        enc.warmup(0)
