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


def artifact_tensors(artifact) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from safetensors.torch import load_file

    found = {}
    for file in sorted(Path(artifact).glob("*.safetensors")):
        found.update(load_file(str(file)))
    return found


def int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """The eight 4-bit codes in each int32 of a packed weight."""
    return torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], -1)


def assert_same_up_to_rounding(one, two) -> None:
    """Two artifacts of one recipe made with the statistics summed in another order (several
    ranks): at most 0.1% of INT4 codes and of 2:4 zeros differ, the rest within 1e-4 relative
    (tests/test_distributed.py says why)."""
    a, b = artifact_tensors(one), artifact_tensors(two)
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("weight_packed"):
            assert (int4_codes(x) == int4_codes(y)).float().mean() >= 0.999, name
        elif x.is_floating_point():
            if name.endswith("proj.weight"):  # pruned: the same zeros, nearly the same rest
                assert ((x == 0) == (y == 0)).float().mean() >= 0.999, name
            tol = 1e-4 * x.abs().max()
            assert torch.allclose(x, y, rtol=1e-4, atol=tol.item()), name
        else:
            assert torch.equal(x, y), name


MOE_FAMILIES = {"mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
                "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2,
                              "moe_intermediate_size": 32},
                "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2,   # + a shared expert
                              "moe_intermediate_size": 32,
                              "shared_expert_intermediate_size": 64},
                "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2}}   # biases


def tiny_moe_dir(path, family: str, fused: bool):
    """A small random MoE (2 layers, 4 experts, top-2; byte vocabulary) saved as a Hugging Face
    directory: its experts per expert under the family's checkpoint names (what save_pretrained
    writes by default, as the original checkpoints), or fused 3D as transformers holds them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=128, **MOE_FAMILIES[family])
    AutoModelForCausalLM.from_config(config).save_pretrained(path, save_original_format=not fused)
    byte_tokenizer().save_pretrained(path)
    return path
