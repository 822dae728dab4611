"""Peak memory of `compress apply` on a model larger than we would like to hold in memory.

Builds a Llama-shaped model with random weights on disk, one shard per layer (never the whole
model in memory), then runs `compress apply RECIPE MODEL -o OUT` in a child process and reports
its peak resident memory next to the sizes that bound it: the model, one decoder layer, the
layers-outside part (embeddings, LM head) and the calibration activations.

    python evaluate/bench_memory.py --recipe recipes/int4-gptq.yaml --workdir /tmp/bench-mem
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_random_llama(path: Path, hidden: int, intermediate: int, layers: int, heads: int,
                       kv_heads: int, vocab: int, dtype: torch.dtype) -> int:
    """Write config.json, one safetensors shard per layer and the index; returns bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.models import ARCHES, layers_path

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab,
                         tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."))
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_tokenizer(path)
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    prefix = layers_path(model, ARCHES["llama"]) + "."
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def write(names: list[str], file: str) -> None:
        nonlocal total
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight") else
                       torch.randn(shapes[n], generator=generator) * 0.02).to(dtype)
                   for n in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    for i in range(layers):
        write([n for n in shapes if n.startswith(f"{prefix}{i}.")], f"layer-{i:03d}.safetensors")
    write([n for n in shapes if not n.startswith(prefix)], "rest.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def save_tokenizer(path: Path) -> None:
    """A real tokenizer for the random model (calibration text must be tokenized): SmolLM2's."""
    from transformers import AutoTokenizer

    from compress.runtime.checkpoint import Checkpoint

    source = Checkpoint.open("smollm2-135m")
    AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "int4-rtn.yaml"))
    parser.add_argument("--workdir", default="/tmp/compress-bench-memory")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--vocab", type=int, default=49152)  # SmolLM2's tokenizer is reused
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    work = Path(args.workdir)
    model_dir = work / "model"
    dtype = getattr(torch, args.dtype)
    if not (model_dir / "tokenizer.json").is_file():
        save_tokenizer(model_dir)
    if not (model_dir / "model.safetensors.index.json").is_file():
        build_random_llama(model_dir, args.hidden, args.intermediate, args.layers, 32, 4,
                           args.vocab, dtype)
    files = list(model_dir.glob("*.safetensors"))
    model_bytes = sum(f.stat().st_size for f in files)
    layer_bytes = (model_dir / "layer-000.safetensors").stat().st_size
    rest_bytes = (model_dir / "rest.safetensors").stat().st_size

    from compress.recipe import load_recipe

    calibration = load_recipe(args.recipe).calibration
    activation_bytes = 2 * calibration.samples * calibration.seq_len * args.hidden * 4
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compress", "apply", args.recipe,
                           str(model_dir), "-o", str(work / "out"), "--overwrite",
                           "--dtype", args.dtype], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    mb = lambda n: f"{n / 1e6:,.0f} MB"  # noqa: E731
    print(f"| model on disk ({args.dtype}, {args.layers} layers) | {mb(model_bytes)} |")
    print(f"| one decoder layer | {mb(layer_bytes)} |")
    print(f"| outside the layers (embeddings, LM head, norm) | {mb(rest_bytes)} |")
    print(f"| calibration activations (inputs + outputs, fp32) | {mb(activation_bytes)} |")
    print(f"| **peak resident memory of compress apply** | **{mb(peak)}** |")
    print(f"| bound: rest + 2 layers + activations | {mb(rest_bytes + 2 * layer_bytes + activation_bytes)} (+ fixed overhead) |")
    print(f"| wall time | {seconds:,.0f} s |")


if __name__ == "__main__":
    main()
