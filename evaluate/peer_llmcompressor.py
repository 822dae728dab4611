"""Peer comparison: compress GPTQ vs llm-compressor GPTQ on the same model, calibration windows
and evaluation text. Run by hand (not in CI), from the repository root, in compress's venv:

    python evaluate/peer_llmcompressor.py [--settings int4-sym-g64 int4-asym-g64 nvfp4]

llm-compressor pins its own transformers, so it runs in its own virtual environment
(/work/venv-llmc; create it with `python -m venv /work/venv-llmc &&
/work/venv-llmc/bin/pip install torch==2.13.0 && /work/venv-llmc/bin/pip install llmcompressor`).
This script (1) saves SmolLM2 dequantized from its GGUF as an HF directory, the calibration
token windows of our figure recipe and the evaluation windows, (2) runs our apply + perplexity,
(3) runs itself under the llm-compressor venv with --llmc to quantize the same HF directory on
the same token windows and compute perplexity on the same evaluation windows with the same
formula, and (4) prints both side by side with the wall time of each quantization.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLMC_PYTHON = os.environ.get("LLMC_PYTHON", "/work/venv-llmc/bin/python")
# setting -> our figure recipe (its calibration section defines the windows both tools use)
SETTINGS = {"int4-sym-g64": "int4-sym-g64-gptq", "int4-asym-g64": "int4-asym-g64-gptq",
            "nvfp4": "nvfp4-gptq"}


def perplexity(model, windows, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over [N, L] windows: the formula of compress.evaluation."""
    import torch
    import torch.nn.functional as F

    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids in windows.split(batch_size):
            logits = model(ids, use_cache=False).logits.float()
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   ids[:, 1:].reshape(-1), reduction="sum").item()
            tokens += ids[:, 1:].numel()
    return math.exp(nll / tokens)


# ---------------------------------------------------------------------------------------------
# llm-compressor side (runs under LLMC_PYTHON)

def llmc_recipe(setting: str):
    from llmcompressor.modifiers.quantization import GPTQModifier

    # Same GPTQ settings as ours: block 128, damping 1%, no activation ordering.
    common = {"targets": "Linear", "ignore": ["lm_head"], "block_size": 128,
              "dampening_frac": 0.01, "actorder": None}
    if setting == "nvfp4":
        return GPTQModifier(scheme="NVFP4A16", **common)
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64,
               "symmetric": setting == "int4-sym-g64"}
    return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                        **{k: v for k, v in common.items() if k != "targets"})


def run_llmc(work: Path, setting: str) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    calib = torch.load(work / f"calib-{setting}.pt")
    windows = torch.load(work / "eval.pt")
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=llmc_recipe(setting),
            num_calibration_samples=len(calib), max_seq_length=calib.shape[1])
    seconds = time.perf_counter() - start
    return {"perplexity": perplexity(model, windows), "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# compress side

def prepare(work: Path, settings: list[str], max_tokens: int) -> None:
    """SmolLM2 as an HF directory, calibration windows per setting, evaluation windows."""
    import torch

    from compress.calib import calibration_windows, evaluation_windows
    from compress.models import load_model
    from compress.recipe import load_recipe

    loaded = load_model("smollm2-135m")
    if not (work / "hf" / "config.json").exists():
        # transformers refuses to save a model it loaded from a GGUF: copy it into a fresh one
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_config(loaded.model.config, dtype=torch.float32)
        plain.load_state_dict(loaded.model.state_dict())
        plain.save_pretrained(work / "hf")
        loaded.tokenizer.save_pretrained(work / "hf")
    for setting in settings:
        cfg = load_recipe(ROOT / "evaluate" / "gptq" / f"{SETTINGS[setting]}.yaml").calibration
        torch.save(calibration_windows(loaded.tokenizer, cfg), work / f"calib-{setting}.pt")
    torch.save(evaluation_windows(loaded.tokenizer, "stdlib", 512, max_tokens), work / "eval.pt")


def run_ours(work: Path, setting: str) -> dict:
    import torch

    recipe = ROOT / "evaluate" / "gptq" / f"{SETTINGS[setting]}.yaml"
    out = work / f"ours-{setting}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "compress", "apply", str(recipe), "smollm2-135m",
                    "-o", str(out), "--overwrite"], check=True, env=env, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    from compress.runtime.artifact import load_artifact

    model = load_artifact(out)
    return {"perplexity": perplexity(model, torch.load(work / "eval.pt")),
            "seconds": report["passes"][0]["seconds"]}


def reuse_ours(setting: str, results: Path, artifacts: Path) -> dict:
    """Our figures from evaluate/gptq/run.sh (same recipe, windows, text and formula)."""
    name = SETTINGS[setting]
    report = json.loads((artifacts / name / "report.json").read_text())
    return {"perplexity": json.loads((results / f"{name}.json").read_text())["perplexity"],
            "seconds": report["passes"][0]["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/peer-llmc"))
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--reuse", action="store_true",
                        help="take our figures from evaluate/gptq/results and the artifacts of "
                             "evaluate/gptq/run.sh in /tmp/gptq-figures instead of re-running")
    parser.add_argument("--llmc", help=argparse.SUPPRESS)      # internal: one llm-compressor run
    args = parser.parse_args()
    if args.llmc:
        print(json.dumps(run_llmc(args.work, args.llmc)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, args.settings, args.max_tokens)
    rows = []
    for setting in args.settings:
        ours = reuse_ours(setting, ROOT / "evaluate" / "gptq" / "results",
                          Path("/tmp/gptq-figures")) if args.reuse else run_ours(args.work, setting)
        run = subprocess.run([LLMC_PYTHON, __file__, "--work", str(args.work), "--llmc", setting],
                             capture_output=True, text=True, check=False)
        if run.returncode:
            theirs = {"error": (run.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            theirs = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append((setting, ours, theirs))
        print(json.dumps({"setting": setting, "compress": ours, "llmcompressor": theirs}),
              flush=True)
    print(f"\n{'setting':15} {'ppl compress':>13} {'ppl llmc':>10} {'s compress':>11} "
          f"{'s llmc':>8} {'speed-up':>9}")
    for setting, ours, theirs in rows:
        if "error" in theirs:
            print(f"{setting:15} {ours['perplexity']:13.3f}  llm-compressor failed: "
                  f"{theirs['error']}")
            continue
        print(f"{setting:15} {ours['perplexity']:13.3f} {theirs['perplexity']:10.3f} "
              f"{ours['seconds']:11.1f} {theirs['seconds']:8.1f} "
              f"{theirs['seconds'] / ours['seconds']:8.1f}x")


if __name__ == "__main__":
    main()
