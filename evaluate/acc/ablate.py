"""Layer-wise ablation of GPTQ's choices on SmolLM2 with real calibration activations.

For each chosen decoder layer and input group (q/k/v, o, gate/up, down), quantize the group's
stacked weight W with every variant and measure the relative output error on HELD-OUT inputs:
    err = tr(D H_eval D^T) / tr(W H_eval W^T),   D = Q(W) - W
(the squared error of the layer outputs over every evaluation token, relative to the outputs'
energy). Inputs come from the float model (evaluate/acc/capture.py), so the variants are
compared on exactly the same statistics; the sequential effect is measured by full runs.

    PYTHONPATH=. python evaluate/acc/ablate.py --grams /tmp/acc/grams.pt --format int4-sym-g64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from compress.formats import WeightFormat, codec
from compress.passes import qparams
from compress.passes.gptq import gptq_quantize

FORMATS = {
    "int4-sym-g64": WeightFormat(type="int", bits=4, group_size=64, symmetric=True),
    "int4-sym-g192": WeightFormat(type="int", bits=4, group_size=192, symmetric=True),
    "int4-asym-g192": WeightFormat(type="int", bits=4, group_size=192, symmetric=False),
    "nvfp4": WeightFormat(type="nvfp4", group_size=16),
    "mxfp4": WeightFormat(type="mxfp4", group_size=32),
}

# name -> keyword arguments of gptq_quantize (None: round-to-nearest with that scale search)
VARIANTS = {
    "rtn minmax": None,
    "rtn mse": {"scale_search": "mse"},
    "gptq dynamic minmax (ours before)": {},
    "gptq static minmax (llm-compressor)": {"static_groups": True},
    "gptq dynamic mse": {"scale_search": "mse"},
    "gptq static mse": {"static_groups": True, "scale_search": "mse"},
    "gptq act-order static minmax": {"act_order": True},
    "gptq act-order static mse": {"act_order": True, "scale_search": "mse"},
}


def rtn(W, H, fmt, scale_search="minmax", global_scale=None):
    c = codec(fmt)
    gs = global_scale if global_scale is not None else c.tensor_scale(W, fmt)
    g = fmt.group_for(W.shape[1])
    wg = W.float().reshape(W.shape[0], -1, g)
    p = qparams.group_params(wg, fmt, gs, torch.diag(H).reshape(-1, g), scale_search)
    return c.decode(c.encode(wg, p), p).reshape(W.shape)


def rel_error(W, Q, H) -> float:
    D = (Q - W).float()
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grams", type=Path, default=Path("/tmp/acc/grams.pt"))
    parser.add_argument("--format", nargs="+", default=["int4-sym-g64"], choices=list(FORMATS))
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25, 29])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--fused-global-scale", action="store_true",
                        help="NVFP4: one global scale per stacked group (q/k/v, gate/up)")
    args = parser.parse_args()
    data = torch.load(args.grams)
    for fmt_name in args.format:
        fmt = FORMATS[fmt_name]
        totals = {v: [] for v in args.variants}
        seconds = {v: 0.0 for v in args.variants}
        for (index, group), weights in data["weights"].items():
            if index not in args.layers:
                continue
            H_cal, H_eval = data["h_cal"][(index, group)], data["h_eval"][(index, group)]
            mats = list(weights.values())
            for v in args.variants:
                start = time.perf_counter()
                qs = []
                for W in mats:   # each module on its own (its own NVFP4 global scale) ...
                    gs = None
                    if args.fused_global_scale:
                        gs = codec(fmt).tensor_scale(torch.cat(mats), fmt)
                    if VARIANTS[v] is None:
                        qs.append(rtn(W, H_cal, fmt, "minmax" if v.endswith("minmax") else "mse",
                                      gs))
                    else:
                        q, _ = gptq_quantize(W, H_cal, fmt, global_scale=gs, **VARIANTS[v])
                        qs.append(q.dequantize())
                seconds[v] += time.perf_counter() - start
                # ... judged together: the group's output error relative to its energy
                totals[v].append(rel_error(torch.cat(mats), torch.cat(qs), H_eval))
        print(f"\n{fmt_name}: mean relative output error on held-out inputs over "
              f"{len(totals[args.variants[0]])} groups (layers {args.layers})"
              + (", fused NVFP4 global scale" if args.fused_global_scale else ""))
        base = sum(totals[args.variants[0]]) / len(totals[args.variants[0]])
        for v in args.variants:
            mean = sum(totals[v]) / len(totals[v])
            print(f"| {fmt_name} | {v} | {mean:.5f} | {mean / base:.3f} | {seconds[v]:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
