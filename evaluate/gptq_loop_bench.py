"""Time the GPTQ loop (compress.passes.gptq) against the old column-by-column loop kept as the
test reference, on one random matrix: python evaluate/gptq_loop_bench.py OUT IN [--device D].
Rows: the old loop and ours in natural order (group parameters as the loop reaches them), and
ours with act_order (static group parameters, the default), eager and, on CUDA, with the block
loop replayed as a CUDA graph (COMPRESS_GPTQ_GRAPH)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from column_loop_reference import gptq_quantize_reference

from compress.formats import WeightFormat
from compress.passes.gptq import GRAPH_ENV, gptq_quantize


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
    runs = [("old column loop", gptq_quantize_reference, {}, "1"),
            ("ours", gptq_quantize, {}, "1"),
            ("ours act_order, eager", gptq_quantize, {"act_order": True}, "0")]
    if args.device.startswith("cuda"):
        runs.append(("ours act_order, CUDA graph", gptq_quantize, {"act_order": True}, "1"))
    codes = {}
    for name, fn, kwargs, graph in runs:
        os.environ[GRAPH_ENV] = graph
        fn(w, H, fmt, **kwargs)            # warm-up (CUDA context, kernels)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        q = fn(w, H, fmt, **kwargs)
        q = q[0] if isinstance(q, tuple) else q
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        codes[name] = q.codes
        print(f"{name:30s} {time.perf_counter() - start:.3f} s", flush=True)
    if len(runs) == 4:
        same = (codes[runs[2][0]] == codes[runs[3][0]]).float().mean().item()
        print(f"graph vs eager act_order: {same:.4%} of codes equal")


if __name__ == "__main__":
    main()
