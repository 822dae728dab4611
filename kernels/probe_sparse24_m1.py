"""2:4 at M = 1 on the H200: the transposed kernel (compress/kernels/sparse24.py
_sparse24_gemv_kernel, x loaded once for a tile's rows, kept positions picked by a byte
permute) in several launch configs against the gather kernel it would replace
(_sparse24_m1_kernel, x read at the kept positions, its shipped config), cuBLAS bf16 and torch's
semi-structured 2:4 in the same run (Llama-3-8B shapes, CUDA graph, L2 flushed: bench_kernels'
timing). Every kernel is checked against the reference first.

    python kernels/probe_sparse24_m1.py [--reps 30]     # GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import SHAPES, check, make_variants, time_call

from compress.kernels import _common as C
from compress.kernels import sparse24

# transposed-kernel candidates: decode._gemv_kernel's INT4 shapes, fewer and more rows, split-K
TRANSPOSED = [C.CONFIGS["sparse24_gemv"], C.Config(1, 8, 1024, 4), C.Config(1, 4, 1024, 2),
              C.Config(1, 16, 1024, 4), C.Config(1, 8, 2048, 4), C.Config(1, 8, 512, 1),
              C.Config(1, 8, 1024, 2, split_k=2), C.Config(1, 4, 512, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    rows = {}
    for label, (n, k) in SHAPES.items():
        v = make_variants(n, k, device)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        row = rows.setdefault(label, {})
        row["bf16"] = time_call(v["bf16"][0], x, device, args.reps, flush)
        if "torch-2:4-bf16" in v:
            row["torch 2:4"] = time_call(v["torch-2:4-bf16"][0], x, device, args.reps, flush)
        for name in ("2:4-bf16", "2:4-int4-g128"):
            fn, ref = v[name]
            check(name, fn, ref, x)
            row[f"{name} gather"] = time_call(fn, x, device, args.reps, flush)
            shipped = C.CONFIGS["sparse24_gemv"]
            sparse24.TRANSPOSED_M1 = True
            for cfg in TRANSPOSED:
                C.CONFIGS["sparse24_gemv"] = cfg
                try:
                    check(name, fn, ref, x)
                    row[f"{name} T {cfg.block_n}x{cfg.block_k}/{cfg.num_warps}w"
                        + (f"/s{cfg.split_k}" if cfg.split_k > 1 else "")] = time_call(
                        fn, x, device, args.reps, flush)
                finally:
                    C.CONFIGS["sparse24_gemv"] = shipped
            sparse24.TRANSPOSED_M1 = False
        print(label, {c: round(t * 1e6, 1) for c, t in row.items()}, flush=True)
    cols = list(next(iter(rows.values())))
    print("\n| kernel (us, speed-up over cuBLAS bf16) | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for c in cols:
        print(f"| {c} | " + " | ".join(f"{r[c] * 1e6:.1f} ({r['bf16'] / r[c]:.2f}x)"
                                      if c in r else "-" for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
