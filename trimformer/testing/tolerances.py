"""Tolerances derived from data rather than magic numbers.

The rule (flash-attention, attention-gym): a low-precision kernel's error against a high-precision reference
must stay within ``factor`` times the error of plain PyTorch run in the same low precision, plus a small floor.
"""

from __future__ import annotations

import torch


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| computed in float64."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_2 / ||b||_2 in float64 (0 when both are empty or b is zero and a equals b)."""
    diff = (a.double() - b.double()).norm().item()
    ref = b.double().norm().item()
    return diff / ref if ref > 0 else diff


def assert_close_budget(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    name: str = "output",
) -> None:
    """Assert ``max|actual - reference| <= factor * max|baseline - reference| + floor``.

    Args:
        actual: the result under test (any dtype), same shape as ``reference``.
        reference: the high-precision truth (fp64 or fp32).
        baseline: plain PyTorch computed in the same low precision as ``actual``.
        factor: allowed multiple of the baseline's error.
        floor: absolute slack; defaults to the low-precision epsilon times ``max|reference|``.
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: non-finite values in the result")
    if floor is None:
        eps = torch.finfo(actual.dtype).eps if actual.is_floating_point() else 0.0
        floor = eps * reference.double().abs().max().item()
    err = max_abs(actual, reference)
    base = max_abs(baseline, reference)
    budget = factor * base + floor
    if err > budget:
        raise AssertionError(
            f"{name}: max|err| {err:.3e} > budget {budget:.3e} (= {factor} x baseline {base:.3e} + {floor:.1e}); "
            f"rel_rms {rel_rms(actual, reference):.3e} vs baseline {rel_rms(baseline, reference):.3e}"
        )
