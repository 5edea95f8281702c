"""``trimformer train``: train a causal LM from a YAML config (flags override it).

Examples::

    trimformer train --config train_tiny_cpu                       # bundled config (trimformer/data/*.yaml)
    trimformer train --config my.yaml --set train.lr=1e-3 --set model.attention.kind=gqa --max-steps 500
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --standalone --nproc_per_node=2 -m trimformer train --config train_gpu_30m --distributed fsdp

A run folder gets ``log.jsonl``, ``loss.png`` and ``checkpoints/step_*/`` (HF model folders plus trainer state);
running the same command again resumes from the latest checkpoint (``--resume none`` starts over).
"""

from __future__ import annotations

from pathlib import Path

_SHORTCUTS = {
    "out_dir": "train.out_dir",
    "max_steps": "train.max_steps",
    "max_tokens": "train.max_tokens",
    "device": "train.device",
    "resume": "train.resume",
    "distributed": "train.distributed",
    "seed": "train.seed",
    "precision": "train.precision",
    "time_budget": "train.time_budget_s",
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a causal LM (MHA/GQA/MLA/CCA/CCGQA) on packed documents; torchrun for DDP/FSDP2",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML config file, or the name of a bundled one (train_tiny_cpu, train_gpu_30m, train_gpu_150m, quality)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML value), e.g. --set train.lr=1e-3; repeatable")  # fmt: skip
    p.add_argument("--out-dir", default=None, help="run folder (train.out_dir)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (train.max_steps)")
    p.add_argument("--max-tokens", type=int, default=None, help="training tokens (train.max_tokens)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="train.device")
    p.add_argument("--resume", default=None, help="auto (default), none, or a checkpoint folder (train.resume)")
    p.add_argument("--distributed", choices=("auto", "none", "ddp", "fsdp"), default=None, help="train.distributed")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None, help="train.precision")
    p.add_argument("--seed", type=int, default=None, help="train.seed")
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds (train.time_budget_s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def resolve_config_path(spec: str | None) -> Path | None:
    """A config file path, or ``trimformer/data/<spec>.yaml`` when ``spec`` names a bundled config."""
    if spec is None:
        return None
    path = Path(spec)
    if path.is_file():
        return path
    bundled = Path(__file__).resolve().parents[1] / "data" / f"{spec.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    raise FileNotFoundError(f"config {spec!r} is neither a file nor a bundled config (trimformer/data/*.yaml)")


def run(args) -> int:
    from trimformer.train import Trainer, load_config
    from trimformer.train.distributed import shutdown_distributed

    overrides = list(args.overrides)
    for attr, key in _SHORTCUTS.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_progress:
        overrides.append("train.progress=false")
    config = load_config(resolve_config_path(args.config), overrides)
    try:
        trainer = Trainer(config)
        result = trainer.train()
        if trainer.info.is_main:
            val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
            print(f"trained {result.steps} steps, {result.tokens:,} tokens, {result.params / 1e6:.2f}M params: "
                  f"train loss {result.train_loss:.4f}, val loss {val}, {result.tokens_per_s:,.0f} tokens/s; "
                  f"checkpoint {result.checkpoint}; log {result.out_dir / 'log.jsonl'}")  # fmt: skip
    finally:
        shutdown_distributed()
    return 0
