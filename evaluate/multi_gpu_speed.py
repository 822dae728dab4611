"""Data-parallel GPTQ on one host (`compress apply --gpus N`): time and peak memory per GPU.

    # H200 x4: Llama-3-8B shapes, W4A16 g128 GPTQ, 128 x 2048 calibration, on 1, 2 and 4 GPUs
    python evaluate/multi_gpu_speed.py --out $OUT --shape 8b --gpus 1,2,4 --layers 8 --budget 330
    # Llama-3-70B shapes (80 layers) streamed from disk on 4 GPUs, in parts of at most
    # --budget seconds: a part that runs out interrupts the run (it is kept), and the same
    # command resumes it; the table adds up the parts
    python evaluate/multi_gpu_speed.py --out $OUT --shape 70b --gpus 4 --budget 330
    # CPU check (gloo ranks): tiny shapes
    python evaluate/multi_gpu_speed.py --tiny --device cpu --gpus 1,2
    python evaluate/multi_gpu_speed.py --tiny --device cpu --shape 70b --gpus 2 --budget 60

SPEED ONLY: random bf16 weights (std 0.02) and random printable text through a byte-level
tokenizer (both from evaluate/gptq_gpu_speed.py). Each run is `python -m compress apply ...
--gpus N --dtype bfloat16 --json` in its own process group; its log goes to --out. Columns:
wall s = the whole command (imports, starting the ranks, loading, hashing the model for resume,
calibration, saving); pass s = the quantize pass on rank 0 (calibration and solves); stats s
and solve s = its time gathering the statistics (the part more GPUs divide) and in the solves
(spread whole over the GPUs); peak GB = torch's peak allocated memory of each rank's GPU (CPU:
the peak RSS of each rank).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_gpu_speed import build_model, calibration_text  # the same model and text

SHAPES = {  # hidden, intermediate, heads, KV heads, vocab, layers
    "8b": (4096, 14336, 32, 8, 128256, 32),
    "70b": (8192, 28672, 64, 8, 128256, 80),
}
TINY = (64, 128, 4, 2, 512)   # --tiny: these widths, 2 layers (4 for 70b), 8 x 64 tokens


def recipe_file(path: Path, args, text: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "calibration": {"source": str(text), "samples": args.samples, "seq_len": args.seq,
                        "seed": 0, "batch_size": args.batch_size},
        "passes": [{"pass": "quantize", "format": "int4", "group_size": args.group_size,
                    "symmetric": True, "method": "gptq", "ignore": ["lm_head"]}]},
        sort_keys=False))
    return path


def run_apply(args, model: Path, recipe: Path, artifact: Path, gpus: int, fresh: bool,
              seconds: float, log: Path) -> dict:
    """One `compress apply` in its own process group; SIGINT to the group when `seconds` run
    out (rank 0 keeps the run for resume). Returns the report, or what stopped it."""
    command = [sys.executable, "-m", "compress", "apply", str(recipe), str(model), "-o",
               str(artifact), "--gpus", str(gpus), "--device", args.device, "--dtype",
               "bfloat16", "--json"] + (["--restart", "--overwrite"] if fresh else [])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    with open(log, "a") as err:
        err.write(" ".join(command) + "\n")
        err.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=env, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(seconds, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)       # like Ctrl-C: every rank
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            return {"wall": time.perf_counter() - start, "interrupted": True}
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = (log.read_text().strip().splitlines() or ["?"])[-1]
        return {"wall": wall, "error": f"exit {proc.returncode}: {tail[:200]}"}
    report = json.loads(out.strip().splitlines()[-1])
    stages = report["passes"][0]["summary"].get("seconds", {})   # statistics, awq, solve
    return {"wall": wall, "apply": report["seconds"],
            "pass": sum(p["seconds"] for p in report["passes"]),
            "statistics": stages.get("statistics"), "solve": stages.get("solve"),
            "peaks": [r["peak_memory_gb"] for r in report["ranks"]],
            "resumed": report.get("resumed", False)}


def layers_done(artifact: Path) -> int:
    """Layers an interrupted run has finished (from its run state), for the progress line."""
    state = artifact.parent / f".{artifact.name}.partial" / "run.json"
    if not state.is_file():
        return 0
    current = json.loads(state.read_text()).get("current")
    return current["layer"] + 1 if current else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/mgpu_speed")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mgpu_speed_work"),
                        help="models and artifacts (local disk: 8b about 16 GB, 70b 140 GB)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--tiny", action="store_true", help="tiny widths, for a CPU check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", default="1,2,4", help="ranks per run, comma-separated")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for this command; 70b: a run cut short resumes next time")
    args = parser.parse_args()
    begin = time.perf_counter()
    hidden, inter, heads, kv, vocab, layers = SHAPES[args.shape]
    if args.tiny:
        hidden, inter, heads, kv, vocab = TINY
        layers, args.samples, args.seq, args.group_size = 4 if args.shape == "70b" else 2, 8, \
            64, 32
    layers = args.layers or layers
    args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = \
        hidden, inter, heads, kv, vocab        # what build_model reads
    counts = [int(n) for n in args.gpus.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    name = f"{args.shape}{'-tiny' if args.tiny else ''}-{layers}l"
    t = time.perf_counter()
    model = build_model(args.work / f"llama-{name}", args, layers)
    print(f"model {model} ready in {time.perf_counter() - t:.1f} s", flush=True)
    text = calibration_text(args.work / "calibration.txt", args)
    recipe = recipe_file(args.work / f"gptq-{args.samples}x{args.seq}.yaml", args, text)
    left = lambda: args.budget - (time.perf_counter() - begin)
    rows = []
    streamed = args.shape == "70b"
    for gpus in counts:
        if left() < 10:
            rows.append((gpus, {"error": "skipped: budget spent"}))
            continue
        artifact = args.work / f"artifact-{name}-{gpus}gpu"
        log = args.out / f"apply-{name}-{gpus}gpu.log"
        parts = args.work / f"parts-{name}-{gpus}gpu.json"   # 70b: the parts of one run
        before = json.loads(parts.read_text()) if streamed and parts.is_file() and \
            layers_done(artifact) else []
        result = run_apply(args, model, recipe, artifact, gpus, fresh=not before, seconds=left(),
                           log=log)
        result["layers_done"] = layers if "apply" in result else layers_done(artifact)
        if streamed:
            parts.write_text(json.dumps(before + [result]))
            result["parts"] = len(before) + 1
            result["wall_total"] = sum(p["wall"] for p in before) + result["wall"]
        rows.append((gpus, result))
        print(json.dumps({"gpus": gpus, **result}), flush=True)
    (args.out / f"results-{name}.json").write_text(json.dumps(
        [{"gpus": g, **r} for g, r in rows], indent=1))
    print_table(rows, args, name, layers, streamed)


def print_table(rows, args, name: str, layers: int, streamed: bool) -> None:
    base = next((r for g, r in rows if g == 1 and "pass" in r), None)
    print(f"\n{name}: W4A16 g{args.group_size} GPTQ, {args.samples} x {args.seq} calibration "
          f"tokens, device {args.device}, compute bfloat16")
    print(f"{'GPUs':>4} {'wall s':>8} {'pass s':>8} {'stats s':>8} {'solve s':>8} "
          f"{'x (pass)':>8} {'x (wall)':>8} {'peak GB per GPU':>24}  note")
    for gpus, r in rows:
        if "pass" not in r:
            what = r.get("error") or (f"interrupted at the budget after {r['layers_done']}/"
                                      f"{layers} layers: rerun the same command to resume")
            print(f"{gpus:4} {r.get('wall', 0):8.1f} {'-':>8} {'-':>8} {'-':>8} {'-':>8} "
                  f"{'-':>8} {'-':>24}  {what}")
            continue
        fast = f"{base['pass'] / r['pass']:8.2f}" if base else f"{'-':>8}"
        fast_wall = f"{base['wall'] / r['wall']:8.2f}" if base else f"{'-':>8}"
        peaks = ",".join(f"{p:.1f}" for p in r["peaks"])
        note = (f"{r['parts']} parts, {r['wall_total']:.0f} s wall in all (each resume "
                "re-hashes the model and re-runs the finished layers' forward)"
                if streamed and r.get("parts", 1) > 1 else "")
        stages = " ".join(f"{r[k]:8.1f}" if r.get(k) is not None else f"{'-':>8}"
                          for k in ("statistics", "solve"))
        print(f"{gpus:4} {r['wall']:8.1f} {r['pass']:8.1f} {stages} {fast} {fast_wall} "
              f"{peaks:>24}  {note}")
    print("x: speed-up over 1 GPU in the same command. Random weights and text: speed only.")


if __name__ == "__main__":
    main()
