"""Kernel launches of one decode step, counted on the CPU, as each run-time fusion of
compress.load is added (the H200 profile counts them for real; this shows what each fusion
removes without a GPU). A small Llama (bench_e2e's TINY shape, INT4 decoder linears, bf16,
static cache) runs one batch-1 decode step under Triton's interpreter; every Triton launch
counts one, and every torch operator that reaches a kernel counts one (views and metadata
operators count none; on CUDA a few of these are several kernels or none, so the operator
count is a close proxy, not the profile). Per layer is the difference of a 3- and a 2-layer
model; the rest is the step's fixed part (embedding, masks, final norm, lm_head, argmax).

    TRITON_INTERPRET=1 COMPRESS_KERNELS=always python kernels/count_launches.py
    PYTHONPATH=/tmp/tf517site ... (transformers 5.17, the H200 machine's: repeat_kv is there)
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("COMPRESS_KERNELS", "always")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_e2e import FORMATS, TINY, build, compress_linears
from torch.utils._python_dispatch import TorchDispatchMode

# operators that launch nothing on CUDA: metadata and allocation (scalar_tensor does count:
# SDPA turns a boolean mask into 0 / -inf with two scalar tensors made on the mask's device)
FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
        "alias", "lift_fresh", "sym_size", "sym_stride", "is_same_size", "_local_scalar_dense",
        "item", "set_", "resize_", "promote_types", "_unsafe_view"}


class Launches(TorchDispatchMode):
    """Counts torch operators that launch a kernel, and Triton launches (by kernel name)."""

    active: Launches | None = None   # the counter Triton launches go to (count_triton)

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_triton and not func.is_view and name not in FREE:
            self.counts[f"torch.{name}"] += 1
        return func(*args, **(kwargs or {}))


def count_triton() -> None:
    """Wrap the interpreter's launch (once) so each kernel call counts once in the active
    counter (the interpreter's own tensor copies are not launches)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    if getattr(original, "counted", False):
        return

    def run(self, *args, **kwargs):
        mode = Launches.active
        if mode is None:
            return original(self, *args, **kwargs)
        mode.counts[f"triton.{self.fn.__name__}"] += 1
        mode.inside_triton += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            mode.inside_triton -= 1

    run.counted = True
    InterpretedFunction.run = run


def step_launches(layers: int, fusions: list[str]) -> Counter:
    """Launches of one decode step (prompt of 4 tokens first) with the named fusions on."""
    from transformers import StaticCache

    from compress.runtime import fused
    from compress.runtime.attention import pack_gqa_decode
    from compress.runtime.kv_cache import fuse_static_cache
    from compress.runtime.norms import fuse_residual_norms, fuse_rmsnorms
    from compress.runtime.rope import fuse_rope

    model = build(TINY, layers, "cpu")
    compress_linears(model, FORMATS["int4"])
    fused.GATED_MLP = "gated" in fusions   # "gated" acts through fuse_projections ("qkv")
    apply = {"norms": fuse_rmsnorms, "rope": fuse_rope, "gqa": pack_gqa_decode,
             "qkv": fused.fuse_projections, "residual": fuse_residual_norms,
             "cache": fuse_static_cache}
    for name in fusions:
        if name in apply:
            apply[name](model)
    cache = StaticCache(config=model.config, max_cache_len=8)
    ids = torch.randint(0, TINY["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache, cache_position=torch.arange(4), use_cache=True)
        tok, pos = ids[:, -1:], torch.tensor([4])
        mode = Launches()
        count_triton()
        Launches.active = mode
        try:
            with mode:
                logits = model(tok, past_key_values=cache, cache_position=pos,
                               use_cache=True).logits
                logits[:, -1:].argmax(-1)
        finally:
            Launches.active = None
    return mode.counts


def main() -> None:
    import transformers

    steps = [("none (INT4 linears only)", []), ("+ fused RMSNorm", ["norms"]),
             ("+ RoPE kernel", ["norms", "rope"]), ("+ packed GQA", ["norms", "rope", "gqa"]),
             ("+ q/k/v, gate/up fused", ["norms", "rope", "gqa", "qkv"]),
             ("+ residual adds", ["norms", "rope", "gqa", "qkv", "residual"]),
             ("+ static cache update", ["norms", "rope", "gqa", "qkv", "residual", "cache"]),
             ("+ gated MLP epilogue (= compress.load on CUDA)",
              ["norms", "rope", "gqa", "qkv", "residual", "cache", "gated"])]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: launches of "
          "one decode step (batch 1), TINY Llama shape, INT4 linears", file=sys.stderr)
    rows = []
    for label, fusions in steps:
        two, three = step_launches(2, fusions), step_launches(3, fusions)
        per_layer = three - two
        fixed = sum(two.values()) - 2 * sum(per_layer.values())
        rows.append((label, sum(per_layer.values()), fixed, per_layer))
        print(f"{label}: per layer {dict(sorted(per_layer.items()))}", file=sys.stderr)
    print("| run-time fusions (cumulative) | launches a layer | fixed a step | "
          "a step of a 32-layer model |")
    print("|---|---|---|---|")
    for label, layer, fixed, _ in rows:
        print(f"| {label} | {layer} | {fixed} | {32 * layer + fixed} |")


if __name__ == "__main__":
    main()
