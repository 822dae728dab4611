"""`compress compare`: apply each recipe, evaluate and benchmark each artifact, and write a
table (compare.md), the numbers (compare.json) and a Pareto plot (pareto.png).

A sweep resumes: each artifact stores a key (recipe text + model fingerprint + compress
version) in sweep.json; evaluation.json and bench.json store theirs with the settings, so a
re-run skips whatever was already done with the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from compress import __version__
from compress.errors import CompressError, UsageError
from compress.evaluation.report import evaluate, fingerprint, machine, write_json
from compress.progress import console


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cached(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("key") == key else None


def bench(spec: str) -> dict:
    """Speed of one model in a fresh process, so its peak memory is its own (the harness of
    `compress bench`: CUDA graphs on a GPU, eager and labelled "cpu" on the CPU)."""
    done = subprocess.run([sys.executable, "-m", "compress.evaluation.speed", spec],
                          capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompressError(f"benchmark of {spec} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stage(path: Path, key: str, what: str, fn) -> dict:
    """Reuse path's result when its key matches, else compute, stamp and save it."""
    cached = _cached(path, key)
    if cached is not None:
        console.print(f"{what}: reusing {path}")
        return cached
    console.print(f"{what} ...")
    result = fn()
    result["key"] = key
    write_json(result, path)
    return result


def compare(model: str, recipes: list[str], out: Path, tasks: list[str], limit: int | None,
            seq_len: int = 512, max_tokens: int = 8192, run_bench: bool = True) -> dict:
    """The whole sweep; returns what compare.json holds."""
    from compress.pipeline import apply_recipe
    from compress.recipe import load_recipe

    parsed = {}
    for spec in recipes:  # every recipe is checked before any model loads
        recipe = load_recipe(spec)
        name = Path(spec).stem
        if name in parsed or name == "baseline":
            raise UsageError(f"two recipes named {name!r} (or one named 'baseline'): "
                             "give each recipe file a distinct name")
        parsed[name] = recipe
    if tasks:
        from compress.evaluation.lm_eval_adapter import load_tasks

        load_tasks(tasks)
    out.mkdir(parents=True, exist_ok=True)
    model_fp = fingerprint(model)
    settings = dict(seq_len=seq_len, max_tokens=max_tokens, tasks=tasks, limit=limit)
    base = _stage(out / "baseline" / "evaluation.json", _key(model_fp, settings), "baseline",
                  lambda: evaluate(model, None, "stdlib", seq_len, max_tokens, tasks, limit))
    rows = [_row("baseline", base, _bench_stage(out / "baseline", model, model_fp, run_bench))]
    for name, recipe in parsed.items():
        artifact = out / "artifacts" / name
        build_key = _key(recipe.to_yaml(), model, model_fp, __version__)
        if (_cached(artifact / "sweep.json", build_key) is None):
            console.print(f"{name}: applying the recipe")
            apply_recipe(recipe, model, artifact, overwrite=True)
            write_json({"key": build_key, "model": model, "model_fingerprint": model_fp,
                        "compress": __version__}, artifact / "sweep.json")
        else:
            console.print(f"{name}: reusing {artifact}")
        evaluated = _stage(artifact / "evaluation.json", _key(build_key, settings),
                           f"{name}: evaluating",
                           lambda: evaluate(str(artifact), model, "stdlib", seq_len, max_tokens,
                                            tasks, limit, baseline_tasks=base["tasks"]))
        rows.append(_row(name, evaluated, _bench_stage(artifact, str(artifact), build_key,
                                                       run_bench)))
    from compress.versions import versions

    return {"model": model, "model_fingerprint": model_fp, "settings": settings, "rows": rows,
            "versions": versions(), "machine": machine()}


def _bench_stage(folder: Path, spec: str, key: str, run_bench: bool) -> dict | None:
    if not run_bench:
        return None
    return _stage(folder / "bench.json", key, f"{folder.name}: benchmarking", lambda: bench(spec))


def _row(name: str, evaluated: dict, speed: dict | None) -> dict:
    from compress.evaluation.lm_eval_adapter import headline

    tasks = {}
    for task, scores in evaluated["tasks"].items():
        top = headline(scores)
        if top:
            tasks[f"{task} {top[0]}"] = top[1]
    return {"recipe": name, "bits_per_weight": evaluated["size"]["bits_per_weight"],
            "model_bytes": evaluated["size"]["model_bytes"],
            "perplexity": evaluated["perplexity"],
            "kl_divergence": evaluated.get("kl_divergence"),
            "top1_agreement": evaluated.get("top1_agreement"), "tasks": tasks,
            "recovery": evaluated.get("recovery", {}), "speed": speed,
            "fingerprint": evaluated["fingerprint"]["model"]}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(result: dict) -> str:
    """The comparison table, one row per recipe, the baseline first."""
    rows = result["rows"]
    task_cols = sorted({t for row in rows for t in row["tasks"]})
    device = next((r["speed"]["device"] for r in rows if r["speed"]), None)
    head = (["recipe", "bits/weight", "model MB", "perplexity", "KL (nats)", "top-1 agree"]
            + task_cols + [f"prefill tok/s ({device})", f"decode tok/s ({device})",
                           "peak RSS MB" if device == "cpu" else "peak MB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        speed = row["speed"] or {}
        cells = [row["recipe"], _fmt(row["bits_per_weight"], 2),
                 _fmt(row["model_bytes"] / 1e6, 1), _fmt(row["perplexity"], 3),
                 _fmt(row["kl_divergence"], 4), _fmt(row["top1_agreement"], 4)]
        cells += [_fmt(row["tasks"].get(t), 4) for t in task_cols]
        cells += [_fmt(speed.get("prefill_tokens_per_s"), 1),
                  _fmt(speed.get("decode_tokens_per_s"), 2), _fmt(speed.get("peak_memory_mb"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    settings = result["settings"]
    notes = [f"Model: {result['model']} (fingerprint {result['model_fingerprint']}). "
             f"Perplexity/KL/top-1: stdlib evaluation text, {settings['max_tokens']} tokens, "
             f"windows of {settings['seq_len']}. Tasks: lm-eval, limit {settings['limit']}. "
             f"Speed: batch 1, measured on {device}; model MB = weights as held in memory."]
    return "\n".join(lines + [""] + notes) + "\n"


def write_outputs(result: dict, out: Path) -> list[Path]:
    """compare.json, compare.md and pareto.png in `out`."""
    from compress.evaluation.plot import pareto_plot

    write_json(result, out / "compare.json")
    (out / "compare.md").write_text(markdown(result))
    pareto_plot(result, out / "pareto.png")
    return [out / "compare.md", out / "pareto.png", out / "compare.json"]
