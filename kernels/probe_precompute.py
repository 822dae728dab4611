"""Why INT4 + precompute decodes slower than INT4 on the Llama-3.2-1B shape (bench_passes,
2026-12-03: 627.6 against 710.0 tok/s): the kernels of one decode-sized forward of each, and
the decode step again with the LM head given its own contiguous weight instead of the view of
the table's residual columns (a tied model's head reads the table in place: rows of d values
at a stride of the table's row width).

    python kernels/bench_passes.py --work /tmp/bp --subjects llama-1b \
        --rows "int4,int4 + precompute"
    python kernels/probe_precompute.py --work /tmp/bp

Diagnosis only (GPU): the rows that count are bench_passes.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def graph_us(fn, reps: int = 200) -> float:
    """Median microseconds of fn replayed from a CUDA graph (as compress bench runs decode),
    with compress bench's own capture and timer."""
    from compress.evaluation.bench import _as_cuda_graph, _timed

    method, replay = _as_cuda_graph(fn)
    if not method.startswith("cuda graph"):
        raise SystemExit(method)
    return _timed(replay, torch.device("cuda"), reps) * 1e6


def head_matmul(vocab: int, d: int, row: int) -> None:
    """x [1, d] @ W^T with W [vocab, d] contiguous, and W a view of a [vocab, row] table."""
    x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(vocab, row, device="cuda", dtype=torch.bfloat16)
    view = table[:, :d]
    own = view.contiguous()
    own_us, view_us = graph_us(lambda: F.linear(x, own)), graph_us(lambda: F.linear(x, view))
    print(f"head matmul M=1, [{vocab}, {d}] bf16: contiguous {own_us:.1f} us, "
          f"view at row stride {row}: {view_us:.1f} us")


def top_kernels(model: nn.Module, label: str, steps: int = 20) -> None:
    """Kernels of `steps` one-token forwards (no cache: the linears, norms, table and head as
    in a decode step; attention over one position)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 256, (1, 1), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            model(ids, use_cache=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                model(ids, use_cache=False)
            torch.cuda.synchronize()
    print(f"\n{label}: top kernels over {steps} forwards")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                    max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bp"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    from compress.cli import _load_for_run
    from compress.evaluation.bench import measure_speed
    from compress.runtime.precompute import PrecomputedEmbedding

    head_matmul(128256, 2048, 2048 + 2048 + 2 * 512)
    for row in ("int4", "int4_precompute"):
        model, _ = _load_for_run(str(args.work / "llama-1b" / row), "cuda", "bfloat16")
        top_kernels(model, row)
        speed = measure_speed(model, row)
        print(f"{row}: decode {speed.decode_tokens_per_s:.1f} tok/s")
        tables = [m for m in model.modules() if isinstance(m, PrecomputedEmbedding)]
        if tables and tables[0].handoff.head is not None:
            head = tables[0].handoff.head
            tables[0].handoff.head = None          # no re-sharing on the next forward
            head.weight = nn.Parameter(head.weight.detach().contiguous(), requires_grad=False)
            speed = measure_speed(model, row + " (own head)")
            print(f"{row}, LM head with its own contiguous weight: decode "
                  f"{speed.decode_tokens_per_s:.1f} tok/s")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
