"""Tolerances and comparisons shared by the kernel tests."""

from __future__ import annotations

import torch

# Tolerance relative to sum_k |x_k| |w_nk| (a bound on the output's size): float32 is exact up
# to summation order; float16 rounds the output (2^-11) and the weight in the dot; bfloat16
# rounds at 2^-8, and the interpreter truncates float32 -> bfloat16 (GPUs round to nearest),
# which doubles the error.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOLERANCE)


def assert_matmul_close(y, ref, x, w_dense, seed=None, bias=None):
    """y, ref: [M, N]; bound each error by TOLERANCE * (|x| @ |w|^T + |bias|) (+ a tiny
    absolute)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, ref.shape, y.dtype)
    assert torch.isfinite(y).all(), f"non-finite output (unwritten elements?) seed={seed}"
    bound = x.float().abs() @ w_dense.float().abs().T
    if bias is not None:
        bound = bound + bias.float().abs()
    err = (y.float() - ref.float()).abs()
    limit = TOLERANCE[x.dtype] * bound + 1e-6
    worst = (err - limit).max()
    assert worst <= 0, f"max error {err.max():.3g} exceeds tolerance (seed={seed})"


def record_launches(monkeypatch, module, kernel_name: str, constexpr: str) -> list:
    """Replaces module.<kernel_name> by a launcher that records the value of one constexpr
    argument of every launch (None where the launch leaves it at its default), then launches
    the real kernel; returns the (growing) list."""
    launched = []
    kernel = getattr(module, kernel_name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs.get(constexpr))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, kernel_name, Spy())
    return launched
