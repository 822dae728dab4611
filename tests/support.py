"""Helpers shared by tests (a plain module, imported as `from support import ...`)."""

from __future__ import annotations

import os
import sys

import torch


def tiny_llama(**overrides):
    """A small random Llama (GQA) for structural tests; exactness only, not accuracy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, **overrides)
    return LlamaForCausalLM(config).eval()


def copy_model_dir(source, target):
    """A copy of a model directory whose small files may be edited; the weights are hard links,
    so replace a .safetensors file (unlink, write) rather than writing into it."""
    import shutil

    def link_weights(src, dst):
        return os.link(src, dst) if str(src).endswith(".safetensors") else shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_weights)
    return target


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `compress ARGS` in this process; returns (exit code, stdout, stderr)."""
    from compress.cli import main

    sys.argv = ["compress", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def byte_tokenizer():
    """A byte-level tokenizer with 256 ids (one per byte), matching tiny_llama's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))},
                                     merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=min(alphabet))


def tiny_model_dir(path, **overrides):
    """tiny_llama saved as a Hugging Face directory (safetensors) with a byte tokenizer."""
    model = tiny_llama(**overrides)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
