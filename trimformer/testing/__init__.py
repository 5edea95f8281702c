"""Shared helpers for tests and benchmarks: tolerance rules and seeded input factories."""

from trimformer.testing.tolerances import assert_close_budget, max_abs, rel_rms

__all__ = ["assert_close_budget", "max_abs", "rel_rms"]
