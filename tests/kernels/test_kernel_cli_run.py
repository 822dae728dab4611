"""`compress generate` and `compress bench` end to end on the CPU (reference path, labelled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from compress.formats import WeightFormat, codec
from compress.formats.artifact import save_artifact
from compress.passes.quantize import replace_with_quantized


@pytest.fixture(scope="module")
def tiny_artifact(smollm2, tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer, every decoder linear INT4 g32 (speed and
    plumbing only: random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    fmt = WeightFormat(group_size=32, symmetric=False)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            q = codec(fmt).quantize(module.weight.data, fmt)
            replace_with_quantized(model, name, module, q)
    out = tmp_path_factory.mktemp("art") / "tiny-int4"
    save_artifact(model, smollm2.tokenizer, out, "passes: []\n", {})
    return out


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    env.pop("COMPRESS_KERNELS", None)
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_generate_streams_greedy_tokens_and_reports_paths(tiny_artifact):
    first = run_cli("generate", str(tiny_artifact), "def add(a, b):", "--max-new-tokens", "6")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("def add(a, b):")
    assert len(first.stdout) > len("def add(a, b):") + 1
    assert "model.layers.*.mlp.down_proj: {'reference (cpu)'" in first.stderr
    again = run_cli("generate", str(tiny_artifact), "def add(a, b):", "--max-new-tokens", "6")
    assert again.stdout == first.stdout  # greedy is deterministic


def test_bench_measures_artifact_and_baseline_labelled_cpu(tiny_artifact, tmp_path):
    out = tmp_path / "speed.json"
    result = run_cli("bench", str(tiny_artifact), "--prompt-len", "8", "--new-tokens", "3",
                     "--repeats", "1", "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["label"] for r in rows] == [str(tiny_artifact), "dequantized baseline"]
    for row in rows:
        assert row["method"] == "cpu eager" and row["device"] == "cpu"
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
    # 2 layers x (2 prefills + 1 prefill and 3 steps of decode)
    assert rows[0]["kernel_paths"]["model.layers.*.self_attn.q_proj"] == {"reference (cpu)": 12}
    assert rows[1]["kernel_paths"] == {}  # the baseline holds plain nn.Linear layers


def test_bench_on_missing_cuda_is_a_usage_error(tiny_artifact):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("bench", str(tiny_artifact), "--device", "cuda")
    assert result.returncode == 2
    assert "no CUDA device is available" in result.stdout + result.stderr


def test_static_cache_harness_runs_on_cpu():
    """The static-cache harness (the CUDA path minus the graph capture) runs prefill and decode
    steps and says how it measured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.evaluation.bench import measure_static

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    prefill_s, step_s, method = measure_static(model, 1, 6, 4, 1)
    assert method == "cpu eager + static cache" and prefill_s > 0 and step_s > 0
