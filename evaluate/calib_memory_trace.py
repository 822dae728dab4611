"""Where the GPU memory of a calibrated pass goes (issue 15's memory goal): runs `compress apply`
on CUDA once with the peak GPU memory measured around each calibration stage, and with torch's
allocator history on, then prints the stages and the tensors alive at the overall peak grouped
by the line of compress (or transformers) that allocated them.

    python evaluate/gptq_gpu_speed.py --only-big --layers 2 --work /tmp/gswork --out /tmp/gs
    python evaluate/calib_memory_trace.py /tmp/gswork/llama-2l --recipe gptq --out $OUT/trace

The model is one written by gptq_gpu_speed.py (Llama-3-8B shapes, random weights); the
calibration is the same (128 x 2048 random-text tokens, batch --batch-size). Diagnosis only:
the figures that count are gptq_gpu_speed.py's.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evaluate"))

GIB = 2**30


def watch_stages(log: list) -> None:
    """Wrap the calibration stages: each records (stage, layer, GiB allocated before, peak GiB
    during, GiB allocated after). A stage resets the peak counter on entry, so it hands what it
    saw up to the stage around it (LayerStep.run runs inside gather)."""
    from compress import calib

    open_peaks: list[int] = []   # per open stage: the highest peak seen inside it so far

    def wrap(owner, name):
        original = getattr(owner, name)

        @functools.wraps(original)
        def run(*args, **kwargs):
            if open_peaks:
                open_peaks[-1] = max(open_peaks[-1], torch.cuda.max_memory_allocated())
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            open_peaks.append(0)
            try:
                return original(*args, **kwargs)
            finally:
                peak = max(open_peaks.pop(), torch.cuda.max_memory_allocated())
                if open_peaks:
                    open_peaks[-1] = max(open_peaks[-1], peak)
                log.append({"stage": f"{owner.__name__}.{name}",
                            "layer": getattr(args[0], "index", None),
                            "before_gib": before / GIB, "peak_gib": peak / GIB,
                            "after_gib": torch.cuda.memory_allocated() / GIB})
        setattr(owner, name, run)

    for owner, name in ((calib.Calibrator, "_capture"), (calib.LayerStep, "gather"),
                        (calib.LayerStep, "run"), (calib.LayerStep, "input_groups")):
        wrap(owner, name)


def live_at_peak(trace: list[dict]) -> tuple[float, list[tuple[int, str]]]:
    """Replay alloc/free events; returns the peak live bytes and the live blocks then, summed
    per allocating source line (the first frame in compress/ or transformers/)."""
    def site(frames: list[dict]) -> str:
        for f in frames:
            name = f.get("filename", "")
            for package in ("/compress/", "/transformers/"):
                if package in name:
                    short = package.strip("/") + "/" + name.split(package)[-1]
                    return f"{short}:{f.get('line')} {f.get('name')}"
        return f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "?"

    live, total, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])
    blocks: dict[int, dict] = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            blocks[e["addr"]] = e
        elif e["action"] in ("free_requested", "free_completed"):
            blocks.pop(e["addr"], None)
    per_site: dict[str, int] = defaultdict(int)
    for e in blocks.values():
        per_site[site(e.get("frames", []))] += e["size"]
    return peak / GIB, sorted(((b, s) for s, b in per_site.items()), reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--recipe", default="gptq", help="a recipe of gptq_gpu_speed.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="calibration windows a forward (default: compress's own choice)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA: this traces the GPU memory of a calibrated pass")
    import yaml
    from gptq_gpu_speed import RECIPES, calibration_text

    from compress.cli import main as cli

    args.out.mkdir(parents=True, exist_ok=True)
    text = calibration_text(args.out / "calibration.txt", args)
    recipe = args.out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "calibration": {"source": str(text), "samples": args.samples, "seq_len": args.seq,
                        "seed": 0, "batch_size": args.batch_size},
        "passes": RECIPES[args.recipe]}, sort_keys=False))
    stages: list[dict] = []
    watch_stages(stages)
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    sys.argv = ["compress", "apply", str(recipe), str(args.model), "-o", str(args.out / "artifact"),
                "--allow-path", str(args.out), "--overwrite", "--restart", "--device", "cuda",
                "--dtype", "bfloat16"]
    try:
        cli()
    except SystemExit as exc:
        if exc.code:
            raise
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][0]
    peak, sites = live_at_peak(trace)
    (args.out / "stages.json").write_text(json.dumps(stages, indent=1))
    print(f"\n{len(trace)} allocator events; peak of live blocks {peak:.2f} GiB")
    print("stage (layer): GiB allocated before / peak during / after")
    for s in stages:
        if s["stage"] != "LayerStep.run" or s["layer"] in (0, None):
            print(f"  {s['stage']:26} {s['layer']!s:>4}: {s['before_gib']:6.2f} / "
                  f"{s['peak_gib']:6.2f} / {s['after_gib']:6.2f}")
    print("alive at the peak, by allocating line (GiB):")
    for size, where in sites[:16]:
        print(f"  {size / GIB:7.3f}  {where}")


if __name__ == "__main__":
    main()
