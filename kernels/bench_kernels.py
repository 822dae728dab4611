"""Time every compress kernel against torch bf16 matmul on Llama-3-8B layer shapes.

    python kernels/bench_kernels.py                       # on a GPU: the full table (minutes)
    python kernels/bench_kernels.py --roofline            # no GPU needed: bytes, FLOPs, limits
    TRITON_INTERPRET=1 python kernels/bench_kernels.py --dry-run   # CPU: every code path runs

Shapes are weight [N, K] = out x in features; x is [M, K] bfloat16. Each timed call is preceded
by a 256 MB memset that flushes L2 (a 4096x4096 INT4 weight, 8 MB, would otherwise stay in the
H200's 60 MB L2); CUDA events bracket the call alone; the median of --reps calls is reported.
Before timing, every kernel's output is checked against its reference on every path (M = 1,
16, 17, 64, 128, 256, DEQUANT_MIN_M) for each shape, so a fast wrong kernel cannot enter the table. Full
results go to --log (JSON lines); a short table is printed last. The peer `tinygemm` is torch's
INT4 g128 kernel (torch._weight_int4pack_mm, what torchao's int4 weight-only runs) on the same
codes as int4-g128, checked against the same reference. Decode configs: the per-GPU JSON, or
COMPRESS_KERNEL_CONFIGS=file (kernels/autotune.py writes one).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.kernels import _common as C
from compress.kernels.fp4 import fp4_matmul, fp4_matmul_ref
from compress.kernels.sparse24 import gather_kept, pack_meta, sparse24_matmul, sparse24_matmul_ref
from compress.kernels.w4a16 import int_matmul, int_matmul_ref

SHAPES = {"qkv 6144x4096": (6144, 4096), "o 4096x4096": (4096, 4096),
          "gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336)}
MS = [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
# H200 (132 SMs, 60 MB L2): 4.8 TB/s peak HBM3e, ~4.3 TB/s measured copy; dense bf16 FLOP/s
H200 = {"bandwidth": 4.3e12, "bf16_flops": 790e12}
GROUP = 128
CHUNK_MIB = (0, 4, 8, 16, 32)   # "@chunk<MiB>" variants (0: the whole weight at once)
# "@dq..." variants: tc_dequantize tiles (block_n, block_k, warps); the first is the shipped one
DEQUANT_TILES = ((32, 256, 4), (64, 256, 4), (16, 512, 4), (32, 512, 8), (64, 128, 4),
                 (128, 256, 8))
PEERS = ("tinygemm", "torch-2:4-bf16")   # not ours: a wrong peer is dropped, not fatal


# ---------------------------------------------------------------------------------------------
# Bytes and FLOPs per call (the roofline; no GPU needed)

def weight_bytes(variant: str, n: int, k: int) -> float:
    """Bytes of the stored weight a call must read once (scales bf16, as artifacts of bf16
    models store them)."""
    groups = n * k / GROUP
    return {
        "bf16": 2 * n * k,
        "int4-g128": n * k / 2 + 2 * groups,
        "int4-g128-asym": n * k / 2 + 2 * groups + groups / 2,
        "int8-channel": n * k + 2 * n,
        "nvfp4": n * k / 2 + n * k / 16 + 4,
        "mxfp4": n * k / 2 + n * k / 32,
        "2:4-bf16": n * k + n * k / 8,
        "torch-2:4-bf16": n * k + n * k / 8,
        "2:4-int4-g128": n * k / 4 + n * k / 8 + 2 * groups,
        "tinygemm": n * k / 2 + 4 * groups,     # bf16 scale and zero per group
        "read-int4": n * k / 2 + 2 * groups,    # the floors read int4-g128's / bf16's bytes
        "read-bf16": 2 * n * k,
    }[variant]


def roofline(variant: str, m: int, n: int, k: int) -> dict:
    """Compulsory bytes (weight + x + y in bf16) and FLOPs of one call, and the time floor.
    Our 2:4 kernels expand kept values to dense tiles (dense tensor-core math); torch's
    semi-structured matmul uses sparse tensor cores, which do the same product at twice the
    rate: its compute floor is halved."""
    nbytes = weight_bytes(variant, n, k) + 2 * m * k + 2 * m * n
    flops = 2 * m * n * k
    rate = H200["bf16_flops"] * (2 if variant.startswith("torch-2:4") else 1)
    floor = max(nbytes / H200["bandwidth"], flops / rate)
    return {"bytes": nbytes, "flops": flops, "floor_us": floor * 1e6,
            "bound": "memory" if nbytes / H200["bandwidth"] >= flops / rate else "compute"}


def roofline_markdown(ms=MS) -> str:
    variants = ["bf16", "int4-g128", "nvfp4", "mxfp4", "2:4-bf16", "torch-2:4-bf16",
                "2:4-int4-g128"]
    lines = []
    for label, (n, k) in SHAPES.items():
        lines.append(f"\n**{label}** (weight [N={n}, K={k}]): minimum time per call in us "
                     "(memory or compute bound, whichever is longer), and the ideal speed-up "
                     "over bf16\n")
        lines.append("| M | " + " | ".join(variants) + " | weight MB (bf16 / int4) |")
        lines.append("|---" * (len(variants) + 2) + "|")
        for m in ms:
            base = roofline("bf16", m, n, k)["floor_us"]
            cells = []
            for v in variants:
                r = roofline(v, m, n, k)
                mark = "" if r["bound"] == "memory" else "c"  # c: compute bound
                cells.append(f"{r['floor_us']:.1f}{mark} ({base / r['floor_us']:.2f}x)")
            mb = (f"{weight_bytes('bf16', n, k) / 1e6:.1f} / "
                  f"{weight_bytes('int4-g128', n, k) / 1e6:.1f}")
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {mb} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Weights in every format (random codes: speed does not depend on values)

def make_variants(n: int, k: int, device) -> dict:
    """variant -> (fn(x) -> y, ref(x) -> y or None); "<variant>@tc" forces the tc kernel,
    "<variant>@dequant" decode-then-cuBLAS."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
    codes = torch.randint(-8, 8, (n, k), device=device, generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, k // GROUP, device=device, generator=gen) * 0.01).to(torch.bfloat16)
    zero = pack_to_int32(torch.randint(-8, 8, (n, k // GROUP), device=device, generator=gen,
                                       dtype=torch.int8), 4, packed_dim=0).contiguous()
    packed4 = pack_to_int32(codes, 4)
    codes8 = torch.randint(-128, 128, (n, k), device=device, generator=gen, dtype=torch.int8)
    packed8, scale8 = pack_to_int32(codes8, 8), scale[:, :1].contiguous()
    fp4_bytes = torch.randint(0, 256, (n, k // 2), device=device, generator=gen,
                              dtype=torch.uint8)
    nv_scale = (torch.rand(n, k // 16, device=device, generator=gen) * 100 + 1).to(
        torch.float8_e4m3fn)
    gs = torch.tensor([1000.0], device=device)
    mx_scale = torch.randint(110, 125, (n, k // 32), device=device, generator=gen,
                             dtype=torch.uint8)
    # 2:4: keep positions 0 and 2 of every group of 4 (any valid pattern reads the same bytes)
    pos = torch.tensor([0, 2], device=device).expand(n, k // 4, 2).contiguous()
    meta = pack_meta(pos)
    sparse16 = {"weight_values": gather_kept(w, pos), "weight_meta": meta}
    sparse4 = {"weight_packed": pack_to_int32(gather_kept(codes, pos), 4), "weight_meta": meta,
               "weight_scale": scale}
    shape = (n, k)
    v = {
        "bf16": (lambda x: F.linear(x, w), None),
        "int4-g128": (lambda x, path=None: int_matmul(x, packed4, scale, None, shape, 4,
                                                      path=path),
                      lambda x: int_matmul_ref(x, packed4, scale, None, shape, 4)),
        "int4-g128-asym": (lambda x, path=None: int_matmul(x, packed4, scale, zero, shape, 4,
                                                           path=path),
                           lambda x: int_matmul_ref(x, packed4, scale, zero, shape, 4)),
        "int8-channel": (lambda x, path=None: int_matmul(x, packed8, scale8, None, shape, 8,
                                                         path=path),
                         lambda x: int_matmul_ref(x, packed8, scale8, None, shape, 8)),
        "nvfp4": (lambda x, path=None: fp4_matmul(x, "nvfp4", fp4_bytes, nv_scale, gs, shape,
                                                  path=path),
                  lambda x: fp4_matmul_ref(x, "nvfp4", fp4_bytes, nv_scale, gs, shape)),
        "mxfp4": (lambda x, path=None: fp4_matmul(x, "mxfp4", fp4_bytes, mx_scale, None, shape,
                                                  path=path),
                  lambda x: fp4_matmul_ref(x, "mxfp4", fp4_bytes, mx_scale, None, shape)),
        "2:4-bf16": (lambda x, path=None: sparse24_matmul(x, "16bit", sparse16, shape,
                                                          path=path),
                     lambda x: sparse24_matmul_ref(x, "16bit", sparse16, shape)),
        "2:4-int4-g128": (lambda x, path=None: sparse24_matmul(x, "int", sparse4, shape,
                                                               path=path),
                          lambda x: sparse24_matmul_ref(x, "int", sparse4, shape)),
    }
    # the same weights forced onto one path at every M ("@tc": the tc kernel, "@dequant":
    # decode once + cuBLAS), to compare the paths where the table routes M elsewhere
    for name, fn_ref in list(v.items()):
        if name.startswith(("int", "nvfp4", "mxfp4")):
            for path in ("tc", "dequant"):
                v[f"{name}@{path}"] = (functools.partial(_forced, fn_ref[0], path), fn_ref[1])
            v[f"{name}@tc-plain"] = (functools.partial(_plain_tc, fn_ref[0]), fn_ref[1])
            v[f"{name}@no-x8"] = (functools.partial(_no_x8, fn_ref[0]), fn_ref[1])
            v[f"{name}@no-fp4-x8"] = (functools.partial(_no_fp4_x8, fn_ref[0]), fn_ref[1])
            v[f"{name}@pair"] = (functools.partial(_pair, fn_ref[0]), fn_ref[1])
            v[f"{name}@no-pair"] = (functools.partial(_no_pair, fn_ref[0]), fn_ref[1])
            v[f"{name}@k-order"] = (functools.partial(_k_order, fn_ref[0]), fn_ref[1])
            v[f"{name}@no-k-order"] = (functools.partial(_no_k_order, fn_ref[0]), fn_ref[1])
            v[f"{name}@planes"] = (functools.partial(_planes, fn_ref[0]), fn_ref[1])
            v[f"{name}@no-planes"] = (functools.partial(_no_planes, fn_ref[0]), fn_ref[1])
    # "@chunk<MiB>": decode + cuBLAS with W decoded in row chunks of about that many MiB
    # (C.DEQUANT_CHUNK_MIB), "@chunk0" the whole weight at once, whatever the table says
    for name, fn_ref in list(v.items()):
        if "@" not in name and name != "bf16":
            for mib in CHUNK_MIB:
                v[f"{name}@chunk{mib}"] = (functools.partial(
                    _without, fn_ref[0], path="dequant", module="_common",
                    name="DEQUANT_CHUNK_MIB", off=mib), fn_ref[1])
    # "@dq<block_n>x<block_k>w<warps>": the same with another tile for tc_dequantize's kernel
    # (C.CONFIGS["dequant_words"], never tuned: the decode pass reaches ~3.3 TB/s of written +
    # read bytes on gate/up at M = 256, against ~4.3 for a copy)
    for name in ("int4-g128", "nvfp4"):
        for bn, bk, warps in DEQUANT_TILES:
            tiles = dict(C.CONFIGS, dequant_words=C.Config(1, bn, bk, num_warps=warps))
            v[f"{name}@dq{bn}x{bk}w{warps}"] = (functools.partial(
                _without, v[name][0], path="dequant", module="_common", name="CONFIGS",
                off=tiles), v[name][1])
    # the floors: int4-g128's words and scales, and the bf16 weight, read once by a streaming
    # kernel that does no math (what any matmul reading those bytes cannot beat in this timing)
    v["read-int4"] = (functools.partial(read_floor, (packed4, scale)), None)
    v["read-bf16"] = (functools.partial(read_floor, (w,)), None)
    if device.type == "cuda":
        tiny = tinygemm_int4(codes, scale)
        if tiny is not None:
            v["tinygemm"] = (tiny, v["int4-g128"][1])
        try:
            from torch.sparse import to_sparse_semi_structured

            dense24 = torch.zeros_like(w).reshape(n, k // 4, 4)
            dense24[..., 0::2] = w.reshape(n, k // 4, 4)[..., 0::2]
            ws = to_sparse_semi_structured(dense24.reshape(n, k))
            v["torch-2:4-bf16"] = (lambda x: F.linear(x, ws), None)
        except (RuntimeError, ValueError, ImportError) as exc:
            print(f"torch semi-structured 2:4 unavailable: {exc}", file=sys.stderr)
    return v


def _forced(fn, path: str, x: torch.Tensor) -> torch.Tensor:
    return fn(x, path=path)


def _without(fn, x: torch.Tensor, *, path: str, module: str, name: str, off) -> torch.Tensor:
    """fn on `path` with compress.kernels.<module>.<name> replaced by `off` for the call: the
    code a change replaced, timed in the same run (kernels are chosen at launch, so also inside
    a graph capture)."""
    import importlib

    owner = importlib.import_module(f"compress.kernels.{module}")
    kept = getattr(owner, name)
    setattr(owner, name, off)
    try:
        return fn(x, path=path)
    finally:
        setattr(owner, name, kept)


# "@tc-plain": the tc kernel without INT4's packed decode (tc._int4_packed);
# "@no-x8": the M = 1 INT4 kernel with 8 scalar loads of x a word column, as before
# decode._int4_x8_dot (on by default since its H200 A/B)
_no_x8 = functools.partial(_without, path="decode", module="decode", name="X8_LOADS", off=False)
# "@no-fp4-x8": FP4's M = 1 kernel with 8 scalar loads of x, as before decode._fp4_x8_dot
_no_fp4_x8 = functools.partial(_without, path="decode", module="decode", name="X8_LOADS_FP4",
                               off=False)
# "@pair" / "@no-pair": the M = 1 kernel with words read two at a time (decode.PAIR_WORDS)
# forced on / off, whatever the tuned config says (Config.pair)
_pair = functools.partial(_without, path="decode", module="decode", name="PAIR_WORDS", off=True)
_no_pair = functools.partial(_without, path="decode", module="decode", name="PAIR_WORDS",
                             off=False)
# "@k-order" / "@no-k-order": the tc kernel's packed INT4 decode in K order, one dot
# (tc.FORCE_K_ORDER) forced on / off, whatever the tuned config says (Config.k_order)
_k_order = functools.partial(_without, path="tc", module="tc", name="FORCE_K_ORDER", off=True)
_no_k_order = functools.partial(_without, path="tc", module="tc", name="FORCE_K_ORDER", off=False)
# "@planes" / "@no-planes": the tc kernel's packed INT4 decode as eight code-slot dots
# (tc.FORCE_PLANES, where the tiles are swapped and block_k >= 128) forced on / off, whatever
# the tuned config says (Config.planes)
_planes = functools.partial(_without, path="tc", module="tc", name="FORCE_PLANES", off=True)
_no_planes = functools.partial(_without, path="tc", module="tc", name="FORCE_PLANES", off=False)
_plain_tc = functools.partial(_without, path="tc", module="tc", name="packed_int4",
                              off=lambda *args: False)


@triton.jit
def _read_kernel(src, out, numel, BLOCK: tl.constexpr):
    # one contiguous block of int32 a program, 16-byte loads, one int stored (so the loads stay)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(src + offs, mask=offs < numel, other=0)
    tl.store(out + tl.program_id(0), tl.reduce_or(words, 0))


def read_floor(tensors, x: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Read every byte of `tensors` once and nothing else: the time floor of a call that must
    read them, measured the way the kernels are (a bench-only kernel, no reference: it computes
    nothing). The benchmark's x is not read: 2 M K bytes against the INT4 weight's N K / 2, 1.6%
    of them for o_proj at M = 16."""
    outs = []
    for t in tensors:
        flat = t.reshape(-1).view(torch.int32)
        out = torch.empty(-(-flat.numel() // block), dtype=torch.int32, device=t.device)
        _read_kernel[(out.numel(),)](flat, out, flat.numel(), BLOCK=block, num_warps=4)
        outs.append(out)
    return outs[0]


def tinygemm_int4(codes: torch.Tensor, scale: torch.Tensor, inner_k_tiles: int = 8):
    """torch's tinygemm INT4 (CUDA, bf16) for signed codes [N, K] in [-8, 7] with group-128
    scales [N, K/128]: fn(x) -> y, or None (printed why) where this torch lacks it. tinygemm
    computes (q - 8) * scale + zero with q = code + 8 unsigned; symmetric: zero = 0. Its packer
    takes uint8 [N, K/2], two codes a byte, the even column in the high nibble (torch >= 2.5,
    so 2.11-2.13 alike)."""
    try:
        q = (codes.to(torch.int32) + 8)
        w_uint8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8, inner_k_tiles)
        sz = torch.stack([scale.to(torch.bfloat16).T, torch.zeros_like(scale).to(
            torch.bfloat16).T], dim=-1).contiguous()       # [K/128, N, 2]
        fn = lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)
        fn(torch.zeros(1, codes.shape[1], dtype=torch.bfloat16, device=codes.device))
        return fn
    except (RuntimeError, AttributeError) as exc:
        print(f"tinygemm unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------
# Timing

def time_call(fn, x, device, reps: int, flush: torch.Tensor | None) -> float:
    """Median seconds of fn(x) over reps, L2 flushed before each call. On CUDA the call is
    captured once as a CUDA graph and replayed: the time is the GPU's alone, as in a decode
    step replayed as a graph; host-side launch cost (Python wrappers, config lookup) would
    otherwise be timed whenever it exceeds the flush, and differs between the contenders."""
    fn(x)  # compile / warm up
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(x)  # allocations settle on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn(x)
        run = graph.replay
    except Exception as exc:  # noqa: BLE001 -- not capturable (a host sync inside): eager
        print(f"graph capture failed ({str(exc).splitlines()[0][:80]}): timed eagerly",
              file=sys.stderr)
        torch.cuda.synchronize()
        run = lambda: fn(x)  # noqa: E731
    times = []
    for _ in range(reps):
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def check(name, fn, ref, x) -> None:
    """The kernel agrees with its reference (bf16 tolerance relative to the output's scale)."""
    if ref is None:
        return
    y, r = fn(x).float(), ref(x).float()
    err = (y - r).abs().max().item()
    scale = r.abs().max().item() + 1e-6
    if not err <= 2e-2 * scale:
        raise SystemExit(f"{name}: wrong result (max error {err:.3g}, output scale {scale:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roofline", action="store_true", help="print the roofline table only")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, 1 rep: check every path runs (CPU interpreter)")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--variants", default="", help="comma list (default: all)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--log", default="kernels/bench_kernels.log.jsonl")
    args = parser.parse_args()
    if args.roofline:
        print(roofline_markdown())
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ms = [int(m) for m in args.ms.split(",")]
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    if args.dry_run:
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run on the CPU needs TRITON_INTERPRET=1")
        shapes, ms, args.reps = {"tiny 96x256": (96, 256)}, [1, 16, 64, 600], 1
    elif device.type != "cuda":
        raise SystemExit("timing needs a CUDA GPU; use --roofline or --dry-run here")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) \
        if device.type == "cuda" else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    header = {"gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "cmd": " ".join(sys.argv)}
    header["triton"] = triton.__version__
    rows = []
    with open(args.log, "a") as log:
        log.write(json.dumps(header) + "\n")
        for label, (n, k) in shapes.items():
            variants = make_variants(n, k, device)
            chosen = [c for c in (args.variants.split(",") if args.variants else variants)
                      if c in variants]
            # every path this device's table routes to: decode, tc (M buckets 16..256), dequant
            for m_check in (1, 16, 17, 64, 128, 256, C.DEQUANT_MIN_M):
                x_check = torch.randn(m_check, k, device=device, dtype=torch.bfloat16)
                for name in list(chosen):
                    try:
                        check(f"{name} {label} M={m_check}", *variants[name], x_check)
                    except SystemExit as exc:
                        if name not in PEERS:
                            raise
                        print(f"peer dropped: {exc}", file=sys.stderr)  # keep our own rows
                        log.write(json.dumps({"shape": label, "variant": name,
                                              "error": str(exc)}) + "\n")
                        chosen.remove(name)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                # the path the INT/FP4 variants take at this M (this GPU's "paths" limits)
                row = {"shape": label, "m": m, "path": C.choose_path(m, True, device)}
                for name in chosen:
                    fn = variants[name][0]
                    try:
                        t = time_call(fn, x, device, args.reps, flush)
                    except RuntimeError as exc:  # e.g. torch 2:4 rejecting a shape
                        row[name] = None
                        log.write(json.dumps({"shape": label, "m": m, "variant": name,
                                              "error": str(exc).splitlines()[0]}) + "\n")
                        continue
                    row[name] = t * 1e6
                    r = roofline(name.split("@")[0], m, n, k)
                    log.write(json.dumps({"shape": label, "m": m, "variant": name,
                                          "path": row["path"], "us": t * 1e6,
                                          "floor_us": r["floor_us"],
                                          "tb_per_s": r["bytes"] / t / 1e12,
                                          "tflops": r["flops"] / t / 1e12}) + "\n")
                rows.append(row)
                log.flush()
    print_table(header, rows)


def print_table(header: dict, rows: list[dict]) -> None:
    print(f"\n{header['gpu']}, torch {header['torch']}, triton {header['triton']}, "
          f"{header['date']}: median us per call (speed-up over bf16)")
    names = [k for k in rows[0] if k not in ("shape", "m", "path")]
    print("| shape | M | path | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 3) + "|")
    for row in rows:
        base = row.get("bf16")
        cells = []
        for name in names:
            t = row[name]
            cells.append("n/a" if t is None else
                         f"{t:.1f}" + (f" ({base / t:.2f}x)" if base and name != "bf16" else ""))
        print(f"| {row['shape']} | {row['m']} | {row['path']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
