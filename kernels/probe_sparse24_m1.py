"""2:4 at M = 1 on the H200: the M = 1 kernel (compress/kernels/sparse24.py
_sparse24_gemv_kernel, x loaded once for a tile's rows, kept positions picked by a byte
permute) in several launch configs against its shipped config (the "sparse24" table), cuBLAS
bf16 and torch's semi-structured 2:4 in the same run (Llama-3-8B shapes, CUDA graph, L2 flushed: bench_kernels'
timing). Every kernel is checked against the reference first.

    python kernels/probe_sparse24_m1.py [--reps 30] [--out $OUT/nvidia_h200.json]    # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import SHAPES, check, make_variants, time_call

from compress.kernels import _common as C
from compress.kernels import sparse24

# transposed-kernel candidates: decode._gemv_kernel's INT4 shapes, fewer and more rows, split-K
# (in one launch since the fifteenth session: _common.split_total, no zero fill, no cast)
TRANSPOSED = [C.Config(1, 8, 1024, 2), C.Config(1, 8, 1024, 4), C.Config(1, 4, 1024, 2),
              C.Config(1, 16, 1024, 4), C.Config(1, 8, 2048, 4), C.Config(1, 8, 512, 1),
              C.Config(1, 8, 1024, 2, split_k=2), C.Config(1, 4, 512, 1),
              C.Config(1, 4, 1024, 2, split_k=2), C.Config(1, 8, 2048, 4, split_k=2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None,
                        help="write the device's config file with the \"sparse24\" table "
                             "measured here (each shape's fastest, the default: the smallest "
                             "summed slowdown), as kernels/autotune.py writes the others")
    args = parser.parse_args()
    device = torch.device("cuda")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    rows = {}
    best: dict[str, dict[str, dict]] = {}   # value kind -> "NxK" -> config -> seconds
    for label, (n, k) in SHAPES.items():
        v = make_variants(n, k, device)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        row = rows.setdefault(label, {})
        row["bf16"] = time_call(v["bf16"][0], x, device, args.reps, flush)
        if "torch-2:4-bf16" in v:
            row["torch 2:4"] = time_call(v["torch-2:4-bf16"][0], x, device, args.reps, flush)
        for name, kind in (("2:4-bf16", "16bit"), ("2:4-int4-g128", "int")):
            fn, ref = v[name]
            check(name, fn, ref, x)
            row[f"{name} shipped"] = time_call(fn, x, device, args.reps, flush)
            for cfg in TRANSPOSED:
                sparse24.GEMV_CONFIG = cfg
                try:
                    check(name, fn, ref, x)
                    t = time_call(fn, x, device, args.reps, flush)
                finally:
                    sparse24.GEMV_CONFIG = None
                row[f"{name} T {cfg.block_n}x{cfg.block_k}/{cfg.num_warps}w"
                    + (f"/s{cfg.split_k}" if cfg.split_k > 1 else "")] = t
                best.setdefault(kind, {}).setdefault(f"{n}x{k}", {})[cfg] = t
        print(label, {c: round(t * 1e6, 1) for c, t in row.items()}, flush=True)
    if args.out:
        write_table(best, args.out, device)
    cols = list(next(iter(rows.values())))
    print("\n| kernel (us, speed-up over cuBLAS bf16) | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for c in cols:
        print(f"| {c} | " + " | ".join(f"{r[c] * 1e6:.1f} ({r['bf16'] / r[c]:.2f}x)"
                                      if c in r else "-" for r in rows.values()) + " |")


def write_table(best: dict, out: str, device) -> None:
    """configs/<gpu>.json (the shipped one, else default.json) with its "sparse24" table
    replaced: per value kind, each shape's fastest config and the default."""
    own = C.CONFIG_DIR / f"{C.gpu_config_name(device)}.json"
    table = json.loads((own if own.exists() else C.CONFIG_DIR / "default.json").read_text())
    entries = {}
    for kind, shapes in best.items():
        entry = {s: min(times, key=times.get).to_dict() for s, times in shapes.items()}
        slowdown = {c: sum(times[c] / min(times.values()) for times in shapes.values())
                    for c in TRANSPOSED}
        entry["default"] = min(slowdown, key=slowdown.get).to_dict()
        entries[f"{kind}/m1"] = entry
    entries["*/m1"] = {"default": entries["int/m1"]["default"]}
    table["sparse24"] = entries
    Path(out).write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out}: commit it as compress/kernels/configs/{own.name}")


if __name__ == "__main__":
    main()
