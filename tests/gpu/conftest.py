"""The GPU suite: every test here needs CUDA and is skipped, with the reason, where it is absent.
Run it on its own (`pytest tests/gpu`): tests/kernels/conftest.py turns on Triton's CPU
interpreter, which must stay off here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "kernels")]   # support.py, kernel_checks.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist every worker's torch would start one CPU thread per core (the recipe tests
# make a CPU artifact too): 8 workers x 16 threads on 16 cores oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device: the GPU suite runs on a GPU machine (see tests/gpu/README.md)"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = "TRITON_INTERPRET=1 is set (tests/kernels collected too?): run tests/gpu alone"
    if reason:
        for item in items:
            if "tests/gpu" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(pytest.mark.skip(reason=reason))


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (256 tokens + eos), built in code so the suite
    needs no downloaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>")


def tiny_model():
    """tests/support.py's tiny Llama, wider (group sizes of 64 and 128 divide every input), with
    12 KV groups (the bundled prune-heads recipes remove a ninth of them; hidden 384 stays a
    multiple of the 6 heads left by uniform pruning, which transformers 5 requires at load) and
    the byte tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=384, intermediate_size=768,
                         num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024, eos_token_id=256, bos_token_id=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A small random Llama (GQA, 3 layers, hidden 384) saved with save_pretrained, float32."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
