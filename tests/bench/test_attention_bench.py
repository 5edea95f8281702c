"""``trimformer bench attention``: baselines are picked per timing (eager calls and CUDA-graph replays separately)."""

import argparse
import json

import pytest
import torch

from trimformer.bench import attention as bench


class _Layer:
    sdpa_expand_kv = False


def test_probe_backends_times_each_candidate_and_skips_those_that_fail():
    layer, seen = _Layer(), []
    grad = torch.zeros(3, requires_grad=True)
    grad.grad = torch.ones(3)
    cost = {"sdpa-cudnn": 2.0, "sdpa-flash": 1.0, "sdpa-flash+expand": 0.5}

    def timer(fn):
        label = fn()
        seen.append((label, layer.sdpa_expand_kv))
        if label == "sdpa-efficient":
            raise RuntimeError("no kernel for this shape")
        return cost[label]

    cands = [("sdpa-cudnn", "C", False), ("sdpa-efficient", "E", False), ("sdpa-flash", "F", False),
             ("sdpa-flash+expand", "F", True)]  # fmt: skip
    backends = iter(["sdpa-cudnn", "sdpa-efficient", "sdpa-flash", "sdpa-flash+expand"])
    out = bench._probe_backends(layer, cands, lambda: next(backends), (grad,), timer)
    assert out == {"sdpa-cudnn": 2.0, "sdpa-flash": 1.0, "sdpa-flash+expand": 0.5}
    assert seen == [("sdpa-cudnn", False), ("sdpa-efficient", False), ("sdpa-flash", False),
                    ("sdpa-flash+expand", True)]  # fmt: skip
    assert layer.sdpa_expand_kv is False and grad.grad is None


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
    for metric, probe in (("fwd", "probe_ms"), ("fwd (cuda graph)", "probe_graph_ms")):
        params = json.loads(rows[metric]["params"])
        times = params[probe]
        assert len(times) == 6  # three backends, each with and without expanding K/V to the query heads
        assert rows[metric]["provider"] == "pytorch:" + min(times, key=times.get)
