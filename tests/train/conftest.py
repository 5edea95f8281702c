"""Shared fixtures of the training tests: a small real text corpus and a tiny run config."""

import shutil

import pytest
import torch

from trimformer.train.data import corpus_files


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread avoids spin-wait stalls when the CI cores are shared by two workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A folder of 60 real Python source files (4-20 kB each) copied from the standard library."""
    root, files = corpus_files("stdlib")
    picked = [f for f in files if 4_000 <= f.stat().st_size <= 20_000][:60]
    out = tmp_path_factory.mktemp("corpus")
    for f in picked:
        dest = out / f.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    return out


@pytest.fixture
def tiny_config(small_corpus):
    """``make(out_dir, **train)``: a RunConfig dict of a ~0.1M-parameter CCGQA byte LM on the small corpus."""
    return lambda out_dir, **train: _tiny_config(small_corpus, out_dir, **train)


def _tiny_config(corpus, out_dir, **train):
    return {
        "model": {
            "hidden_size": 48,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "attention": {"kind": "ccgqa", "num_heads": 4, "num_kv_heads": 2, "head_dim": 12},
        },
        "data": {"corpus": str(corpus), "seq_len": 64, "val_fraction": 0.15},
        "train": {
            "out_dir": str(out_dir), "micro_batch_size": 4, "max_steps": 12, "lr": 5e-3, "warmup_steps": 2,
            "eval_every": 0, "log_every": 1, "device": "cpu", "progress": False, "plot": False,
            "save_final": False, **train,
        },
    }  # fmt: skip
