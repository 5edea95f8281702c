"""The training loop: packed documents, AdamW + cosine schedule, bf16 autocast, clipping, checkpoints, exact resume.

One optimizer step consumes a global batch of ``G = micro_batch_size * grad_accum * world_size`` blocks of the
training stream (``trimformer.train.data``): process ``r`` takes, at micro-step ``m``, the ``micro_batch_size`` blocks
starting at ``position + (m * world_size + r) * micro_batch_size``. The loss is the mean over every next-token
target of the global batch (each micro-batch's mean is weighted by its share of the global target count), so one
process with ``grad_accum = k`` and ``k`` processes with ``grad_accum = 1`` compute the same loss and gradients up to
float summation order.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trimformer.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from trimformer.train.config import RunConfig
from trimformer.train.data import BlockStream, PackedDocs, TokenizedSplit, tokenize_corpus
from trimformer.train.distributed import DistInfo, all_reduce_sum, init_distributed, unwrap, wrap_model
from trimformer.train.metrics import JsonlLog, plot_losses
from trimformer.train.optim import build_optimizer, build_scheduler
from trimformer.train.tokenizer import load_tokenizer


@dataclass
class TrainResult:
    """Summary of a finished run (identical on every rank)."""

    steps: int
    tokens: int
    train_loss: float
    val_loss: float | None
    tokens_per_s: float
    train_time_s: float
    params: int
    out_dir: Path
    checkpoint: Path | None
    stopped_early: bool


def build_model_config(model_args: dict[str, Any], tokenizer):
    """The :class:`TrimformerConfig` of a run: ``vocab_size`` defaults to the tokenizer's rounded up to 64, the
    special ids to the tokenizer's; ``match_params`` (optional) resizes the MLP to about that many parameters."""
    from trimformer.models.lm import TrimformerConfig, param_matched_config

    args = dict(model_args)
    target = args.pop("match_params", None)
    args.setdefault("vocab_size", -(-tokenizer.vocab_size // 64) * 64)
    if args["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size {args['vocab_size']} < tokenizer vocabulary {tokenizer.vocab_size}")
    args.setdefault("bos_token_id", tokenizer.bos_token_id)
    args.setdefault("eos_token_id", tokenizer.eos_token_id)
    args.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = TrimformerConfig(**args)
    return param_matched_config(config, int(target)) if target else config


class Trainer:
    """Runs one training job described by a :class:`RunConfig` (single process or one rank of a torchrun launch).

    Args:
        run: the configuration.
        splits: already tokenized ``{"train", "val"}`` splits (a sweep reuses them); tokenized here when ``None``.
    """

    def __init__(self, run: RunConfig, *, splits: dict[str, TokenizedSplit] | None = None) -> None:
        from trimformer.models.lm import TrimformerForCausalLM, model_params

        self.run = run
        t = run.train
        self.info: DistInfo = init_distributed(t.device)
        self.device = self.info.device
        self.tokenizer = load_tokenizer(run.data.tokenizer)
        exts = tuple(run.data.extensions) if run.data.extensions else None
        self.splits = splits or tokenize_corpus(
            run.data.corpus, self.tokenizer, val_fraction=run.data.val_fraction, extensions=exts,
            max_files=run.data.max_files,
        )  # fmt: skip
        self.seq_len = run.data.seq_len
        self.train_stream = BlockStream(self.splits["train"], self.seq_len, seed=t.seed)
        self.val_stream = BlockStream(self.splits["val"], self.seq_len, shuffle=False)
        torch.manual_seed(t.seed)  # identical initialisation on every rank
        self.config = build_model_config(run.model, self.tokenizer)
        self.model = TrimformerForCausalLM(self.config).to(self.device)
        self.params = model_params(self.config)
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        mode = t.distributed
        if mode == "auto":
            mode = "ddp" if self.info.enabled else "none"
        self.mode = mode
        self.wrapped = wrap_model(self.model, mode, self.info, bf16=self.bf16)
        if t.compile:
            self.wrapped = torch.compile(self.wrapped)
        fused = self.device.type == "cuda" and mode != "fsdp"
        self.optimizer = build_optimizer(
            self.model, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, eps=t.eps, fused=fused
        )
        self.global_blocks = t.micro_batch_size * t.grad_accum * self.info.world_size
        tokens_per_step = self.global_blocks * self.seq_len
        self.total_steps = math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens else t.max_steps
        self.scheduler = build_scheduler(
            self.optimizer, total_steps=self.total_steps, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio
        )
        self.out_dir = Path(t.out_dir)
        self.log = JsonlLog(self.out_dir / "log.jsonl", enabled=self.info.is_main)
        self.step = 0
        self.data_position = 0
        self.tokens_seen = 0
        self.fingerprint = f"{self.splits['train'].fingerprint}-{self.splits['val'].fingerprint}-L{self.seq_len}"

    # ----- pieces ---------------------------------------------------------------------------------------------
    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _loss(self, module, batch: PackedDocs) -> torch.Tensor:
        ids = batch.input_ids[None]
        with self._autocast():
            out = module(
                input_ids=ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen, labels=ids, return_logits=False
            )
        return out.loss

    def _micro_batches(self) -> list[PackedDocs]:
        t, w, r = self.run.train, self.info.world_size, self.info.rank
        return [
            self.train_stream.batch(self.data_position + (m * w + r) * t.micro_batch_size, t.micro_batch_size)
            for m in range(t.grad_accum)
        ]

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns ``(this process's share of the global mean loss, grad_norm)`` as device scalars
        (no host sync; the shares of all processes sum to the loss)."""
        t = self.run.train
        batches = self._micro_batches()
        (total,) = all_reduce_sum([float(sum(b.num_targets for b in batches))], self.info)
        scale = self.info.world_size / total  # DDP/FSDP average gradients over processes
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.wrapped.train()
        for m, host in enumerate(batches):
            batch = host.to(self.device)
            sync = m == len(batches) - 1 or self.mode != "ddp"
            ctx = contextlib.nullcontext() if sync else self.wrapped.no_sync()
            with ctx:
                loss = self._loss(self.wrapped, batch)
                (loss * (batch.num_targets * scale)).backward()
            loss_sum += loss.detach().float() * batch.num_targets
        if t.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        else:
            grad_norm = torch.zeros((), device=self.device)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.data_position += self.global_blocks
        self.tokens_seen += self.global_blocks * self.seq_len
        return loss_sum / total, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over the first ``eval_tokens`` tokens of the validation split (all ranks agree)."""
        t = self.run.train
        blocks = min(t.eval_tokens // self.seq_len, self.val_stream.blocks_per_epoch)
        if blocks < 1:
            return None
        per = min(t.micro_batch_size, blocks)
        starts = list(range(0, blocks, per))
        w, r = self.info.world_size, self.info.rank
        rounds = math.ceil(len(starts) / w)  # every rank runs the same number of forwards (FSDP2 collectives)
        module = self.wrapped if self.mode == "fsdp" else unwrap(self.wrapped)
        module.eval()
        loss_sum, count = 0.0, 0.0
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(rounds):
            j = i * w + r
            real = j < len(starts)
            s = starts[j] if real else starts[0]
            batch = self.val_stream.batch(s, min(per, blocks - s)).to(self.device)
            loss = self._loss(module, batch)
            if real:
                sums += torch.stack([loss.double() * batch.num_targets, loss.new_tensor(batch.num_targets).double()])
        loss_sum, count = all_reduce_sum(sums.tolist(), self.info)
        return loss_sum / count

    def save(self) -> Path:
        """Checkpoint now (collective)."""
        return save_checkpoint(
            self.out_dir, self.model, self.optimizer, self.scheduler, self.info, step=self.step,
            data_position=self.data_position, tokens_seen=self.tokens_seen, run_config=self.run.to_dict(),
            data_fingerprint=self.fingerprint, keep=self.run.train.keep_checkpoints,
        )  # fmt: skip

    def maybe_resume(self) -> Path | None:
        """Resume from ``train.resume`` (``"auto"``: the latest checkpoint of ``out_dir``, if any)."""
        spec = self.run.train.resume
        if spec == "none":
            return None
        path = find_checkpoint(self.out_dir) if spec == "auto" else Path(spec)
        if path is None:
            return None
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.info)
        if state["data_fingerprint"] != self.fingerprint:
            raise ValueError(f"{path} was trained on other data ({state['data_fingerprint']} vs {self.fingerprint}): "
                             "same corpus, tokenizer and seq_len are needed to resume")  # fmt: skip
        self.step, self.data_position, self.tokens_seen = state["step"], state["data_position"], state["tokens_seen"]
        self.log.truncate_after(self.step)
        return path

    def _should_stop(self, started: float) -> bool:
        budget = self.run.train.time_budget_s
        if budget is None:
            return False
        (flag,) = all_reduce_sum([float(time.perf_counter() - started > budget)], self.info)
        return flag > 0

    # ----- the run --------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Train to ``total_steps`` (or the time budget); returns the :class:`TrainResult`."""
        from tqdm.auto import tqdm

        t = self.run.train
        resumed = self.maybe_resume()
        if resumed is None:
            self.log.reset()
        self.log.write({"kind": "run", "event": "resume" if resumed else "start", "step": self.step,
                        "checkpoint": str(resumed) if resumed else None, "world_size": self.info.world_size,
                        "distributed": self.mode, "bf16": self.bf16, "device": str(self.device),
                        "params": self.params, "total_steps": self.total_steps, "pid": os.getpid()})  # fmt: skip
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (t.progress and self.info.is_main),
                   unit="step", dynamic_ncols=True)  # fmt: skip
        started = time.perf_counter()
        last_loss, val_loss, stopped, ckpt = float("nan"), None, False, None
        acc_loss = torch.zeros((), device=self.device)
        acc_steps, timed_tokens, timed_s = 0, 0, 0.0
        mark, mark_tokens = None, self.tokens_seen
        while self.step < self.total_steps:
            loss, grad_norm = self._train_step()
            acc_loss += loss
            acc_steps += 1
            bar.update(1)
            if mark is None:  # the first step (kernel autotuning, allocator warm-up) is not timed
                _sync(self.device)
                mark, mark_tokens = time.perf_counter(), self.tokens_seen
            last = self.step == self.total_steps
            stopped = not last and self._should_stop(started)
            if self.step % t.log_every == 0 or last or stopped:
                _sync(self.device)
                now = time.perf_counter()
                (last_loss,) = all_reduce_sum([(acc_loss / acc_steps).item()], self.info)  # ranks hold shares
                if self.tokens_seen > mark_tokens:
                    timed_tokens += self.tokens_seen - mark_tokens
                    timed_s += now - mark
                rate = timed_tokens / timed_s if timed_s > 0 else float("nan")
                self.log.write({"kind": "train", "step": self.step, "tokens": self.tokens_seen, "loss": last_loss,
                                "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                                "tokens_per_s": rate, "elapsed_s": now - started,
                                "peak_mem_gib": _peak_mem_gib(self.device)})  # fmt: skip
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{rate:,.0f}")
                acc_loss.zero_()
                acc_steps = 0
                mark, mark_tokens = now, self.tokens_seen
            if t.eval_every and (self.step % t.eval_every == 0 or last or stopped):
                val_loss = self.evaluate()
                if val_loss is not None:
                    self.log.write({"kind": "eval", "step": self.step, "tokens": self.tokens_seen,
                                    "val_loss": val_loss})  # fmt: skip
                    if t.plot and self.info.is_main:
                        plot_losses(self.log.path, self.out_dir / "loss.png", title=self._title())
                _sync(self.device)
                mark, mark_tokens = time.perf_counter(), self.tokens_seen
            if (t.save_every and self.step % t.save_every == 0) or (t.save_final and (last or stopped)):
                ckpt = self.save()
                mark, mark_tokens = time.perf_counter(), self.tokens_seen
            if stopped:
                break
        bar.close()
        rate = timed_tokens / timed_s if timed_s > 0 else float("nan")
        self.log.write({"kind": "run", "event": "end", "step": self.step, "tokens": self.tokens_seen,
                        "train_loss": last_loss, "val_loss": val_loss, "tokens_per_s": rate,
                        "peak_mem_gib": _peak_mem_gib(self.device), "world_size": self.info.world_size,
                        "stopped_early": stopped})  # fmt: skip
        if t.plot and self.info.is_main and self.log.path.exists():
            with contextlib.suppress(ValueError):
                plot_losses(self.log.path, self.out_dir / "loss.png", title=self._title())
        return TrainResult(self.step, self.tokens_seen, last_loss, val_loss, rate, timed_s, self.params,
                           self.out_dir, ckpt, stopped)  # fmt: skip

    def _title(self) -> str:
        a = self.config.attention_config
        return (f"{a.kind} {a.num_heads}/{a.num_kv_heads}x{a.head_dim}, {self.params / 1e6:.1f}M params, "
                f"L={self.seq_len}")  # fmt: skip


def _peak_mem_gib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated by this process so far (GiB); ``None`` on CPU. Reads allocator stats: no sync."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
