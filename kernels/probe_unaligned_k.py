"""Is K = d - 1 what makes Pre-CRMSNorm decode slower (kernels/BENCHMARKS.md, sixth session:
0.933x of the original against Pre-RMSNorm's 1.074x)? CRMSNorm keeps d - 1 of the residual's d
values, so every linear reading the residual has K = 2047 on a 2048-wide model, and a bf16
weight row of 2047 values is not 16-byte aligned. Times x [M, K] @ W^T in a CUDA graph for
K = 2048, K = 2047 contiguous, and K = 2047 as a view of a [N, 2048] buffer (rows aligned).

    python kernels/probe_unaligned_k.py            # GPU; prints one line per shape and M
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_precompute import graph_us  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    for n in (2048, 6144, 8192):            # o/q, fused qkv, FFN up of a Pythia-1.4B-sized model
        for m in (1, 16, 128):
            x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16)
            x7, w7 = x[:, :2047].contiguous(), w[:, :2047].contiguous()
            view = w[:, :2047]                 # row stride 2048: aligned rows
            full = graph_us(lambda: F.linear(x, w))
            odd = graph_us(lambda: F.linear(x7, w7))
            aligned = graph_us(lambda: F.linear(x7, view))
            print(f"N {n:5d} M {m:4d}: K 2048 {full:7.1f} us | K 2047 contiguous {odd:7.1f} us "
                  f"({odd / full:.2f}x) | K 2047 aligned view {aligned:7.1f} us "
                  f"({aligned / full:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
