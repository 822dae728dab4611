"""CPU batch-1 decode of an artifact against its float32 original, interleaved.

    python kernels/bench_cpu_decode.py ARTIFACT [--baseline smollm2-135m] [--pairs 12]

`compress bench --device cpu` times the artifact, then the baseline: on a shared machine whose
load moves by 2x within minutes (the 2-core CI host) that order decides the ratio (0.82-1.04x
over four runs of the same pair, kernels/BENCHMARKS.md). Here both models are loaded once and
timed in alternating blocks of decode steps (the order flips each pair), so a change of load
falls on both; the speed ratio is the median over pairs of float ms / artifact ms per step.
Both models run eagerly with a dynamic cache, as compress bench runs them on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--baseline", default="smollm2-135m")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed block")
    parser.add_argument("--pairs", type=int, default=12)
    args = parser.parse_args()

    import compress
    from compress.evaluation.bench import eager_decode_step_s
    from compress.models import load_model, set_offline_unless_asked

    def ms_per_step(model, steps: int) -> float:   # compress bench's own CPU decode timing
        return eager_decode_step_s(model, ids, steps) * 1e3

    set_offline_unless_asked()
    artifact = compress.load(args.artifact)
    baseline = load_model(args.baseline).model.eval()
    ids = torch.randint(0, baseline.config.vocab_size, (1, args.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    timed = {"artifact": [], "float32": []}
    with torch.inference_mode():
        ms_per_step(artifact, 4)   # warm-up: the artifact decodes its weights once here
        ms_per_step(baseline, 4)
        for pair in range(args.pairs):
            order = [("artifact", artifact), ("float32", baseline)][::1 if pair % 2 else -1]
            for name, model in order:
                timed[name].append(ms_per_step(model, args.steps))
    ratios = [f / a for a, f in zip(timed["artifact"], timed["float32"])]
    print(f"cpu, {torch.get_num_threads()} threads, batch 1, prompt {args.prompt_len}, "
          f"{args.pairs} pairs of {args.steps} decode steps")
    print("| model | ms/step (median) | decode tok/s |")
    print("|---|---|---|")
    for name, values in timed.items():
        ms = statistics.median(values)
        print(f"| {name} | {ms:.2f} | {1e3 / ms:.2f} |")
    print(f"speed ratio (float32 ms / artifact ms): median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
