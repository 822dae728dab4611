"""Time the GPTQ loop (compress.passes.gptq) against the old column-by-column loop kept as the
test reference, on one random matrix: python evaluate/gptq_loop_bench.py OUT IN [--device D]."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from column_loop_reference import gptq_quantize_reference

from compress.formats import WeightFormat
from compress.passes.gptq import gptq_quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_features", type=int)
    parser.add_argument("in_features", type=int)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2048, args.in_features, device=args.device)
    H, w = 2 * x.T @ x / len(x), torch.randn(args.out_features, args.in_features,
                                              device=args.device) * 0.05
    fmt = WeightFormat(type="int", group_size=128)
    for name, fn in (("old", gptq_quantize_reference), ("new", gptq_quantize)):
        fn(w, H, fmt)                      # warm-up (CUDA context, kernels)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(w, H, fmt)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"{name} {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
