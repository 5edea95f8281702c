"""ZAYA1 compatibility: build a :class:`~trimformer.layers.cca.CCAttention` from HF transformers' ``ZayaAttention``
(``transformers.models.zaya``) or its state dict, and export one back.

Weight names, relative to a ``ZayaAttention`` module (``model.layers.<i>.self_attn.`` in a full checkpoint):

=========================================  ===========================  ==============================
HF ZAYA                                    trimformer                   shape
=========================================  ===========================  ==============================
``qkv_proj.q_proj.weight`` (``.bias``)     ``q_proj.weight``            ``[Cq, E]``
``qkv_proj.k_proj.weight``                 ``k_proj.weight``            ``[Ck, E]``
``qkv_proj.v_proj_current.weight``         ``v_proj_current.weight``    ``[Ck/2, E]``
``qkv_proj.v_proj_delayed.weight``         ``v_proj_delayed.weight``    ``[Ck/2, E]``
``qkv_proj.conv_qk_depthwise.weight``      ``conv1_weight``             ``[C, 1, k_seq]`` <-> ``[C, k_seq]``
``qkv_proj.conv_qk_depthwise.bias``        ``conv1_bias``               ``[C]``
``qkv_proj.conv_qk_grouped.weight``        ``conv2_weight``             ``[C, d_h, k_ch]``
``qkv_proj.conv_qk_grouped.bias``          ``conv2_bias``               ``[C]``
``qk_norm.temp``                           ``temperature``              ``[h_k]`` (linear temperature)
``o_proj.weight`` (``.bias``)              ``o_proj.weight``            ``[E, Cq]``
=========================================  ===========================  ==============================

ZAYA1 fixes the CCA switches: two convolutions with biases, qk-mean, value shift and a linear temperature. Its
RoPE is the NeoX rotate-half kind with ``partial_rotary_factor`` of the head dims rotated (``rope_type="default"``).

Padding: HF zeroes the hidden states of padding tokens before the projections, so a left-padded row behaves like
the unpadded sequence only when the projections have no bias (ZAYA1: ``attention_bias=False``). With biases, HF's
padding rows carry the projection biases into the conv window and its output depends on the amount of padding;
trimformer drops padding tokens instead and always equals the unpadded run (the HF result without padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trimformer.layers.cca import AttentionConfig, CCAttention

_LINEARS = ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed")


def _rope_params(zaya_config: Any, layer_type: str) -> dict[str, Any]:
    params = zaya_config.rope_parameters or {}
    if "rope_theta" in params:  # a flat (non per-layer-type) dict
        return params
    if layer_type not in params:
        raise ValueError(f"the ZAYA config has no rope parameters for layer type {layer_type!r}")
    return params[layer_type]


def config_from_zaya(zaya_config: Any, layer_idx: int = 0) -> AttentionConfig:
    """The :class:`AttentionConfig` of attention layer ``layer_idx`` of an HF ``ZayaConfig``.

    Raises:
        ValueError: for sliding-window layers or a RoPE type other than ``"default"`` (not implemented here).
    """
    layer_types = getattr(zaya_config, "layer_types", None) or ["hybrid"] * (layer_idx + 1)
    layer_type = layer_types[layer_idx]
    if layer_type != "hybrid":
        raise ValueError(f"ZAYA layer {layer_idx} is {layer_type!r}; only full-attention 'hybrid' layers are supported")
    rope = _rope_params(zaya_config, layer_type)
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only the default RoPE is supported, got rope_type={rope.get('rope_type')!r}")
    hq, hk = zaya_config.num_attention_heads, zaya_config.num_key_value_heads
    return AttentionConfig(
        kind="cca" if hq == hk else "ccgqa",
        hidden_size=zaya_config.hidden_size,
        num_heads=hq,
        num_kv_heads=hk,
        head_dim=zaya_config.head_dim,
        bias=bool(zaya_config.attention_bias),
        rope_theta=float(rope["rope_theta"]),
        rope_fraction=float(rope.get("partial_rotary_factor", 1.0)),
        conv_kernel_seq=zaya_config.cca_time0,
        conv_kernel_ch=zaya_config.cca_time1,
        num_convs=2,
        conv_bias=True,
        qk_mean=True,
        value_shift=True,
        temperature_mode="linear",
        init_std=float(getattr(zaya_config, "initializer_range", 0.02)),
    )


def zaya_config_kwargs(config: AttentionConfig) -> dict[str, Any]:
    """Keyword arguments of an HF ``ZayaConfig`` whose attention layers match ``config``."""
    _check_zaya_compatible(config)
    return {
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "attention_bias": config.bias,
        "cca_time0": config.conv_kernel_seq,
        "cca_time1": config.conv_kernel_ch,
        "rope_parameters": {
            "hybrid": {
                "rope_type": "default",
                "rope_theta": config.rope_theta,
                "partial_rotary_factor": config.rope_fraction,
            },  # fmt: skip
        },
    }


def _check_zaya_compatible(config: AttentionConfig) -> None:
    wanted = {"num_convs": 2, "conv_bias": True, "qk_mean": True, "value_shift": True, "temperature_mode": "linear"}
    wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
    if config.kind not in ("cca", "ccgqa") or wrong:
        raise ValueError(
            f"ZAYA attention needs kind cca/ccgqa with {wanted}; this config has kind={config.kind!r}, {wrong}"
        )


def zaya_state_dict(module: CCAttention, prefix: str = "") -> dict[str, torch.Tensor]:
    """Export ``module``'s weights under HF ``ZayaAttention`` names (each key prefixed by ``prefix``)."""
    _check_zaya_compatible(module.config)
    out: dict[str, torch.Tensor] = {}
    for name in _LINEARS:
        lin = getattr(module, name)
        out[f"{prefix}qkv_proj.{name}.weight"] = lin.weight.detach().clone()
        if lin.bias is not None:
            out[f"{prefix}qkv_proj.{name}.bias"] = lin.bias.detach().clone()
    out[f"{prefix}qkv_proj.conv_qk_depthwise.weight"] = module.conv1_weight.detach()[:, None, :].clone()
    out[f"{prefix}qkv_proj.conv_qk_depthwise.bias"] = module.conv1_bias.detach().clone()
    out[f"{prefix}qkv_proj.conv_qk_grouped.weight"] = module.conv2_weight.detach().clone()
    out[f"{prefix}qkv_proj.conv_qk_grouped.bias"] = module.conv2_bias.detach().clone()
    out[f"{prefix}qk_norm.temp"] = module.temperature.detach().clone()
    out[f"{prefix}o_proj.weight"] = module.o_proj.weight.detach().clone()
    if module.o_proj.bias is not None:
        out[f"{prefix}o_proj.bias"] = module.o_proj.bias.detach().clone()
    return out


@torch.no_grad()
def load_zaya_state_dict(module: CCAttention, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy HF ``ZayaAttention`` weights (keys under ``prefix``) into ``module`` in place.

    Raises:
        ValueError: on a missing key, a shape mismatch, or an incompatible ``module.config``.
    """
    _check_zaya_compatible(module.config)
    targets = zaya_state_dict(module, prefix)
    missing = [k for k in targets if k not in state_dict]
    if missing:
        raise ValueError(f"ZAYA state dict lacks {missing}")
    for key, like in targets.items():
        if tuple(state_dict[key].shape) != tuple(like.shape):
            raise ValueError(f"{key}: shape {tuple(state_dict[key].shape)} != expected {tuple(like.shape)}")
    sd = lambda name: state_dict[prefix + name]
    for name in _LINEARS:
        lin = getattr(module, name)
        lin.weight.copy_(sd(f"qkv_proj.{name}.weight"))
        if lin.bias is not None:
            lin.bias.copy_(sd(f"qkv_proj.{name}.bias"))
    module.conv1_weight.copy_(sd("qkv_proj.conv_qk_depthwise.weight")[:, 0, :])
    module.conv1_bias.copy_(sd("qkv_proj.conv_qk_depthwise.bias"))
    module.conv2_weight.copy_(sd("qkv_proj.conv_qk_grouped.weight"))
    module.conv2_bias.copy_(sd("qkv_proj.conv_qk_grouped.bias"))
    module.temperature.copy_(sd("qk_norm.temp"))
    module.o_proj.weight.copy_(sd("o_proj.weight"))
    if module.o_proj.bias is not None:
        module.o_proj.bias.copy_(sd("o_proj.bias"))


def cca_from_zaya(
    source: Any,
    zaya_config: Any | None = None,
    *,
    layer_idx: int | None = None,
    prefix: str = "",
    impl: str = "auto",
) -> CCAttention:
    """A :class:`CCAttention` holding the weights of an HF ``ZayaAttention`` module or state dict.

    Args:
        source: a ``ZayaAttention`` module, or a state dict with its keys under ``prefix``.
        zaya_config: the ``ZayaConfig`` (default: ``source.config`` for a module).
        layer_idx: the layer's index in the config (default: ``source.layer_idx`` for a module, else 0).
        prefix: key prefix inside a state dict, e.g. ``"model.layers.3.self_attn."``.
        impl: the new layer's ``impl``.

    Returns:
        The layer, on the device and in the dtype of the source weights.
    """
    if isinstance(source, torch.nn.Module):
        zaya_config = source.config if zaya_config is None else zaya_config
        layer_idx = getattr(source, "layer_idx", 0) if layer_idx is None else layer_idx
        state_dict = source.state_dict(prefix=prefix)
    else:
        state_dict = source
    if zaya_config is None:
        raise ValueError("zaya_config is required when building from a state dict")
    config = config_from_zaya(zaya_config, 0 if layer_idx is None else layer_idx)
    ref = state_dict[f"{prefix}o_proj.weight"]
    module = CCAttention(config, impl=impl, device=ref.device, dtype=ref.dtype)
    load_zaya_state_dict(module, state_dict, prefix)
    return module
