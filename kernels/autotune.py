"""Sweep decode- or tc-kernel launch configs on this GPU and write them as data (configs/<gpu>.json).

    python kernels/autotune.py --out $OUT/nvidia_h200.json                 # all formats, buckets
    python kernels/autotune.py --formats int4,nvfp4 --budget-s 150 --out x.json
    python kernels/autotune.py --path tc --buckets 16,64,128,256 --budget-s 150 \
        --base compress/kernels/configs/nvidia_h200.json --out $OUT/nvidia_h200.json
    TRITON_INTERPRET=1 python kernels/autotune.py --dry-run --out /tmp/t.json   # CPU: runs all

For every (format, M bucket, Llama-3-8B shape) each candidate config is first checked against
the format's *_ref reference (a wrong config is dropped, never timed), then timed like
bench_kernels (256 MB memset flushes L2 before each call, CUDA events, median of --reps). The
fastest config per shape is written under "<format>/m<bucket>" -> "<N>x<K>", and the config
with the smallest summed slowdown over the shapes as that bucket's "default" (other shapes of
the same model size). "*/m<bucket>" gets int4's defaults (the fallback for untuned formats).
--path picks the kernel (decode: compress/kernels/decode.py, tc: compress/kernels/tc.py) and
so the table written ("decode" or "tc"); the other table is kept from --base / the shipped one.
--budget-s bounds the sweep: once spent, remaining candidates are skipped (the configs --base
uses for the format and bucket come first, then the list's default; the first is always
measured); the budget is shared evenly by the formats, so a tight one
still tunes every format (later formats get what earlier ones left). Use the file with COMPRESS_KERNEL_CONFIGS=path or commit
it as compress/kernels/configs/<gpu>.json (the name is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import SHAPES, check, time_call  # noqa: E402

from compress.kernels import _common as C  # noqa: E402
from compress.kernels.fp4 import fp4_matmul, fp4_matmul_ref  # noqa: E402
from compress.kernels.w4a16 import int_matmul, int_matmul_ref  # noqa: E402

FAMILIES = ["int4", "int4-asym", "int8", "nvfp4", "mxfp4"]
BUCKET_M = {1: 1, 16: 16, 64: 64, 128: 128, 256: 256}   # bucket -> the M it is timed at


def cfg(bm, bn, bk, warps=4, stages=2, split=1, swap=None, pair=False):
    return C.Config(bm, bn, bk, warps, stages, split, swap, pair)


def pair(bm, bn, bk, warps=4, stages=2, split=1):
    """An M = 1 config reading words two at a time (Config.pair, decode.PAIR_WORDS)."""
    return cfg(bm, bn, bk, warps, stages, split, None, True)


def asynchronous(*tiles):
    """Both versions of each tile (bm, bn, bk, warps, stages, split) whose dot stays
    asynchronous when swapped (kernels/compile_check.py --sass: "wgmma in flight 3-7", the next
    tile's decode overlaps its wgmmas): packed INT4 in K order (Config.k_order; applies() skips
    it for the other formats), and plain, which is the other formats' decode (for INT4 the
    even/odd halves, which wait). Swapped: block_m < 64 is by default (tc.swap)."""
    configs = []
    for bm, bn, bk, warps, stages, split in tiles:
        swap = None if bm < 64 else True
        configs += [C.Config(bm, bn, bk, warps, stages, split, swap, False, True),
                    C.Config(bm, bn, bk, warps, stages, split, swap)]
    return configs


def planes(*tiles):
    """Swapped tiles (bm, bn, bk, warps, stages, split) with INT4's eight code-slot dots
    (Config.planes: the decoded weights never in shared memory; applies() skips it for the other
    formats). block_k >= 128: each plane's dot needs K / 8 >= 16."""
    return [C.Config(bm, bn, bk, warps, stages, split, None if bm < 64 else True, planes=True)
            for bm, bn, bk, warps, stages, split in tiles]


# Candidates per bucket (the shipped default first). M=1: rows per program x K per iteration
# (bytes in flight), split-K only where N alone gives too few programs. M>1: tensor-core tiles.
DECODE_CANDIDATES = {
    # M = 1 runs decode._gemv_kernel: a thread owns block_k / 8 / (32 warps) word columns of
    # all block_n rows (block_k / 8 >= 32 warps, else threads repeat work). More rows a program
    # share x's loads and conversions; more K a tile, fewer loop trips; split-K where N alone
    # gives too few programs. num_stages 1: loads go straight to registers, 2: one tile ahead.
    # pair(...): words two at a time, one int64 load (48 -> 62 registers for INT4, so fewer
    # rows or warps may suit it): early in the list, so a tight budget still times them
    1: [cfg(1, 8, 1024, 2, 1), pair(1, 8, 1024, 4, 2), pair(1, 8, 2048, 4, 1),
        pair(1, 4, 2048, 4, 1), pair(1, 8, 1024, 2, 1), pair(1, 4, 1024, 2, 1),
        pair(1, 8, 2048, 4, 2), pair(1, 4, 2048, 4, 2), pair(1, 16, 1024, 4, 1),
        # (thirteenth session, not yet timed) a whole K = 4096 row set in one tile: every byte
        # of a program in flight at once (qkv and o run only 2 tiles a program, 2.06-2.14x);
        # and K-splits of paired tiles: more programs, shorter chains (since the fifteenth
        # session in one launch: no zero fill, no cast; _common.split_total)
        pair(1, 4, 4096, 4, 1), pair(1, 4, 4096, 8, 1), pair(1, 8, 4096, 8, 1),
        pair(1, 2, 4096, 4, 1), pair(1, 4, 1024, 2, 1, 2), pair(1, 4, 2048, 4, 2, 2),
        pair(1, 4, 1024, 2, 2, 2), pair(1, 8, 1024, 2, 2, 2), pair(1, 4, 1024, 2, 2, 4),
        pair(1, 8, 2048, 4, 2, 2),
        cfg(1, 8, 2048, 4, 1), cfg(1, 8, 1024, 4, 1), cfg(1, 8, 512, 1, 1),
        cfg(1, 8, 512, 2, 1), cfg(1, 4, 1024, 2, 1), cfg(1, 4, 2048, 4, 1), cfg(1, 4, 512, 1, 1),
        cfg(1, 16, 1024, 2, 1), cfg(1, 16, 512, 1, 1), cfg(1, 16, 512, 2, 1), cfg(1, 16, 2048, 4, 1),
        cfg(1, 8, 1024, 2, 1, 2), cfg(1, 4, 1024, 2, 1, 2), cfg(1, 16, 512, 2, 1, 4),
        cfg(1, 8, 512, 1, 1, 2),
        # num_stages 2: the next tile's words are loaded before this one is decoded (PREFETCH)
        cfg(1, 8, 1024, 2, 2), cfg(1, 8, 2048, 4, 2), cfg(1, 4, 2048, 4, 2), cfg(1, 8, 1024, 4, 2),
        cfg(1, 4, 1024, 2, 2), cfg(1, 16, 1024, 2, 2), cfg(1, 8, 512, 1, 2), cfg(1, 4, 512, 1, 2)],
    16: [cfg(16, 16, 256), cfg(16, 32, 256), cfg(16, 16, 512), cfg(16, 32, 128, 4, 3),
         cfg(16, 64, 256, 4, 2, 2), cfg(16, 16, 256, 2), cfg(16, 32, 512, 8)],
    64: [cfg(64, 32, 256), cfg(64, 16, 256), cfg(64, 64, 256, 8), cfg(32, 32, 256),
         cfg(64, 32, 128, 4, 3)],
    128: [cfg(64, 64, 128), cfg(128, 64, 128, 8), cfg(64, 128, 128, 8), cfg(128, 32, 256, 8)],
}

# tc kernel (compress/kernels/tc.py). block_m < 64 computes y^T = W x^T (block_n is then the
# wgmma's 64-row side, 64 per 4 warps; swap=False tries x @ W^T on mma.sync tiles instead);
# block_m >= 64: x @ W^T, both wgmma operands in shared memory (swap=True tries W x^T).
# Programs: N / block_n x M / block_m x split_k; Llama-3-8B's N = 4096 gives only 64 tiles of
# 64 rows for 132 SMs, so small M needs split-K (one launch, _common.finish_split). The
# shipped default of each bucket first.
TC_CANDIDATES = {
    # M = 1 on the tc kernel (16 rows, 15 padding) against the decode loop: block_k <= 128 so
    # INT4 g128 takes the packed decode (tc._int4_packed)
    1: [cfg(16, 64, 256, 4, 3, 4), cfg(16, 64, 128, 4, 4, 4), cfg(16, 64, 128, 4, 3, 8),
        cfg(16, 64, 64, 4, 5, 4), cfg(16, 128, 128, 8, 4, 4), cfg(16, 128, 64, 8, 5, 8),
        cfg(16, 64, 128, 4, 4, 2), cfg(16, 64, 64, 4, 5, 8)],
    # (thirteenth session) fewer stages, so more programs share an SM and hide each other's
    # decode (GemLite's tuned H100 tiles all use 1), wider N tiles, so x is read fewer times,
    # with split-K to keep 132 SMs busy; early in the lists, so a tight budget still times them
    # (fourteenth session) asynchronous dots, first: never timed before. INT4 in K order on
    # swapped tiles (other formats: the same tiles, plain), at every M bucket since the loop's
    # tl.assume keeps ptxas from serializing the wgmmas of 32-128-row tiles (kernels/NOTES.md)
    # (seventeenth session) INT4's code-slot dots, first: never timed. Fewer registers (80 at
    # 16 x 64 x 128) and less shared memory, so fewer stages and more programs an SM
    16: [cfg(16, 64, 128, 4, 4, 4),
         *planes((16, 64, 128, 4, 4, 4), (16, 64, 128, 4, 2, 4), (16, 64, 128, 4, 3, 8),
                 (16, 64, 256, 4, 2, 4), (16, 128, 128, 8, 3, 4), (16, 64, 128, 4, 2, 8)),
         *asynchronous((16, 64, 128, 4, 4, 4), (16, 64, 128, 4, 3, 4), (16, 64, 128, 4, 2, 4),
                       (16, 128, 128, 8, 3, 4), (16, 64, 128, 4, 4, 8), (16, 64, 128, 4, 4, 2),
                       (16, 64, 128, 4, 4, 1)),
         cfg(16, 64, 64, 4, 1, 8), cfg(16, 128, 64, 8, 1, 8),
         cfg(16, 64, 128, 4, 2, 4), cfg(16, 128, 128, 8, 2, 4), cfg(16, 256, 64, 8, 2, 8),
         cfg(16, 64, 64, 4, 2, 16),
         cfg(16, 64, 128, 4, 4, 2), cfg(16, 64, 256, 4, 3, 4),
         cfg(16, 64, 64, 4, 5, 4), cfg(16, 64, 128, 4, 3, 8), cfg(16, 128, 128, 8, 4, 4),
         cfg(16, 64, 256, 4, 3, 2), cfg(16, 128, 64, 8, 5, 8), cfg(16, 64, 32, 4, 5, 4),
         cfg(16, 64, 128, 4, 2, 1), cfg(16, 256, 64, 8, 4, 8), cfg(32, 64, 128, 4, 4, 4),
         cfg(16, 64, 128, 4, 4, 4, False), cfg(16, 128, 128, 4, 3, 2, False),
         cfg(16, 64, 256, 4, 3, 4, False)],
    64: [cfg(64, 64, 128, 4, 3, 2),
         *planes((64, 64, 128, 4, 3, 2), (32, 64, 128, 4, 3, 2), (64, 64, 128, 4, 2, 4)),
         *asynchronous((64, 64, 128, 4, 3, 2), (64, 64, 64, 4, 4, 4), (64, 128, 64, 8, 3, 2),
                       (32, 64, 128, 4, 4, 2), (64, 64, 128, 4, 3, 4)),
         cfg(64, 64, 64, 4, 1, 4), cfg(64, 128, 64, 8, 2, 2),
         cfg(64, 128, 64, 8, 1, 4), cfg(64, 64, 128, 4, 2, 2), cfg(64, 256, 64, 8, 2, 2),
         cfg(64, 128, 128, 8, 2, 2), cfg(64, 64, 128, 4, 4, 1), cfg(64, 64, 64, 4, 4, 2),
         cfg(32, 64, 128, 4, 4, 2), cfg(64, 128, 64, 8, 3, 2), cfg(64, 64, 256, 4, 3, 2),
         cfg(64, 128, 128, 8, 3, 1), cfg(64, 64, 128, 4, 3, 4), cfg(16, 64, 128, 4, 4, 2),
         cfg(64, 256, 64, 8, 3, 1), cfg(64, 64, 32, 4, 5, 2), cfg(128, 64, 64, 4, 3, 2),
         cfg(32, 64, 128, 4, 4, 2, False),
         *asynchronous((16, 64, 128, 4, 4, 2), (16, 128, 128, 8, 3, 2))],
    # (seventeenth session) decode each weight tile once: the shipped o / qkv tiles are 64 x rows
    # of 128 (two programs decode every weight tile, ncu: 1.9 warps a scheduler, 30% of issue
    # slots busy), so swapped tiles of all 128 rows, split 2-4 to keep the SMs busy
    128: [cfg(64, 64, 128, 4, 3, 1),
          *planes((128, 64, 128, 4, 3, 2), (128, 64, 128, 4, 2, 4), (64, 64, 128, 4, 3, 2)),
          *asynchronous((128, 64, 128, 4, 3, 2), (128, 64, 128, 4, 2, 4), (128, 64, 64, 4, 3, 4),
                        (128, 64, 128, 4, 2, 2), (128, 64, 64, 4, 2, 4)),
          *asynchronous((128, 64, 64, 4, 3, 1), (128, 64, 64, 4, 3, 2), (64, 64, 128, 4, 3, 2),
                        (128, 128, 64, 8, 3, 1), (128, 64, 128, 4, 3, 1)),
          cfg(128, 128, 64, 8, 2, 1), cfg(128, 128, 64, 8, 2, 2),
          cfg(128, 256, 64, 8, 2, 1), cfg(128, 64, 64, 8, 1, 1), cfg(128, 128, 64, 8, 1, 2),
          cfg(64, 128, 64, 8, 2, 2), cfg(128, 64, 64, 4, 2, 2),
          cfg(128, 64, 128, 4, 3, 1), cfg(128, 64, 64, 4, 4, 2),
          cfg(64, 128, 64, 8, 3, 1), cfg(128, 128, 64, 8, 3, 1), cfg(64, 64, 128, 4, 4, 2),
          cfg(128, 128, 128, 8, 2, 1), cfg(64, 256, 64, 8, 3, 1), cfg(32, 64, 128, 4, 4, 1),
          cfg(128, 64, 32, 4, 5, 1), cfg(128, 256, 64, 8, 3, 1), cfg(64, 64, 128, 4, 3, 1, True)],
    256: [cfg(64, 64, 128, 4, 3, 1),
          *asynchronous((128, 64, 64, 4, 3, 1), (128, 128, 64, 8, 3, 1)),
          cfg(128, 64, 128, 4, 3, 1), cfg(128, 128, 64, 8, 3, 1),
          cfg(128, 128, 128, 8, 2, 1), cfg(64, 128, 64, 8, 4, 1), cfg(128, 256, 64, 8, 3, 1),
          cfg(128, 64, 64, 4, 4, 1), cfg(64, 256, 64, 8, 3, 1), cfg(128, 64, 32, 4, 5, 1),
          cfg(64, 64, 64, 4, 5, 1)],
}
# a tile listed twice (asynchronous() adds plain tiles a list may name again) is timed once
TC_CANDIDATES = {bucket: list(dict.fromkeys(c)) for bucket, c in TC_CANDIDATES.items()}
CANDIDATES = {"decode": DECODE_CANDIDATES, "tc": TC_CANDIDATES}
# With the four Llama-3-8B shapes, M = 1 also tunes two more launches of its decode step, under
# their own shape keys (untuned, both took the family's default config): the gate/up launch of
# a SiLU-gated MLP as the runtime makes it (gate and up stacked, silu(gate) * up in the kernel's
# epilogue: runtime/fused.py), and a quantized lm_head (bench_e2e --quantize-lm-head; 7% of an
# INT4 step's bytes). label -> (N, K, gated)
DECODE_STEP_SHAPES = {"gate+up gated 28672x4096": (28672, 4096, True),
                      "lm_head 128256x4096": (128256, 4096, False)}


def make_weight(family: str, n: int, k: int, device, path: str = "decode", gated: bool = False):
    """(fn(x, config), ref(x)) for a random weight of the family in its stored layout; gated:
    the weight stacks gate and up, fn and ref return silu(gate) * up."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator(device=device).manual_seed(0)
    if family.startswith("int"):
        bits = 8 if family == "int8" else 4
        lo = -(1 << (bits - 1))
        codes = torch.randint(lo, -lo, (n, k), device=device, generator=gen, dtype=torch.int8)
        groups = 1 if bits == 8 else k // 128
        scale = (torch.rand(n, groups, device=device, generator=gen) * 0.01).to(torch.bfloat16)
        zero = None
        if family.endswith("asym"):
            zero = pack_to_int32(torch.randint(lo, -lo, (n, groups), device=device,
                                               generator=gen, dtype=torch.int8), bits,
                                 packed_dim=0)
        packed = pack_to_int32(codes, bits)
        args = (packed, scale, zero, (n, k), bits)
        return (lambda x, c: int_matmul(x, *args, path=path, config=c, gated=gated),
                lambda x: _gate(int_matmul_ref(x, *args), gated))
    packed = torch.randint(0, 256, (n, k // 2), device=device, generator=gen, dtype=torch.uint8)
    if family == "nvfp4":
        scale = (torch.rand(n, k // 16, device=device, generator=gen) * 100 + 1).to(
            torch.float8_e4m3fn)
        gs = torch.tensor([1000.0], device=device)
    else:
        scale = torch.randint(110, 125, (n, k // 32), device=device, generator=gen,
                              dtype=torch.uint8)
        gs = None
    return (lambda x, c: fp4_matmul(x, family, packed, scale, gs, (n, k), path=path,
                                    config=c, gated=gated),
            lambda x: _gate(fp4_matmul_ref(x, family, packed, scale, gs, (n, k)), gated))


def _gate(y: torch.Tensor, gated: bool) -> torch.Tensor:
    return C.silu_mul(y.float()).to(y.dtype) if gated else y


def applies(c: C.Config, family: str, m: int, path: str = "decode") -> bool:
    per = 4 if family == "int8" else 8
    if path == "tc":   # k_order and planes change only INT4's packed decode: elsewhere duplicates
        return (c.block_m >= 16 and c.block_n >= 16 and c.block_k >= 32
                and (not (c.k_order or c.planes) or family.startswith("int4")))
    if c.block_m == 1:
        return m == 1
    return c.block_k // per >= 16 and c.block_k % per == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FAMILIES))
    parser.add_argument("--path", choices=tuple(CANDIDATES), default="decode")
    parser.add_argument("--buckets", default=None,
                        help="M buckets (default: decode 1,16,64,128; tc 16,64,128,256)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--base", default=None,
                        help="a config table whose entries are kept where this run tunes none "
                             "(retune one bucket of the shipped file)")
    parser.add_argument("--log", default=None, help="JSON lines of every measurement")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, 1 rep (CPU)")
    args = parser.parse_args()
    cands = CANDIDATES[args.path]
    buckets = [int(b) for b in (args.buckets.split(",") if args.buckets else cands)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    if args.dry_run:
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run on the CPU needs TRITON_INTERPRET=1")
        shapes, args.reps = {"tiny 96x1024": (96, 1024)}, 1
        step_shapes = {"tiny gated 192x1024": (192, 1024, True)}
        cands = {b: c[:2] for b, c in cands.items()}   # the interpreter is slow
    elif device.type != "cuda":
        raise SystemExit("autotune needs a CUDA GPU (or --dry-run with TRITON_INTERPRET=1)")
    else:
        step_shapes = DECODE_STEP_SHAPES if set(SHAPES) <= set(shapes) else {}
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) \
        if device.type == "cuda" else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    start = time.time()
    log = open(args.log, "a") if args.log else None
    table: dict = {"gpu": gpu, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                   "cmd": " ".join(sys.argv), args.path: {}}
    families = args.formats.split(",")
    runs = [(family, bucket) for family in families for bucket in buckets]
    weights = {}   # (family, shape) -> (fn, ref): made once, on first use
    base = json.loads(Path(args.base).read_text()) if args.base else {}
    for r_index, (family, bucket) in enumerate(runs):
        # the configs --base uses now for this format and bucket go first: a retune whose
        # budget runs out before the list's end cannot end slower than what it replaces
        seeds = next((list(e.values()) for fam in (family, family.split("-")[0], "*")
                      if (e := base.get(args.path, {}).get(f"{fam}/m{bucket}"))), [])
        run_cands = list(dict.fromkeys([C.Config(**d) for d in seeds] + cands[bucket]))
        # this (format, bucket)'s share of what is left of the budget; each candidate is timed
        # on every shape before the next one starts, so a cut-off leaves whole columns
        deadline = time.time() + (args.budget_s - (time.time() - start)) / (len(runs) - r_index)
        m = BUCKET_M[bucket]
        run_shapes = {label: (n, k, False) for label, (n, k) in shapes.items()}
        if args.path == "decode" and m == 1:   # (the gated epilogue is the M = 1 kernel's)
            run_shapes.update(step_shapes)
        times: dict[int, dict[str, float]] = {}   # candidate index -> shape -> seconds
        for i, c in enumerate(run_cands):
            if not applies(c, family, m, args.path):
                continue
            if i > 0 and time.time() > deadline:
                break
            for label, (n, k, gated) in run_shapes.items():
                if (family, label) not in weights:
                    weights[family, label] = make_weight(family, n, k, device, args.path, gated)
                fn, ref = weights[family, label]
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                try:
                    check(f"{family} {label} M={m} {c}", lambda x: fn(x, c), ref, x)
                    t = time_call(lambda x: fn(x, c), x, device, args.reps, flush)
                except (SystemExit, RuntimeError, ValueError) as exc:
                    print(f"dropped {family} {label} M={m} {c}: {exc}", file=sys.stderr)
                    continue
                times.setdefault(i, {})[f"{n}x{k}"] = t
                if log:
                    log.write(json.dumps({"path": args.path, "family": family, "m": m,
                                          "shape": f"{n}x{k}", "gated": gated,
                                          "config": c.to_dict(),
                                          "us": t * 1e6}) + "\n")
        if not times:
            continue
        keys = sorted({s for per in times.values() for s in per})
        entry = {}
        for s in keys:
            best = min((i for i in times if s in times[i]), key=lambda i: times[i][s])
            entry[s] = run_cands[best].to_dict()
        full = [i for i in times if len(times[i]) == len(keys)]
        best_all = min(full, key=lambda i: sum(times[i][s] / min(times[j][s] for j in times
                                                               if s in times[j])
                                               for s in keys))
        entry["default"] = run_cands[best_all].to_dict()
        table[args.path][f"{family}/m{bucket}"] = entry
        print(f"{args.path} {family} m{bucket}: " + ", ".join(
            f"{s} {min(times[i][s] for i in times if s in times[i]) * 1e6:.1f} us"
            for s in keys) + f" ({time.time() - start:.0f} s)", flush=True)
    for bucket in buckets:  # the fallback for untuned formats: int4's (else the shipped)
        src = table[args.path].get(f"int4/m{bucket}")
        if src:
            table[args.path][f"*/m{bucket}"] = {"default": src["default"]}
    if args.path == "tc" and "*/m16" in table["tc"] and "*/m1" not in table["tc"]:
        table["tc"]["*/m1"] = table["tc"]["*/m16"]   # M=1 on the tc path: only when forced
    if "paths" in base:   # the M limits between paths (measured by bench_kernels) stay
        table["paths"] = base["paths"]
    shipped = json.loads((C.CONFIG_DIR / "default.json").read_text())
    for name in C.TABLES:   # entries this run did not tune: --base's, else the shipped ones
        table.setdefault(name, {})
        for key, value in {**shipped.get(name, {}), **base.get(name, {})}.items():
            table[name].setdefault(key, value)
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}: commit it as compress/kernels/configs/"
          f"{C.gpu_config_name(device)}.json ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
