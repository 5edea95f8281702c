"""``trimformer bench attention``: baselines are picked per timing (eager calls and CUDA-graph replays separately)."""

import argparse
import json

import pytest
import torch

from trimformer.bench import attention as bench


class _Layer:
    sdpa_expand_kv = False
    fused_projection_min_rows = 128


def test_candidates_cover_backends_head_expansion_and_fused_projections():
    args = argparse.Namespace(backends="cudnn,flash")
    labels = [c[0] for c in bench._sdpa_candidates(args, grouped=True, fusable=True)]
    variants = ["", "+fused-qkv", "+expand", "+expand+fused-qkv"]
    assert labels == [f"sdpa-{b}{v}" for b in ("cudnn", "flash") for v in variants]
    assert [c[0] for c in bench._sdpa_candidates(args, grouped=False)] == ["sdpa-cudnn", "sdpa-flash"]
    with pytest.raises(ValueError, match="unknown SDPA backend 'fa3'"):
        bench._sdpa_candidates(argparse.Namespace(backends="cudnn,fa3"), grouped=False)


def test_probe_backends_times_each_candidate_and_skips_those_that_fail():
    layer, seen = _Layer(), []
    grad = torch.zeros(3, requires_grad=True)
    grad.grad = torch.ones(3)
    cost = {"a": 2.0, "c": 1.0, "d": 0.5}
    labels = iter("abcd")

    def call():
        seen.append((layer.sdpa_expand_kv, layer.fused_projection_min_rows))
        label = next(labels)
        if label == "b":
            raise RuntimeError("no kernel for this shape")
        return label

    backend = torch.nn.attention.SDPBackend.MATH
    cands = [("a", backend, False, False), ("b", backend, False, True), ("c", backend, True, False),
             ("d", backend, True, True)]  # fmt: skip
    out = bench._probe_backends(layer, cands, call, (grad,), lambda fn: cost[fn()])
    assert out == {"a": 2.0, "c": 1.0, "d": 0.5}
    assert seen == [(False, None), (False, 0), (True, None), (True, 0)]
    assert layer.sdpa_expand_kv is False and layer.fused_projection_min_rows == 128 and grad.grad is None


@pytest.mark.gpu
def test_graph_rows_use_the_backend_fastest_in_graph_replays(tmp_path):
    from trimformer.bench.common import Recorder
    from trimformer.layers import build_attention

    cfg = bench.method_configs(128)["GQA-8"]
    layer = build_attention(cfg, impl="torch", device="cuda", dtype=torch.bfloat16)
    args = argparse.Namespace(backends="cudnn,flash,efficient", rep_ms=5.0, seed=0)
    rec, logs = Recorder("attention-test", out_dir=tmp_path), []
    bench._layer_point(args, rec, logs.append, cfg, "GQA-8", layer, 1, 1024, "fwd", "torch")
    rows = {r["metric"]: r for r in rec.rows}
    assert set(rows) == {"fwd", "fwd (cuda graph)"}, logs
    labels = {c[0] for c in bench._sdpa_candidates(args, grouped=True, fusable=True)}
    for metric, probe in (("fwd", "probe_ms"), ("fwd (cuda graph)", "probe_graph_ms")):
        times = json.loads(rows[metric]["params"])[probe]
        assert len(times) >= 4 and set(times) <= labels, times  # cuDNN and flash run this shape
        assert rows[metric]["provider"] == "pytorch:" + min(times, key=times.get)
    assert layer.fused_projection_min_rows is None and layer.sdpa_expand_kv is False
