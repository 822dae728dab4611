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
"""
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton
import triton.language as tl
from compile_check import compile_one, loop_sass

from compress.kernels.decode import _code_mantissas


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


def main() -> None:
    for (bn, bk, warps), (run, x2d) in itertools.product(
            [(8, 2048, 4), (8, 512, 4), (16, 1024, 4), (32, 256, 1)],
            [(0, 0), (4, 1), (4, 2), (8, 1), (8, 2)]):
        try:
            k = compile_one(_m1_loop_kernel, TYPES,
                            {"BLOCK_N": bn, "BLOCK_K": bk, "RUN": run, "X2D": x2d},
                            90, num_warps=warps, num_stages=2)
            print(f"bn {bn:3d} bk {bk:5d} w{warps} run {run:2d} x2d {int(x2d)}: "
                  f"{k.metadata.shared} smem{loop_sass(k)}", flush=True)
        except Exception as exc:  # noqa: BLE001 (a probe: report a variant that fails, go on)
            print(f"bn {bn} bk {bk} run {run} x2d {x2d}: FAILED {type(exc).__name__}: "
                  f"{str(exc)[:200]}", flush=True)


if __name__ == "__main__":
    main()
