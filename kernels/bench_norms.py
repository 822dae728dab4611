"""LayerNorm vs RMSNorm vs CRMSNorm: time per token, alone and inside a small Pre-LN model.

    PYTHONPATH=. OMP_NUM_THREADS=1 python kernels/bench_norms.py [--tokens 2048] [--json out.json]

Op level: the norm of a [tokens, width] float32 tensor with PyTorch's own kernels
(F.layer_norm, F.rms_norm) and compress's CRMSNorm (imported, not copied), at several widths.
Model level: a random-weight GPT-2-shaped model converted by the rmsnorm pass (Pre-LN,
Pre-RMSNorm, Pre-CRMSNorm; the same function, exact), forward time per token: what the paper's
1-10% claim is about. Timing uses torch.utils.benchmark (warm-up, adaptive repeats, median).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from compress.runtime.norms import crms_norm

WIDTHS = (256, 576, 768, 1024, 2048, 4096)


def median_us_per_token(fn, tokens: int, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median / tokens * 1e6


def layer_norm_eager(x: torch.Tensor, eps: float) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


def op_fns(x: torch.Tensor) -> dict:
    """The norms to time on one zero-mean input x: [tokens, width]."""
    width = x.shape[-1]
    w, b = torch.ones(width), torch.zeros(width)
    x_small = x[:, :-1].contiguous()
    return {
        "layernorm": lambda: F.layer_norm(x, (width,), w, b, 1e-5),
        "layernorm_noaffine": lambda: F.layer_norm(x, (width,), None, None, 1e-5),
        "rmsnorm": lambda: F.rms_norm(x, (width,), None, 1e-5),
        # the same arithmetic written op by op, like crms_norm: like-for-like for CRMSNorm
        "layernorm_eager": lambda: layer_norm_eager(x, 1e-5),
        "rmsnorm_eager": lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5),
        "crmsnorm": lambda: crms_norm(x_small, width, 1e-5),
    }


def bench_ops(tokens: int, min_run_time: float) -> list[dict]:
    rows = []
    for width in WIDTHS:
        x = torch.randn(tokens, width)
        row = {"width": width}
        for name, fn in op_fns(x - x.mean(-1, keepdim=True)).items():
            with torch.no_grad():
                row[name] = median_us_per_token(fn, tokens, min_run_time)
        rows.append(row)
    return rows


def bench_model(width: int, layers: int, tokens: int, min_run_time: float) -> dict:
    """Forward time per token of a Pre-LN GPT-2 shape and its exact conversions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from compress.calib import CalibrationConfig
    from compress.models import arch_for
    from compress.passes import Context, run_pass
    from compress.passes.rmsnorm import RMSNormConfig

    torch.manual_seed(0)
    config = GPT2Config(n_embd=width, n_layer=layers, n_head=width // 64, vocab_size=512,
                        n_positions=tokens)
    base = GPT2LMHeadModel(config).eval()
    models = {"pre-ln": base}
    for mode in ("rmsnorm", "crmsnorm"):
        model = copy.deepcopy(base)
        run_pass(Context(model, None, arch_for(config), CalibrationConfig(),
                         torch.device("cpu")), RMSNormConfig(mode=mode))
        models[f"pre-{mode}"] = model
    ids = torch.randint(0, 512, (1, tokens))
    row = {"width": width, "layers": layers, "tokens": tokens}
    for name, model in models.items():
        with torch.no_grad():
            row[name] = median_us_per_token(lambda m=model: m(ids, use_cache=False), tokens,
                                            min_run_time)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    info = {"machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"# {info}")
    ops = bench_ops(args.tokens, args.min_run_time)
    print("| width | LN (fused) | LN no affine (fused) | RMS (F.rms_norm) | RMS saves | "
          "LN (eager) | RMS (eager) | CRMS (eager) | RMS eager saves | CRMS eager saves |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ops:
        print(f"| {r['width']} | {r['layernorm']:.4f} | {r['layernorm_noaffine']:.4f} | "
              f"{r['rmsnorm']:.4f} | {100 * (1 - r['rmsnorm'] / r['layernorm']):+.1f}% | "
              f"{r['layernorm_eager']:.4f} | {r['rmsnorm_eager']:.4f} | {r['crmsnorm']:.4f} | "
              f"{100 * (1 - r['rmsnorm_eager'] / r['layernorm_eager']):+.1f}% | "
              f"{100 * (1 - r['crmsnorm'] / r['layernorm_eager']):+.1f}% |")
    models = [bench_model(768, 4, 256, args.min_run_time * 2),
              bench_model(1024, 4, 256, args.min_run_time * 2)]
    print("\n| model (GPT-2 shape) | Pre-LN | Pre-RMSNorm | Pre-CRMSNorm | RMS saves | "
          "CRMS saves |")
    print("|---|---|---|---|---|---|")
    for r in models:
        print(f"| d={r['width']}, {r['layers']} layers, {r['tokens']} tokens | "
              f"{r['pre-ln']:.2f} | {r['pre-rmsnorm']:.2f} | {r['pre-crmsnorm']:.2f} | "
              f"{100 * (1 - r['pre-rmsnorm'] / r['pre-ln']):+.1f}% | "
              f"{100 * (1 - r['pre-crmsnorm'] / r['pre-ln']):+.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "ops_us_per_token": ops, "models_us_per_token": models}, f,
                      indent=2)


if __name__ == "__main__":
    main()
