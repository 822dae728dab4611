"""`compress evaluate`: accuracy of a model against its baseline, recovery gates, results JSON.

Recovery of a metric is compressed over baseline, oriented so higher is better and 1.0 means
"as good as the baseline": baseline_ppl / ppl for perplexities, the compressed model's top-1
agreement with the baseline, and task scores as ratios (inverted for lower-is-better metrics).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.evaluation.accuracy import evaluate_accuracy


def fingerprint(spec: str) -> str:
    """The identity of a model source: the same hash `compress apply` records to resume
    (Checkpoint.fingerprint), one definition for both."""
    from compress.runtime.checkpoint import Checkpoint

    return Checkpoint.open(spec).fingerprint()


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _unique_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen, found = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            found.append((name, tensor))
    return found


def size_stats(model: nn.Module) -> dict[str, float]:
    """Bytes of the model as held in memory, and bits per weight of the decoder's linear layers
    (stored weight tensors incl. scales, zero points and sparsity metadata, over in x out)."""
    total = sum(t.numel() * t.element_size() for _, t in _unique_tensors(model))
    bits = weights = 0
    for name, module in model.named_modules():
        if list(module.children()) or not hasattr(module, "in_features") or "lm_head" in name:
            continue
        own = [t for n, t in list(module.named_parameters(recurse=False))
               + list(module.named_buffers(recurse=False)) if n.startswith("weight")]
        bits += 8 * sum(t.numel() * t.element_size() for t in own)
        weights += module.in_features * module.out_features
    return {"model_bytes": total, "bits_per_weight": bits / weights if weights else float("nan")}


def recovery(metrics: dict, tasks: dict, baseline_tasks: dict) -> dict[str, float]:
    """Per-metric recovery (higher is better, 1.0 = baseline)."""
    from compress.evaluation.lm_eval_adapter import HIGHER_IS_BETTER

    out = {}
    if "baseline_perplexity" in metrics:
        out["perplexity"] = metrics["baseline_perplexity"] / metrics["perplexity"]
    if "top1_agreement" in metrics:
        out["top1_agreement"] = metrics["top1_agreement"]
    for task, scores in tasks.items():
        for metric, value in scores.items():
            base = baseline_tasks.get(task, {}).get(metric)
            if base is None or metric in ("bits_per_byte", "byte_perplexity"):
                continue  # one perplexity per task is enough; bits_per_byte repeats it
            ratio = (value / base if base else None) if HIGHER_IS_BETTER.get(metric, True) \
                else (base / value if value else None)
            if ratio is not None:
                out[f"{task}/{metric}"] = ratio
    return out


def failing(rec: dict[str, float], min_recovery: float, result: dict | None = None
            ) -> list[str]:
    """One line per metric below the gate. A NaN or Inf recovery, or any non-finite metric in
    `result` (perplexity nan from a corrupted model), fails: `nan < x` is false, so a plain
    comparison would let it pass."""
    lines = [f"{name}: recovery {value:.4f} < {min_recovery} (compressed/baseline)"
             if math.isfinite(value) else f"{name}: recovery is {value} (not a finite number)"
             for name, value in rec.items() if not (math.isfinite(value) and value >= min_recovery)]
    for name, value in _numbers(result or {}):
        if not math.isfinite(value):
            lines.append(f"{name} is {value}: the model's outputs are not finite")
    return lines


def _numbers(result: dict, prefix: str = ""):
    """(dotted name, value) of every metric in an evaluation result (settings excluded)."""
    for key, value in result.items():
        if key in ("settings", "gate", "versions", "machine", "fingerprint", "seconds",
                   "recovery"):
            continue
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            yield f"{prefix}{key}", value


def results_path(artifact: str, output: Path | None) -> Path | None:
    """Where `compress evaluate` writes its JSON: -o, else ARTIFACT/evaluation.json when that
    directory is writable, else nowhere (stdout only). Checked before the evaluation runs, so
    an unwritable -o fails in a second rather than after the whole evaluation."""
    import tempfile

    from compress.errors import UsageError

    if output is not None:
        output = Path(output)
        if output.is_dir():
            raise UsageError(f"-o {output} is a directory: name the JSON file to write")
        parent = output.parent
        while not parent.exists():
            parent = parent.parent
        try:
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as exc:
            raise UsageError(f"-o {output}: cannot write to {parent} ({exc.strerror}); choose "
                             "a writable location") from None
        return output
    directory = Path(artifact)
    if not directory.is_dir():
        return None
    try:
        tempfile.TemporaryFile(dir=directory).close()
    except OSError:
        return None
    return directory / "evaluation.json"


def evaluate(spec: str, baseline: str | None = None, text: str = "stdlib", seq_len: int = 512,
             max_tokens: int = 16384, tasks: list[str] | None = None, limit: int | None = None,
             batch_size: int = 4, baseline_tasks: dict | None = None) -> dict[str, Any]:
    """Everything `compress evaluate` reports, as one JSON-ready dict. `baseline_tasks`: task
    scores of the baseline already measured (a sweep runs them once)."""
    from compress.calib import evaluation_windows
    from compress.models import load_model
    from compress.versions import versions

    if tasks:
        from compress.evaluation.lm_eval_adapter import load_tasks

        load_tasks(tasks)  # unknown names / unreachable data fail before any model loads
    start = time.perf_counter()
    loaded = load_model(spec)
    base = load_model(baseline) if baseline else None
    windows = evaluation_windows(loaded.tokenizer, text, seq_len, max_tokens)
    metrics = evaluate_accuracy(loaded.model, windows, base.model if base else None,
                                batch_size).to_dict()
    task_scores, base_scores = {}, {}
    if tasks:
        from compress.evaluation.lm_eval_adapter import run_tasks

        task_scores = run_tasks(loaded.model, loaded.tokenizer, tasks, limit, batch_size)
        if base and baseline_tasks is not None:
            base_scores = baseline_tasks
        elif base:
            base_scores = run_tasks(base.model, base.tokenizer, tasks, limit, batch_size)
    recipe = Path(spec) / "recipe.yaml"
    return {
        "model": spec, "baseline": baseline,
        "fingerprint": {"model": fingerprint(spec),
                        "baseline": fingerprint(baseline) if baseline else None},
        "recipe": recipe.read_text() if recipe.is_file() else None,
        "settings": {"text": text, "seq_len": seq_len, "max_tokens": max_tokens,
                     "tasks": tasks or [], "limit": limit, "batch_size": batch_size},
        **metrics, "tasks": task_scores, "baseline_tasks": base_scores,
        "size": size_stats(loaded.model),
        "baseline_size": size_stats(base.model) if base else None,
        "recovery": recovery(metrics, task_scores, base_scores),
        "versions": versions(), "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - start, 1),
    }


def write_json(result: dict, path: Path) -> None:
    """Atomic write: a reader never sees half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
