"""Load a local HF checkpoint folder into trimformer's own encoder modules.

A folder holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (sharded ``*.index.json``
variants too). Weights are mapped with :mod:`trimformer.models.encoders.weights` (strict keys and shapes, Q/K/V
fused at load time) into a model built on the ``meta`` device, then materialised on ``device`` in ``dtype``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trimformer.models.encoders.config import EncoderConfig
from trimformer.models.encoders.model import EncoderModel
from trimformer.models.encoders.registry import config_from_dict, family_module
from trimformer.models.encoders.weights import from_hf_state_dict

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> ``cuda`` when available else ``cpu``; ``ValueError`` for a device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda'")
    return dev


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None`` -> float32 on CPU, float16 on CUDA; strings ``float32/fp32``, ``float16/fp16``, ``bfloat16/bf16``.

    Raises:
        ValueError: unknown dtype, or one this device cannot run (e.g. bf16 on a GPU without bf16 support).
    """
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = _DTYPES.get(dtype.lower().removeprefix("torch."))
        if resolved is None:
            raise ValueError(f"unknown dtype {dtype!r}; use one of float32/fp32, float16/fp16, bfloat16/bf16")
    elif isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        raise ValueError(f"dtype must be a string or torch.dtype, got {type(dtype).__name__}")
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {resolved}; use float32, float16 or bfloat16")
    if device.type == "cuda" and resolved == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 cannot run on {torch.cuda.get_device_name(device)}; use float16 or float32")
    _probe(device, resolved)
    return resolved


def _probe(device: torch.device, dtype: torch.dtype) -> None:
    """Run the ops an encoder needs once on a tiny input; a device/dtype pair that fails gets a ValueError."""
    import torch.nn.functional as F

    try:
        x = torch.ones(2, 8, device=device, dtype=dtype)
        y = F.layer_norm(F.gelu(F.linear(x, torch.ones(8, 8, device=device, dtype=dtype))), (8,))
        q = y.view(1, 1, 2, 8)
        F.scaled_dot_product_attention(q, q, q)
    except (RuntimeError, NotImplementedError) as exc:
        raise ValueError(f"dtype {dtype} cannot run on {device}: {str(exc).splitlines()[0]}") from None


def read_config(path: str | Path) -> EncoderConfig:
    """Parse ``<path>/config.json``; ``ValueError`` for a missing folder/file or unsupported ``model_type``."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model folder {str(path)!r} does not exist (expected a local folder with config.json)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model folder {str(path)!r} has no config.json")
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object")
    return config_from_dict(d, source=str(cfg_file))


def _weight_files(folder: Path) -> list[Path]:
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = json.loads(path.read_text())
            return [folder / f for f in sorted(set(index["weight_map"].values()))]
        return [path]
    raise ValueError(f"model folder {str(folder)!r} has no weights (looked for {', '.join(_WEIGHT_FILES)})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in ``path`` on the CPU (safetensors preferred; ``.bin`` via weights_only)."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(file), device="cpu"))
        else:
            state.update(torch.load(str(file), map_location="cpu", weights_only=True))
    return state


def load_encoder(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    impl: str = "auto",
) -> EncoderModel:
    """Build an :class:`EncoderModel` from a local HF folder, in eval mode.

    Args:
        path: folder with ``config.json`` and the weights.
        device: ``None`` picks CUDA when available.
        dtype: ``None`` picks float32 on CPU and float16 on CUDA; see :func:`resolve_dtype`.
        impl: op implementation (``"auto"`` by default).

    Raises:
        ValueError: unknown folder, unsupported ``model_type`` (lists the supported ones), missing weights,
            checkpoint keys/shapes that do not match the config, or a dtype the device cannot run.
    """
    config = read_config(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    family = family_module(config.model_type)
    if family is not None:  # DeBERTa-v2, ModernBERT: their own packed model class and key map
        return family.load(path, config, device=dev, dtype=dt, impl=impl)
    shell = EncoderModel(config, impl=impl, device="meta")
    expected = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    mapped = from_hf_state_dict(read_state_dict(path), config, expected, source=f"checkpoint in {str(path)!r}")
    mapped = {k: v.to(device=dev, dtype=dt) for k, v in mapped.items()}
    shell.load_state_dict(mapped, strict=True, assign=True)
    return shell.eval().requires_grad_(False)
