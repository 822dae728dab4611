"""Reproduce the prune_heads figures in evaluate/RESULTS.md.

    python evaluate/prune_heads_figures.py decoder   # SmolLM2-135M: scorers vs random
    python evaluate/prune_heads_figures.py encoder   # all-MiniLM-L6-v2: embedding cosine

Run from the repository root with PYTHONPATH=. ; prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from compress.calib import CalibrationConfig, evaluation_windows
from compress.evaluation.accuracy import evaluate_accuracy
from compress.evaluation.embeddings import docstring_sentences, mean_cosine, mean_pooled
from compress.models import load_model
from compress.passes import Context, run_pass
from compress.passes.prune_heads import PruneHeadsConfig


def pruned(loaded, calibration: CalibrationConfig, ids, **target):
    """A pruned deep copy of loaded.model and the pass summary."""
    model = copy.deepcopy(loaded.model)
    ctx = Context(model, loaded.tokenizer, loaded.arch, calibration, torch.device("cpu"))
    ctx._calib_ids = ids  # the same calibration windows for every run
    report = run_pass(ctx, PruneHeadsConfig(**target))
    return model, report


def decoder(args) -> dict:
    loaded = load_model("smollm2-135m")
    calibration = CalibrationConfig(samples=args.samples, seq_len=args.seq_len)
    ctx = Context(loaded.model, loaded.tokenizer, loaded.arch, calibration, torch.device("cpu"))
    ids = ctx.calibration_ids()
    windows = evaluation_windows(loaded.tokenizer, "stdlib", 512, args.eval_tokens)
    target = {"unit": "kv_group", "fraction": args.groups / 90, "max_per_layer": 1}
    result = {"baseline": evaluate_accuracy(loaded.model, windows).perplexity,
              "groups_removed": args.groups, "eval_tokens": int(windows.numel())}
    for scorer in ("ablation", "output_norm"):
        model, report = pruned(loaded, calibration, ids, scorer=scorer, **target)
        result[scorer] = {"perplexity": evaluate_accuracy(model, windows).perplexity,
                          "layers": report.summary["layers_changed"],
                          "seconds": round(report.seconds, 1)}
    randoms = []
    for seed in range(args.seeds):
        model, report = pruned(loaded, calibration, ids, scorer="random", seed=seed, **target)
        randoms.append(evaluate_accuracy(model, windows).perplexity)
    result["random"] = {"perplexities": randoms, "mean": statistics.mean(randoms),
                        "stdev": statistics.stdev(randoms) if len(randoms) > 1 else 0.0,
                        "min": min(randoms), "max": max(randoms)}
    return result


def encoder(args) -> dict:
    loaded = load_model("minilm-l6")
    calibration = CalibrationConfig(samples=args.samples, seq_len=args.seq_len)
    ctx = Context(loaded.model, loaded.tokenizer, loaded.arch, calibration, torch.device("cpu"))
    ids = ctx.calibration_ids()
    texts = docstring_sentences(args.sentences)
    reference = mean_pooled(loaded.model, loaded.tokenizer, texts)

    def cosine(model) -> float:
        return mean_cosine(mean_pooled(model, loaded.tokenizer, texts), reference)

    target = {"unit": "kv_group", "fraction": args.fraction}
    result = {"sentences": len(texts), "fraction": args.fraction}
    for scorer in ("ablation", "output_norm"):
        model, report = pruned(loaded, calibration, ids, scorer=scorer, **target)
        result[scorer] = {"mean_cosine": cosine(model),
                          "heads_after": report.summary["query_heads"]["after"]}
    randoms = [cosine(pruned(loaded, calibration, ids, scorer="random", seed=s, **target)[0])
               for s in range(args.seeds)]
    result["random"] = {"mean_cosines": randoms, "mean": statistics.mean(randoms),
                        "stdev": statistics.stdev(randoms) if len(randoms) > 1 else 0.0}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["decoder", "encoder"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--sentences", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = decoder(args) if args.which == "decoder" else encoder(args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["args"] = vars(args)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
