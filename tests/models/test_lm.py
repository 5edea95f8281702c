"""TrimformerForCausalLM: HF save/load, Auto* registration, cached generate == cache-free greedy decoding, packed
documents == separate documents, padded == packed, loss semantics, parameter accounting and matching."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from trimformer.models.lm import (
    TrimformerCache,
    TrimformerConfig,
    TrimformerForCausalLM,
    model_params,
    param_matched_config,
)
from trimformer.models.lm.sizing import kv_bytes_per_token

E = 32
ATTENTION = {
    "mha": dict(kind="mha", num_heads=4, num_kv_heads=4, head_dim=8, rope_fraction=1.0),
    "gqa": dict(kind="gqa", num_heads=4, num_kv_heads=2, head_dim=8),
    "mla": dict(kind="mla", num_heads=4, head_dim=8, kv_lora_rank=16, q_lora_rank=12, rope_head_dim=4),
    "cca": dict(kind="cca", num_heads=2, num_kv_heads=2, head_dim=8, conv_kernel_seq=3, bias=True),
    "ccgqa": dict(kind="ccgqa", num_heads=4, num_kv_heads=2, head_dim=8, temperature_mode="exp"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread avoids spin-wait stalls when the CI cores are shared by two workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(kind="ccgqa", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(vocab_size=48, hidden_size=E, intermediate_size=48, num_hidden_layers=2, attention=ATTENTION[kind],
                bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.15)  # fmt: skip
    config = TrimformerConfig(**{**args, **overrides})
    model = TrimformerForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # move the CCA convolutions and temperatures away from their identity initialisation
        for name, p in model.named_parameters():
            if "conv" in name or "temperature" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def left_padded(prompts, pad=0):
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), s, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p) :] = p
        mask[i, s - len(p) :] = 1
    return ids, mask


def greedy_without_cache(model, prompt, steps):
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq[None]).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
    return seq[len(prompt) :]


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_generate_with_cache_equals_cache_free_greedy(kind):
    model = make(kind)
    prompts = [torch.randint(3, 48, (n,)) for n in (6, 2, 4)]
    ids, mask = left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)  # fmt: skip
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, ids.shape[1] :], greedy_without_cache(model, p, 12)), f"row {i}"


def test_beam_search_with_cache_equals_without():
    model = make("ccgqa")
    ids, mask = left_padded([torch.randint(3, 48, (n,)) for n in (6, 2, 4)])
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))  # reorder_cache


def test_cache_grows_and_non_growable_cache_refuses():
    model = make("ccgqa")
    prompt = torch.randint(3, 48, (1, 5))
    cache = TrimformerCache.allocate(model.config.attention_config, 1, 1, num_layers=2, dtype=torch.float64)
    first = cache.max_cache_len
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=first + 10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert cache.max_cache_len > first  # reallocated on the way
    assert cache.get_seq_length() == 5 + first + 9  # columns consumed (the last token is never fed back)
    assert torch.equal(out[0, 5:], greedy_without_cache(model, prompt[0], first + 10))
    fixed = TrimformerCache.allocate(model.config.attention_config, 1, 4, num_layers=2, dtype=torch.float64,
                                     growable=False)  # fmt: skip
    with pytest.raises(ValueError, match="positions per sequence"):
        model(torch.randint(3, 48, (1, fixed.max_cache_len + 1)), past_key_values=fixed)


def test_reorder_cache_permutes_rows():
    model = make("cca")
    ids = torch.randint(3, 48, (3, 5))
    nxt = torch.randint(3, 48, (3, 1))
    perm = torch.tensor([2, 0, 0])
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        cache.reorder_cache(perm)
        got = model(nxt, past_key_values=cache).logits[:, -1]
        ref = model(torch.cat([ids[perm], nxt], 1)).logits[:, -1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["ccgqa", "mla", "gqa"])
def test_packed_documents_equal_separate_documents(kind):
    model = make(kind)
    docs = [torch.randint(3, 48, (n,)) for n in (5, 1, 8, 3)]
    packed = torch.cat(docs)
    cu = torch.tensor([0, 5, 6, 14, 17], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed[None], cu_seqlens=cu, labels=packed[None])
        sep = [model(d[None], labels=d[None]) for d in docs]
    torch.testing.assert_close(out.logits[0], torch.cat([s.logits[0] for s in sep]), rtol=0, atol=1e-10)
    # the packed loss is the target-weighted mean of the per-document losses (a 1-token document has no target)
    weighted = sum(s.loss * (len(d) - 1) for s, d in zip(sep, docs) if len(d) > 1) / (len(packed) - len(docs))
    torch.testing.assert_close(out.loss, weighted, rtol=1e-12, atol=0)


def test_padded_batch_equals_packed_and_masked_loss():
    model = make("ccgqa")
    prompts = [torch.randint(3, 48, (n,)) for n in (7, 3, 5)]
    ids, mask = left_padded(prompts)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask, labels=labels)
        packed = model(torch.cat(prompts), cu_seqlens=torch.tensor([0, 7, 10, 15], dtype=torch.int32))
    assert (dense.logits[mask == 0] == 0).all()
    torch.testing.assert_close(dense.logits[mask == 1], packed.logits, rtol=0, atol=1e-10)
    ce = [F.cross_entropy(packed.logits[a : b - 1], torch.cat(prompts)[a + 1 : b], reduction="sum")
          for a, b in ((0, 7), (7, 10), (10, 15))]  # fmt: skip
    torch.testing.assert_close(dense.loss, sum(ce) / (6 + 2 + 4), rtol=1e-12, atol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = make("ccgqa", dtype=torch.float32, tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).attention == model.config.attention
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is TrimformerForCausalLM
    ids = torch.randint(3, 48, (2, 9))
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tie


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_parameter_count_and_kv_bytes(kind):
    model = make(kind)
    assert model_params(model.config) == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0].self_attn.config
    per_token = {"mla": layer.kv_lora_rank + layer.rope_head_dim}.get(kind, 2 * layer.num_kv_heads * layer.head_dim)
    assert kv_bytes_per_token(model.config, "bf16") == 2 * 2 * per_token  # 2 layers x 2 bytes


def test_param_matching_lands_within_one_step():
    target = model_params(make("mha").config)
    step = 3 * E * 2 * 8
    for kind in ("gqa", "mla", "cca", "ccgqa"):
        matched = param_matched_config(make(kind).config, target)
        assert matched.intermediate_size % 8 == 0
        assert abs(model_params(matched) - target) <= step / 2, kind
    with pytest.raises(ValueError, match="target"):
        param_matched_config(make("mha").config, 100)


def test_training_step_reduces_loss_and_reaches_every_parameter():
    model = make("ccgqa", dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(3, 48, (4, 16))
    losses = []
    for _ in range(15):
        loss = model(batch, labels=batch).loss
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="hidden_size"):
        TrimformerConfig(hidden_size=32, attention=dict(ATTENTION["mha"], hidden_size=64))
    with pytest.raises(ValueError, match="bos_token_id"):
        TrimformerConfig(vocab_size=10, bos_token_id=10)
    with pytest.raises(ValueError, match="attn_impl"):
        TrimformerConfig(attn_impl="cuda")
    model = make("gqa")
    ids = torch.randint(3, 48, (2, 4))
    with pytest.raises(ValueError, match="either attention_mask"):
        model(ids.reshape(-1), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), attention_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(TypeError, match="unexpected"):
        model(ids, bogus=1)
    other = TrimformerCache.allocate(model.config.attention_config, 2, 8, num_layers=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="not two different"):
        second = TrimformerCache.allocate(model.config.attention_config, 2, 8, num_layers=2, dtype=torch.float64)
        model(ids, cache=other, past_key_values=second)
    with pytest.raises(NotImplementedError, match="cropped"):
        other.crop(2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mha", "mla", "ccgqa"])
def test_gpu_cached_decode_matches_full_forward_and_bf16_training(kind):
    model = make(kind, dtype=torch.float32).cuda()
    prompts = [torch.randint(3, 48, (n,), device="cuda") for n in (9, 4, 6)]
    ids, mask = left_padded(prompts)
    ids, mask = ids.cuda(), mask.cuda()
    cache = TrimformerCache.allocate(model.config.attention_config, 3, 32, num_layers=2, device="cuda")
    seqs = [p.clone() for p in prompts]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
        for _ in range(4):  # the Triton decode kernels against the varlen kernels of a cache-free forward
            for i, s in enumerate(seqs):
                ref = model(s[None]).logits[0, -1]
                torch.testing.assert_close(logits[i], ref, rtol=1e-3, atol=1e-3)
            nxt = logits.argmax(-1)
            seqs = [torch.cat([s, n[None]]) for s, n in zip(seqs, nxt)]
            logits = model(nxt[:, None], past_key_values=cache).logits[:, -1]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    docs = torch.randint(3, 48, (96,), device="cuda")
    cu = torch.tensor([0, 40, 41, 70, 96], dtype=torch.int32, device="cuda")
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(docs[None], cu_seqlens=cu, max_seqlen=40, labels=docs[None], return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5
