"""Process-group setup for ``torchrun`` launches and model wrapping with DDP or FSDP2.

Launch (one node, two GPUs; the NCCL variables keep NVLink multicast/NVLS off, which some hosts cannot use)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --standalone --nproc_per_node=2 -m trimformer train --config cfg.yaml --set train.distributed=fsdp

:func:`init_distributed` sets those three variables itself (``setdefault``) before NCCL starts, so a launch that
forgets them still gets them. Several nodes: ``torchrun --nnodes=N --node_rank=i --rdzv_backend=c10d
--rdzv_endpoint=HOST:PORT ...`` with the same training command. CPU runs use the gloo backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

NCCL_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, and its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``) and pick this process's device.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Returns:
        The :class:`DistInfo`; a single process gets rank 0 of 1 and no process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        for key, value in NCCL_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local, dev)


def shutdown_distributed() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum host floats over all processes (float64 on the device; identity for one process)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def wrap_model(model: nn.Module, mode: str, info: DistInfo, *, bf16: bool) -> nn.Module:
    """Wrap for data parallelism.

    Args:
        model: a ``TrimformerForCausalLM`` already on ``info.device``.
        mode: ``"none"``, ``"ddp"`` or ``"fsdp"`` (FSDP2: ``fully_shard`` on every decoder layer, then the root; with
            ``bf16`` the parameters are gathered in bf16 and gradients reduced in fp32).
        info: this process.
        bf16: the run computes in bf16.

    Returns:
        The module to call in the training loop (the model itself for ``"none"`` and FSDP2).
    """
    if mode == "none":
        return model
    if not info.enabled:
        raise ValueError(f"train.distributed={mode!r} needs a torchrun launch with more than one process")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kw = {"mp_policy": mp} if mp is not None else {}
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model
    raise ValueError(f"unknown distributed mode {mode!r}; expected none, ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The ``TrimformerForCausalLM`` inside a DDP wrapper (FSDP2 modules are their own model)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
