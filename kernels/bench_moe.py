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

--block-tokens adds one MoE block alone (layer 0's experts, random routing, distinct experts
per token) at T tokens: microseconds per call of the fused bf16 module, the per-expert loop,
the grouped kernel eager and replayed as a CUDA graph, against the floor of reading the routed
experts' weights once at 4.3 TB/s (H200 measured copy), and the grouped output's largest
difference from the loop's (relative to the loop's largest value).
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
from compress.runtime.moe import GROUPED_MAX_ROWS, fused_experts, unfuse_experts

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


# bytes per weight with the group scales (INT4 g128 bf16 scales, NVFP4 E4M3 per 16)
BYTES_PER_WEIGHT = {"bf16": 2.0, "int4": 0.5 + 2 / 128, "nvfp4": 0.5 + 1 / 16,
                    "int4-asym": 0.5 + 2.5 / 128, "mxfp4": 0.5 + 1 / 32}


def routed(experts: int, hidden: int, tokens: int, top_k: int, device):
    """hidden [T, D] bf16, top-k index [T, k] (distinct experts per token), weights [T, k]."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    index = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1).to(device, torch.bfloat16)
    return x, index.to(device), weights


def time_us(fn, device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def as_graph(fn):
    for _ in range(2):   # compile, stack the experts, settle allocations
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.inference_mode()
def block_rows(experts, weights: str, kwargs: dict, token_counts, device, reps: int) -> list:
    """Rows of the block table for one experts module (fused or ExpertMLPs) in `weights`."""
    e, d, f, k = (kwargs[key] for key in ("num_experts", "hidden_size", "moe_intermediate_size",
                                          "num_experts_per_tok"))
    rows = []
    for tokens in token_counts:
        x, index, w = routed(e, d, tokens, k, device)
        floor = index.unique().numel() * 3 * f * d * BYTES_PER_WEIGHT[weights] / 4.3e12 * 1e6

        def call(x=x, index=index, w=w):
            return experts(x, index, w)

        if not isinstance(experts, moe.ExpertMLPs):
            rows.append((weights, "fused module (transformers)", tokens,
                         time_us(call, device, reps), floor, ""))
            continue
        default = moe.GROUPED_MAX_ROWS
        moe.GROUPED_MAX_ROWS = 0
        loop = call()
        rows.append((weights, "per-expert loop", tokens, time_us(call, device, reps), floor, ""))
        moe.GROUPED_MAX_ROWS = default
        if moe.groupable(experts) is not None:   # not compressed: the loop is all there is
            continue
        diff = float((call() - loop).abs().max() / loop.abs().max())
        rows.append((weights, "grouped, eager", tokens, time_us(call, device, reps), floor,
                     f"{diff:.1e}"))
        if device.type == "cuda":
            rows.append((weights, "grouped, CUDA graph", tokens,
                         time_us(as_graph(call), device, reps), floor, f"{diff:.1e}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int4,nvfp4")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a small config (CPU dry run)")
    parser.add_argument("--block-tokens", default="1,4,16",
                        help="tokens of the one-block timings (empty: none)")
    parser.add_argument("--block-reps", type=int, default=50)
    parser.add_argument("--log", default="kernels/bench_moe.log.jsonl")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("use --tiny for a CPU dry run")
    kwargs = dict(TINY if args.tiny else QWEN3_30B_A3B)
    if args.layers:
        kwargs["num_hidden_layers"] = args.layers
    model = build(kwargs, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = {"gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "config": kwargs, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    runs, blocks, failed = {}, [], {}
    token_counts = [int(t) for t in args.block_tokens.split(",") if t]
    columns = ("weights", "experts", "tokens", "us", "floor_us", "max_rel_diff")

    def log(entry: dict) -> None:   # as each result comes: a time-limited run keeps them
        with open(args.log, "a") as f:
            f.write(json.dumps({**header, **entry}) + "\n")

    def guarded(label, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 (report, go on: one GPU call, every other row)
            failed[label] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            print(f"{label}: FAILED {failed[label]}", file=sys.stderr)
            log({"label": label, "failed": failed[label]})

    def block(weights):
        def run():
            for row in block_rows(model.model.layers[0].mlp.experts, weights, kwargs,
                                  token_counts, device, args.block_reps):
                blocks.append(row)
                log({"block": dict(zip(columns, row))})
                print(f"block {row}", file=sys.stderr)
        guarded(f"{weights} block", run)

    def measure(name, grouped_max_rows=moe.GROUPED_MAX_ROWS):
        def run():
            moe.GROUPED_MAX_ROWS = grouped_max_rows
            runs[name] = measure_speed(model, name, 1, args.prompt_len, args.new_tokens,
                                       args.repeats)
            log(runs[name].__dict__)
            print(f"{name}: {runs[name].decode_tokens_per_s:.1f} tok/s decode", file=sys.stderr)
        guarded(name, run)
        moe.GROUPED_MAX_ROWS = GROUPED_MAX_ROWS

    # the new rows first (a run cut short keeps them), the slow eager loops last per format
    assert fused_experts(model), "expected fused 3D experts"
    measure("bf16 fused experts (transformers)")
    block("bf16")
    unfuse_experts(model)
    for name in args.formats.split(","):
        originals = compress_linears(model, FORMATS[name])   # every decoder Linear, experts too
        if device.type == "cuda":
            torch.cuda.empty_cache()
        measure(f"{name} grouped experts kernel (compress)")
        block(name)
        measure(f"{name} per-expert QuantizedLinear", grouped_max_rows=0)   # loop only
        restore(model, originals)
    measure("bf16 per-expert Linear (compress)")
    print(f"\nQwen3-MoE shapes ({kwargs['num_hidden_layers']} layers, {kwargs['num_experts']} "
          f"experts, top-{kwargs['num_experts_per_tok']}), {gpu}, torch {torch.__version__}")
    print("| weights | decode tok/s (batch 1) | prefill tok/s | peak MB | method | experts' "
          "eager calls |")
    print("|---|---|---|---|---|---|")
    for name, error in failed.items():
        print(f"| {name} | FAILED | {error} | | | |")
    for name, s in runs.items():
        paths = s.kernel_paths.get("model.layers.*.mlp.experts", {})   # graph replays uncounted
        print(f"| {name} | {s.decode_tokens_per_s:.1f} | {s.prefill_tokens_per_s:.0f} | "
              f"{s.peak_memory_mb:.0f} | {s.method} | "
              f"{', '.join(f'{k}: {v}' for k, v in paths.items())} |")
    if blocks:
        print(f"\nOne MoE block (layer 0's experts), top-{kwargs['num_experts_per_tok']} of "
              f"{kwargs['num_experts']}, bf16 activations, {args.block_reps} calls each")
        print("| weights | experts | tokens | us per call | floor us (routed weights once) "
              "| max diff vs loop |")
        print("|---|---|---|---|---|---|")
        for weights, kind, tokens, us, floor, diff in blocks:
            print(f"| {weights} | {kind} | {tokens} | {us:.1f} | {floor:.1f} | {diff} |")


if __name__ == "__main__":
    main()
