"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when a kernel is
decorated), so it is set here, at conftest import, before any test module imports a kernel.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a kernel writes starts as NaN, so unwritten elements fail."""
    from compress.kernels import _common

    monkeypatch.setattr(_common, "POISON", True)


@pytest.fixture
def rng():
    """A fresh generator per test (new inputs every run); failures print rng.initial_seed()."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
