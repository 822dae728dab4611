"""End to end decode speed of a Llama-3-8B-shaped model (random weights, built from a config:
no download): bf16 against INT4 (and FP4) weights through compress's modules and kernels.

    python kernels/bench_e2e.py                                   # H200: the issue-14 goal
    python kernels/bench_e2e.py --formats tinygemm,int4,nvfp4 --prefill-len 2048
    python kernels/bench_e2e.py --formats int4,int4-asym,nvfp4,mxfp4 --new-tokens 256
    COMPRESS_KERNELS=always TRITON_INTERPRET=1 python kernels/bench_e2e.py --tiny   # CPU check

Goal (issue 11): INT4 decode at batch 1 >= 2.5x the bf16 tokens/s in the same harness, and
>= 300 tokens/s. The harness is compress.evaluation.bench (static KV cache, the decode step
replayed as a CUDA graph), the same one `compress bench` uses. INT weights are RTN-quantized
from the random bf16 weights (compress.formats.intq); FP4 weights are random codes and scales
in the stored layout (speed does not depend on values). A short table is printed last; the
full results are appended to --log as JSON lines.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_kernels (the tinygemm peer)

from compress.evaluation.bench import measure_speed
from compress.formats import WeightFormat, codec
from compress.kernels import _common as kernels_common
from compress.runtime import attention
from compress.runtime.modules import QuantizedLinear, set_module

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512,
            tie_word_embeddings=False)
FORMATS = {"int4": WeightFormat(group_size=128), "int4-asym": WeightFormat(group_size=128,
                                                                         symmetric=False),
           "nvfp4": WeightFormat(type="nvfp4", group_size=16),
           "mxfp4": WeightFormat(type="mxfp4", group_size=32)}


def build(config_kwargs: dict, layers: int | None, device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(config_kwargs)
    if layers:
        kwargs["num_hidden_layers"] = layers
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no 32 GB float32 copy
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**kwargs))
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def random_fp4(linear: nn.Linear, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """FP4 tensors in the stored layout with random codes and scales (speed only)."""
    n, k = linear.weight.shape
    # drawn on the CPU: after a CUDA graph was captured in this process (bench_moe), the CUDA
    # generator refuses to advance outside a capture
    gen = torch.Generator().manual_seed(n * 7919 + k)
    t = {"weight_packed": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen),
         "weight_shape": torch.tensor([n, k])}
    if fmt.type == "nvfp4":
        t["weight_scale"] = (torch.rand(n, k // 16, generator=gen) * 100 + 1).to(torch.float8_e4m3fn)
        t["weight_global_scale"] = torch.tensor([448.0 * 6.0 / 0.05])
    else:
        t["weight_scale"] = torch.randint(110, 122, (n, k // 32), dtype=torch.uint8, generator=gen)
    return {name: v.to(linear.weight.device) for name, v in t.items()}


def compress_linears(model: nn.Module, fmt: WeightFormat,
                     lm_head: bool = False) -> dict[str, nn.Linear]:
    """Swap every decoder linear (and lm_head if asked) for a QuantizedLinear in fmt; returns
    the originals."""
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and (".layers." in n or (lm_head and n.endswith("lm_head")))}
    for name, linear in originals.items():
        if fmt.type == "int":
            q = codec(fmt).quantize(linear.weight.data, fmt)
            module = QuantizedLinear.from_quantized(q, linear.bias, scale_dtype=torch.bfloat16)
        else:
            module = QuantizedLinear(linear.in_features, linear.out_features, fmt, linear.bias)
            module.load_packed(random_fp4(linear, fmt))
        set_module(model, name, module.to(linear.weight.device))
    return originals


class TinyGemmLinear(nn.Module):
    """The peer: torch's tinygemm INT4 g128 (torch._weight_int4pack_mm, torchao's int4
    weight-only kernel) on RTN codes of the same weight, bf16 activations (speed only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from bench_kernels import tinygemm_int4

        w = linear.weight.data.float()
        n, k = w.shape
        groups = w.reshape(n, k // 128, 128)
        scale = (groups.abs().amax(-1) / 7).clamp_min(1e-8)
        codes = (groups / scale[..., None]).round().clamp(-8, 7).reshape(n, k).to(torch.int8)
        self.fn = tinygemm_int4(codes, scale)
        if self.fn is None:
            raise SystemExit("tinygemm is unavailable in this torch")
        self.bias = linear.bias
        self.out_features = n

    def forward(self, x):
        y = self.fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def swap_tinygemm(model: nn.Module, lm_head: bool) -> dict[str, nn.Linear]:
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and (".layers." in n or (lm_head and n.endswith("lm_head")))}
    for name, linear in originals.items():
        set_module(model, name, TinyGemmLinear(linear))
    return originals


def restore(model: nn.Module, originals: dict[str, nn.Linear]) -> None:
    for name, linear in originals.items():
        set_module(model, name, linear)


def decode_roofline(context: int = 256) -> str:
    """Bytes one batch-1 decode step must read on Llama-3-8B, and the tokens/s ceiling at
    4.3 TB/s (H200 measured copy): every decoder linear, the (bf16) lm_head, the KV cache at `context` tokens."""
    c = LLAMA3_8B
    d, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = [(d + 2 * kv, d), (d, d), (f, d), (f, d), (d, f)]     # q,k,v | o | gate | up | down
    params = layers * sum(n * k for n, k in shapes)
    per_weight = {"bf16": 2.0, "int4 g128 (bf16 scales)": 0.5 + 2 / 128,
                  "int4 g128 asym": 0.5 + 2.5 / 128, "nvfp4": 0.5 + 1 / 16,
                  "mxfp4": 0.5 + 1 / 32}
    other = 2 * c["vocab_size"] * d + 2 * layers * 2 * kv * context   # lm_head + KV cache
    lines = [f"decoder linear weights: {params / 1e9:.2f} G; lm_head {c['vocab_size']}x{d} "
             f"bf16; KV cache at {context} tokens; 4.3 TB/s (H200)",
             "", "| weights | bytes per step (GB) | floor ms/step | ceiling tok/s |",
             "|---|---|---|---|"]
    for name, b in per_weight.items():
        total = params * b + other
        lines.append(f"| {name} | {total / 1e9:.2f} | {total / 4.3e12 * 1e3:.2f} | "
                     f"{4.3e12 / total:.0f} |")
    return "\n".join(lines)


@torch.inference_mode()
def profile_decode(model: nn.Module, label: str, path: Path, steps: int = 8) -> None:
    """Where a decode step's GPU time goes: `steps` eager batch-1 steps under torch.profiler,
    the kernels by total CUDA time appended to `path` (the graph-replayed step runs the same
    kernels without the launch gaps)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=64 + steps + 4)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), device=device)
    model(ids, past_key_values=cache, cache_position=torch.arange(64, device=device))
    tok = ids[:, -1:]
    for i in range(2):  # warm up (Triton compiles)
        model(tok, past_key_values=cache, cache_position=torch.tensor([64 + i], device=device))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            model(tok, past_key_values=cache,
                  cache_position=torch.tensor([66 + i], device=device))
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70)
    with open(path, "a") as f:
        f.write(f"\n=== {label}: {steps} eager decode steps ===\n{table}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int4",
                        help="comma list of int4, int4-asym, nvfp4, mxfp4, tinygemm; "
                             "<format>-unfused: without fusing q/k/v and gate/up; "
                             "<format>-nopdl / <format>-pdl: our kernels launched without / "
                             "with programmatic dependent launch (compress/kernels/_common.PDL, "
                             "on by default; COMPRESS_PDL=0 turns it off); "
                             "<format>-l2pf<MiB>: each layer's q/k/v matmul then asks L2 for "
                             "that many MiB of o_proj's and gate/up's weights "
                             "(compress/runtime/fused.py L2_PREFETCH_MIB, off by default); "
                             "<format>-attn: the single-token attention by the split-key "
                             "kernel (compress/runtime/attention.py DECODE_KERNEL, off by "
                             "default); suffixes combine")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a small config (CPU dry run)")
    parser.add_argument("--log", default="kernels/bench_e2e.log.jsonl")
    parser.add_argument("--roofline", action="store_true", help="print the decode byte count")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="lm_head in the same format too (1 GB of a bf16 step's reads)")
    parser.add_argument("--no-fuse-rope", dest="fuse_rope", action="store_false",
                        help="keep transformers' RoPE (~12 kernels a layer) in our rows")
    parser.add_argument("--no-fuse-norms", dest="fuse_norms", action="store_false",
                        help="keep transformers' RMSNorm in the compressed rows (the bf16 row "
                             "always runs it; the others run the fused kernel by default, as "
                             "a model loaded by compress.load on CUDA does)")
    parser.add_argument("--no-fuse-residual", dest="fuse_residual", action="store_false",
                        help="keep the residual adds kernels of their own in the compressed "
                             "rows (compress.load runs the attention's in the post-attention "
                             "norm's kernel and the MLP's in down_proj's matmul, "
                             "compress/runtime/norms.py fuse_residual_norms)")
    parser.add_argument("--no-fuse-cache", dest="fuse_cache", action="store_false",
                        help="keep transformers' static cache update (five kernels a layer) in "
                             "the compressed rows (compress.load runs one, runtime/kv_cache.py)")
    parser.add_argument("--no-pack-gqa", dest="pack_gqa", action="store_false",
                        help="keep transformers' single-token attention in our rows "
                             "(compress.load packs the heads where transformers does not and "
                             "makes the step's mask additive once, runtime/attention.py)")
    parser.add_argument("--no-gated-mlp", dest="gated_mlp", action="store_false",
                        help="SiLU and the product after the fused gate/up matmul, as "
                             "transformers runs them: turns off the epilogue that compress.load "
                             "runs by default (compress/runtime/fused.py GATED_MLP)")
    parser.add_argument("--profile", default=None,
                        help="append a torch.profiler kernel table of eager decode steps of "
                             "every row to this file")
    parser.add_argument("--prefill-len", type=int, default=0,
                        help="also time prefill of a prompt this long (e.g. 2048)")
    parser.add_argument("--prefill-repeats", type=int, default=10,
                        help="timed prefills of that prompt (the median is reported): 2-3 "
                             "varied by 30%% between processes on the H200")
    args = parser.parse_args()
    if args.roofline:
        print(decode_roofline())
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("an 8B model needs the GPU; use --tiny for a CPU dry run")
    model = build(TINY if args.tiny else LLAMA3_8B, args.layers, device)
    runs, prefill = {}, {}

    def measure(name):
        runs[name] = measure_speed(model, name, 1, args.prompt_len, args.new_tokens,
                                   args.repeats)
        # a line as each row ends: a run cut by its time limit still shows the rows it did
        print(f"row {name}: decode {runs[name].decode_tokens_per_s:.1f} tok/s", file=sys.stderr,
              flush=True)
        if args.prefill_len:  # a long prompt: prefill tokens/s (2 new tokens, not reported)
            prefill[name] = measure_speed(model, name, 1, args.prefill_len, 2,
                                          args.prefill_repeats).prefill_tokens_per_s
        if args.profile and device.type == "cuda":
            profile_decode(model, name, Path(args.profile))

    measure("bf16")
    if args.fuse_norms:   # every later row (tinygemm too): compress.load does this on CUDA
        from compress.runtime.norms import fuse_rmsnorms

        print(f"{fuse_rmsnorms(model)} RMSNorms fused after the bf16 row", file=sys.stderr)
        if args.fuse_residual:   # compress.load too: the residual adds in the norm and matmul
            from compress.runtime.norms import fuse_residual_norms

            print(f"residual adds fused in {fuse_residual_norms(model)} layers", file=sys.stderr)
    if args.fuse_rope:    # the same: compress.load runs RoPE as one kernel a layer on CUDA
        from compress.runtime.rope import fuse_rope

        print(f"RoPE fused in {fuse_rope(model)} attention layers after the bf16 row",
              file=sys.stderr)
    if args.pack_gqa:     # the same: compress.load packs single-token GQA heads (attention.py)
        from compress.runtime.attention import pack_gqa_decode

        print(f"GQA heads packed after the bf16 row: {pack_gqa_decode(model)}", file=sys.stderr)
    if args.fuse_cache:   # the same: compress.load updates a static cache in one launch a layer
        from compress.runtime.kv_cache import fuse_static_cache

        print(f"static cache update in one kernel after the bf16 row: "
              f"{fuse_static_cache(model)}", file=sys.stderr)
    pdl_default = kernels_common.PDL
    for name in args.formats.split(","):
        if name == "tinygemm":
            if device.type != "cuda":
                print("tinygemm row skipped: it needs CUDA", file=sys.stderr)
                continue
            originals = swap_tinygemm(model, args.quantize_lm_head)
        else:
            # "<format>-unfused": q/k/v and gate/up as separate matmuls (compress.load on CUDA
            # fuses them, compress/runtime/fused.py; this row shows what that gains);
            # "<format>-nopdl" / "-pdl": the fused row with PDL off / on (the default after it)
            # "-l2pf<MiB>": the fused row with the L2 prefetch after q/k/v; "-attn": with the
            # split-key decode attention kernel (suffixes combine, any order)
            name_fmt, pdl, l2pf, attn = name, None, 0.0, False
            while True:
                head, _, tail = name_fmt.rpartition("-")
                if tail in ("nopdl", "pdl"):
                    pdl = tail == "pdl"
                elif tail.startswith("l2pf") and tail[4:].replace(".", "", 1).isdigit():
                    l2pf = float(tail[4:])
                elif tail == "attn":
                    attn = True
                else:
                    break
                name_fmt = head
            kernels_common.PDL = pdl_default if pdl is None else pdl
            attention.DECODE_KERNEL = attn
            base = name_fmt.removesuffix("-unfused")
            originals = compress_linears(model, FORMATS[base], args.quantize_lm_head)
            if device.type == "cuda" and base == name_fmt:
                from compress.runtime import fused
                from compress.runtime.fused import fuse_projections

                fused.GATED_MLP = args.gated_mlp
                fused.L2_PREFETCH_MIB = l2pf

                print(f"{fuse_projections(model)} projection groups fused ({name})",
                      file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        measure(name)
        kernels_common.PDL = pdl_default
        attention.DECODE_KERNEL = False
        restore(model, originals)
        del originals
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = {"gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "cmd": " ".join(sys.argv), "layers": model.config.num_hidden_layers,
              "lm_head_quantized": args.quantize_lm_head}
    with open(args.log, "a") as log:
        log.write(json.dumps({**header, "runs": {k: v.to_dict() for k, v in runs.items()},
                              f"prefill_{args.prefill_len}_tok_s": prefill}) + "\n")
    print(f"\n{gpu}, {header['date']}, {model.config.num_hidden_layers} layers, batch 1, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, lm_head "
          f"{'quantized' if args.quantize_lm_head else 'bf16'}")
    print(f"| weights | method | prefill tok/s | prefill {args.prefill_len} tok/s (vs bf16) | "
          "decode tok/s | vs bf16 | peak MB | paths |")
    print("|---|---|---|---|---|---|---|---|")
    base = runs["bf16"].decode_tokens_per_s
    for name, r in runs.items():
        paths = sorted({p for calls in r.kernel_paths.values() for p in calls})
        long = (f"{prefill[name]:.0f} ({prefill[name] / prefill['bf16']:.2f}x)"
                if name in prefill else "-")
        print(f"| {name} | {r.method} | {r.prefill_tokens_per_s:.0f} | {long} | "
              f"{r.decode_tokens_per_s:.1f} | {r.decode_tokens_per_s / base:.2f}x | "
              f"{r.peak_memory_mb:.0f} | {', '.join(paths) or 'torch'} |")
    if "int4" in runs and not args.tiny and not args.layers:
        r = runs["int4"].decode_tokens_per_s
        ok = r >= 2.5 * base
        print(f"issue-14 goal (int4 decode >= 2.5x bf16): {'MET' if ok else 'NOT MET'}"
              f" ({r:.1f} tok/s, {r / base:.2f}x)"
              + (f"; vs tinygemm {r / runs['tinygemm'].decode_tokens_per_s:.2f}x (goal 1.8x)"
                 if "tinygemm" in runs else ""))


if __name__ == "__main__":
    main()
