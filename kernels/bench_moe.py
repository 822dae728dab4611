"""Decode and prefill speed of a Qwen3-MoE-shaped model (30B-A3B shapes, random weights, fewer
layers): transformers' fused bf16 experts against compress's experts (split into one Linear per
projection, compress.runtime.moe), in bf16 and INT4 / NVFP4, the compressed ones both through
the per-expert loop and through the grouped kernel (compress/kernels/moe.py, decode-sized calls;
prefill takes the loop in both rows).

    python kernels/bench_moe.py                        # H200: 8 layers, 128 experts, top-8
    python kernels/bench_moe.py --tiny                 # CPU dry run (harness only)
    TRITON_INTERPRET=1 COMPRESS_KERNELS=always python kernels/bench_moe.py --tiny --layers 1 \
        --prompt-len 4 --new-tokens 2 --repeats 1      # CPU: the kernels too (interpreted)
Same harness as bench_e2e.py (compress.evaluation.bench.measure_speed: static KV cache, CUDA
graph when capture works, else eager: the `method` column says which). A short table is printed
last; the full results are appended to --log as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import FORMATS, compress_linears, restore

from compress.evaluation.bench import measure_speed
from compress.runtime import moe
from compress.runtime.moe import fused_experts, unfuse_experts

QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, vocab_size=151936,
                     max_position_embeddings=4096, num_hidden_layers=8)
TINY = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
            num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            vocab_size=1000, max_position_embeddings=512, num_hidden_layers=2)


def build(kwargs: dict, device) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int4,nvfp4")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a small config (CPU dry run)")
    parser.add_argument("--log", default="kernels/bench_moe.log.jsonl")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("use --tiny for a CPU dry run")
    kwargs = dict(TINY if args.tiny else QWEN3_30B_A3B)
    if args.layers:
        kwargs["num_hidden_layers"] = args.layers
    model = build(kwargs, device)
    runs = {}

    def measure(name):
        runs[name] = measure_speed(model, name, 1, args.prompt_len, args.new_tokens,
                                   args.repeats)
        print(f"{name}: {runs[name].decode_tokens_per_s:.1f} tok/s decode", file=sys.stderr)

    assert fused_experts(model), "expected fused 3D experts"
    measure("bf16 fused experts (transformers)")
    unfuse_experts(model)
    measure("bf16 per-expert Linear (compress)")
    grouped_max_rows = moe.GROUPED_MAX_ROWS
    for name in args.formats.split(","):
        originals = compress_linears(model, FORMATS[name])   # every decoder Linear, experts too
        if device.type == "cuda":
            torch.cuda.empty_cache()
        moe.GROUPED_MAX_ROWS = 0   # every call through the per-expert loop
        measure(f"{name} per-expert QuantizedLinear")
        moe.GROUPED_MAX_ROWS = grouped_max_rows
        measure(f"{name} grouped experts kernel (compress)")
        restore(model, originals)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = {"gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "config": kwargs, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    with open(args.log, "a") as log:
        log.writelines(json.dumps({**header, **speed.__dict__}) + "\n" for speed in runs.values())
    print(f"\nQwen3-MoE shapes ({kwargs['num_hidden_layers']} layers, {kwargs['num_experts']} "
          f"experts, top-{kwargs['num_experts_per_tok']}), {gpu}, torch {torch.__version__}")
    print("| weights | decode tok/s (batch 1) | prefill tok/s | peak MB | method | experts' "
          "eager calls |")
    print("|---|---|---|---|---|---|")
    for name, s in runs.items():
        paths = s.kernel_paths.get("model.layers.*.mlp.experts", {})   # graph replays uncounted
        print(f"| {name} | {s.decode_tokens_per_s:.1f} | {s.prefill_tokens_per_s:.0f} | "
              f"{s.peak_memory_mb:.0f} | {s.method} | "
              f"{', '.join(f'{k}: {v}' for k, v in paths.items())} |")


if __name__ == "__main__":
    main()
