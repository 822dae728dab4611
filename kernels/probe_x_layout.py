"""Which weight layout lets the M = 1 INT4 loop read x without Triton's layout conversions?
A compile-only probe (no GPU): a reduced copy of decode.py's M = 1 INT4 loop (the mantissa
decode of `_code_mantissas`, per-word scales, the constant-sum correction) is compiled for sm_90
and its main loop's SASS counted, with STS / LDS / BAR.SYNC (Triton's shared-memory layout
conversions), for:
    RUN 0: today's layout, code slot j of word column c is input 8 c + j (x read strided);
    RUN r: a slot-major repack in runs of r words, slot j of word c is input
           8 r (c // r) + r j + c % r (x read in runs of r contiguous values);
    X2D 0: x loaded 1-D per slot and broadcast over the rows;
    X2D 1: x loaded in the words' own [BLOCK_N, W] shape (row stride 0), the correction too;
    X2D 2: as 1 for the products, the correction from a 1-D load (converted once a tile).
kernels/NOTES.md ("The M = 1 loop: a layout without conversions") has the table.

    PYTHONPATH=/tmp/t36 python kernels/probe_x_layout.py   # /tmp/t36: pip install --target
                                                           # /tmp/t36 --no-deps triton==3.6.0
    TRITON_INTERPRET=1 python kernels/probe_x_layout.py --check   # CPU: every variant is right
    python kernels/probe_x_layout.py --time                # H200: us per call, Llama-3-8B
                                                           # shapes, against the shipped kernel
"""
import argparse
import itertools
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import triton
import triton.language as tl

from compress.kernels.decode import _code_mantissas

VARIANTS = [(0, 0), (4, 1), (4, 2), (8, 1), (8, 2)]         # (RUN, X2D)
TILES = [(8, 2048, 4), (8, 512, 4), (16, 1024, 4), (32, 256, 1)]   # block_n, block_k, warps


@triton.jit
def _xidx(c, j: tl.constexpr, RUN: tl.constexpr):
    """Input index (within the tile) of code slot j of word columns c."""
    if RUN == 0:
        return c * 8 + j                                  # today's layout: x[8c + j]
    else:
        return (c // RUN) * (8 * RUN) + j * RUN + (c % RUN)   # slot-major runs of RUN words


@triton.jit
def _m1_loop_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, KW, G, one, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, RUN: tl.constexpr, X2D: tl.constexpr):
    """y = x @ W^T for INT4 g128 words, M = 1, no masks (compiled, never run)."""
    W: tl.constexpr = BLOCK_K // 8
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, W)
    acc2 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        words = tl.load(w_ptr + rn[:, None] * KW + (k0 // 8 + c)[None, :])
        s = tl.load(s_ptr + rn[:, None] * G + ((k0 + c * 8) // 128)[None, :]).to(tl.float32)
        t = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        if X2D == 1:
            corr = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        else:
            corr = tl.zeros((W,), dtype=tl.float32)
        for j in tl.static_range(0, 8, 2):
            lo, hi = _code_mantissas(words, j, one, 4)
            ia = k0 + _xidx(c, j, RUN)
            ib = k0 + _xidx(c, j + 1, RUN)
            if X2D == 1:
                xa = tl.load(x_ptr + ia[None, :] + rn[:, None] * 0).to(tl.float32)
                xb = tl.load(x_ptr + ib[None, :] + rn[:, None] * 0).to(tl.float32)
                t += xa * lo
                t += xb * hi
                corr += xa * 264.0 + xb * 24.0
            elif X2D == 2:
                xa = tl.load(x_ptr + ia[None, :] + rn[:, None] * 0).to(tl.float32)
                xb = tl.load(x_ptr + ib[None, :] + rn[:, None] * 0).to(tl.float32)
                t += xa * lo
                t += xb * hi
                ya = tl.load(x_ptr + ia).to(tl.float32)
                yb = tl.load(x_ptr + ib).to(tl.float32)
                corr += ya * 264.0 + yb * 24.0
            else:
                xa = tl.load(x_ptr + ia).to(tl.float32)
                xb = tl.load(x_ptr + ib).to(tl.float32)
                t += xa[None, :] * lo
                t += xb[None, :] * hi
                corr += xa * 264.0 + xb * 24.0
        if X2D == 1:
            acc2 += s * (t * 16 - corr)
        else:
            acc2 += s * (t * 16 - corr[None, :])
    tl.store(out_ptr + rn, tl.sum(acc2, axis=1).to(tl.bfloat16))


TYPES = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
         "K": "i32", "KW": "i32", "G": "i32", "one": "i32"}


def repack(codes: torch.Tensor, run: int) -> torch.Tensor:
    """Signed INT4 codes [N, K] -> int32 words [N, K/8] in the layout of `_xidx` (stored code
    + 8 in nibble j, as compressed-tensors packs; run 0: its own order)."""
    n, k = codes.shape
    u = (codes.to(torch.int64) + 8) & 0xF
    if run:
        u = u.view(n, k // (8 * run), 8, run).transpose(2, 3)   # word c % run, then slot j
    u = u.reshape(n, k // 8, 8)
    words = sum(u[..., j] << (4 * j) for j in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def probe_matmul(x, words, scale, n, k, run, x2d, block_n, block_k, warps):
    """y [N] = x [K] @ W^T with the probe kernel (N % block_n == 0, K % block_k == 0)."""
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    _m1_loop_kernel[(n // block_n,)](x, words, scale, out, n, k, k // 8, k // 128, 0x3F800000,
                                     BLOCK_N=block_n, BLOCK_K=block_k, RUN=run, X2D=x2d,
                                     num_warps=warps, num_stages=2)
    return out


def weights(n, k, device):
    gen = torch.Generator(device=device).manual_seed(0)
    codes = torch.randint(-8, 8, (n, k), device=device, generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, k // 128, device=device, generator=gen) * 0.01).to(torch.bfloat16)
    x = torch.randn(k, device=device, generator=gen).to(torch.bfloat16)
    ref = (codes.float() * scale.float().repeat_interleave(128, dim=1)) @ x.float()
    return codes, scale, x, ref


def check(device, shapes, tiles) -> None:
    """Every (variant, tile) against the float reference."""
    for (n, k), (bn, bk, warps), (run, x2d) in itertools.product(shapes, tiles, VARIANTS):
        codes, scale, x, ref = weights(n, k, device)
        y = probe_matmul(x, repack(codes, run), scale, n, k, run, x2d, bn, bk, warps).float()
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        print(f"{n}x{k} bn {bn} bk {bk} run {run} x2d {x2d}: max error {err:.2e} of max |y|"
              f" {'ok' if err < 1e-2 else 'WRONG'}", flush=True)


LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)]


def time_all(reps: int, device: torch.device, shapes=LLAMA_SHAPES) -> None:
    """us per call (CUDA graph, L2 flushed: bench_kernels.time_call), the shipped decode
    kernel in the same run; a markdown table."""
    from bench_kernels import time_call

    from compress.kernels.w4a16 import int_matmul

    dev = device
    flush = torch.empty(256 * 2**20 if dev.type == "cuda" else 1, dtype=torch.int8, device=dev)
    rows = {"shipped decode kernel (today's layout)": []}
    for n, k in shapes:
        codes, scale, x, ref = weights(n, k, dev)
        rows["shipped decode kernel (today's layout)"].append(time_call(
            partial(int_matmul, packed=repack(codes, 0), scale=scale, zero=None, shape=(n, k),
                    bits=4, path="decode"), x[None], dev, reps, flush))
        for (bn, bk, warps), (run, x2d) in itertools.product(TILES[:3], VARIANTS):
            cells = rows.setdefault(f"probe {bn}x{bk}, {warps} warps, run {run}, x2d {x2d}", [])
            if k % bk:
                cells.append(None)
                continue
            fn = partial(probe_matmul, words=repack(codes, run), scale=scale, n=n, k=k,
                         run=run, x2d=x2d, block_n=bn, block_k=bk, warps=warps)
            err = ((fn(x).float() - ref).abs().max() / ref.abs().max()).item()
            cells.append(time_call(fn, x, dev, reps, flush) if err < 1e-2 else float("nan"))
    print("| kernel (us per call; nan: wrong result) | " + " | ".join(f"{n}x{k}" for n, k in shapes)
          + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join("-" if t is None else f"{t * 1e6:.1f}" for t in cells)
              + " |", flush=True)


def sass() -> None:
    from compile_check import compile_one, loop_sass

    for (bn, bk, warps), (run, x2d) in itertools.product(TILES, VARIANTS):
        try:
            k = compile_one(_m1_loop_kernel, TYPES,
                            {"BLOCK_N": bn, "BLOCK_K": bk, "RUN": run, "X2D": x2d},
                            90, num_warps=warps, num_stages=2)
            print(f"bn {bn:3d} bk {bk:5d} w{warps} run {run:2d} x2d {int(x2d)}: "
                  f"{k.metadata.shared} smem{loop_sass(k)}", flush=True)
        except Exception as exc:  # noqa: BLE001 (a probe: report a variant that fails, go on)
            print(f"bn {bn} bk {bk} run {run} x2d {x2d}: FAILED {type(exc).__name__}: "
                  f"{str(exc)[:200]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness (CPU interpreter)")
    parser.add_argument("--time", action="store_true", help="time on the GPU")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--dry-run", action="store_true",
                        help="--time's code on the CPU interpreter, one small shape")
    args = parser.parse_args()
    if args.check:
        on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
        check(torch.device("cuda" if on_gpu else "cpu"), [(16, 2048)],
              [(8, 512, 4), (16, 1024, 4), (8, 2048, 4)])
    elif args.time and args.dry_run:
        time_all(1, torch.device("cpu"), [(16, 2048)])
    elif args.time:
        time_all(args.reps, torch.device("cuda"))
    else:
        sass()


if __name__ == "__main__":
    main()
