"""The training loop: loss falls, exact resume, torchrun (gloo, 2 processes) DDP/FSDP2 == one process, the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trimformer.cli import main as cli_main
from trimformer.models.lm import TrimformerForCausalLM
from trimformer.train import RunConfig, Trainer
from trimformer.train.metrics import read_log
from trimformer.train.optim import lr_multiplier

REPO = Path(__file__).resolve().parents[2]


def losses(out_dir, kind="train"):
    key = "loss" if kind == "train" else "val_loss"
    return {r["step"]: r[key] for r in read_log(Path(out_dir) / "log.jsonl") if r.get("kind") == kind}


def test_tiny_model_loss_falls_over_30_steps(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "run", max_steps=30, eval_every=15, eval_tokens=2048, plot=True,
                      save_final=True)  # fmt: skip
    result = Trainer(RunConfig.from_dict(cfg)).train()
    train = losses(tmp_path / "run")
    assert sorted(train) == list(range(1, 31))
    first, last = sum(train[s] for s in (1, 2, 3)) / 3, sum(train[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)
    assert result.val_loss == losses(tmp_path / "run", "eval")[30] < losses(tmp_path / "run", "eval")[15]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    loaded = TrimformerForCausalLM.from_pretrained(result.checkpoint)  # the checkpoint is an HF model folder
    assert loaded.config.attention["kind"] == "ccgqa"


def test_resume_gives_the_same_losses(tiny_config, tmp_path):
    full = Trainer(RunConfig.from_dict(tiny_config(tmp_path / "full", max_steps=10))).train()
    cut = tiny_config(tmp_path / "cut", max_steps=10, save_every=4, keep_checkpoints=3)
    Trainer(RunConfig.from_dict(cut)).train()
    # pretend the run died after step 6: the latest checkpoint is step 4, and the log holds steps the resume replays
    ckpts = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000008"]
    shutil.rmtree(ckpts / "step_00000008")
    with open(tmp_path / "cut" / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "train", "step": 6, "loss": 123.0, "tokens": 0}) + "\n")
    resumed = Trainer(RunConfig.from_dict(cut)).train()
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # bit-identical on CPU; the stale record is gone
    assert resumed.train_loss == full.train_loss and resumed.steps == 10


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_multiplier(s, total_steps=10, warmup_steps=3, min_lr_ratio=0.1) for s in range(10)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def _torchrun(config_path, out_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trimformer",
           "train", "--config", str(config_path), "--out-dir", str(out_dir), *extra]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tiny_config, tmp_path, mode):
    cfg = tiny_config(tmp_path / "one", max_steps=6, eval_every=6, eval_tokens=2048, save_every=3)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # one process with grad_accum=2 and two processes with grad_accum=1: the same global batch of 8 blocks
    assert cli_main(["train", "--config", str(path), "--set", "train.grad_accum=2", "--resume", "none"]) == 0
    _torchrun(path, tmp_path / "two", "--distributed", mode)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    assert losses(tmp_path / "two", "eval")[6] == pytest.approx(losses(tmp_path / "one", "eval")[6], rel=1e-5)
    # the 2-process checkpoint (full state gathered to rank 0) resumes in one process
    cfg["train"].update(out_dir=str(tmp_path / "three"), grad_accum=2)
    cfg["train"]["resume"] = str(tmp_path / "two" / "checkpoints" / "step_00000003")
    Trainer(RunConfig.from_dict(cfg)).train()
    three = losses(tmp_path / "three")
    assert sorted(three) == [4, 5, 6]
    for step in three:
        assert three[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "neither a file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    assert cli_main(["train", "--config", str(bad)]) == 2
    assert "lr must be > 0" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(bad), "--set", "train.bogus=1"]) == 2
    assert "unknown train keys" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_bf16_training_and_resume(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "full", max_steps=24, device="cuda", lr=1e-2, eval_every=12, eval_tokens=2048)
    full = Trainer(RunConfig.from_dict(cfg)).train()
    train = losses(tmp_path / "full")
    assert full.tokens_per_s > 0 and sum(train[s] for s in (22, 23, 24)) < sum(train[s] for s in (1, 2, 3)) - 1.5
    cut = tiny_config(tmp_path / "cut", max_steps=24, device="cuda", lr=1e-2, eval_every=12, eval_tokens=2048,
                      save_every=12)  # fmt: skip
    Trainer(RunConfig.from_dict(cut)).train()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000024", ignore_errors=True)
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("step_00000012\n")
    Trainer(RunConfig.from_dict(cut)).train()
    resumed = losses(tmp_path / "cut")
    for step in range(13, 25):  # bf16 kernels need not be bit-deterministic on the GPU
        assert resumed[step] == pytest.approx(train[step], rel=2e-2), step
