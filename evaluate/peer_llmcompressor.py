"""Peer comparison: compress vs llm-compressor on the same model, the same calibration token
windows and the same held-out evaluation windows, with the same perplexity formula.

Run by hand (not in CI), from the repository root, in compress's venv:

    PYTHONPATH=. OMP_NUM_THREADS=2 python evaluate/peer_llmcompressor.py \\
        --settings nvfp4 int4-sym-g64 --work /tmp/peer

llm-compressor runs in its own virtual environment (it pins compressed-tensors 0.19 and its own
transformers), LLMC_PYTHON (default /work/llmc-venv/bin/python), created with

    python -m venv /work/llmc-venv
    /work/llmc-venv/bin/python -m pip install torch==2.13.0     # first: the local CPU build
    /work/llmc-venv/bin/python -m pip install llmcompressor==0.14.0.1 gguf

On 2 cores, run the two sides side by side with OMP_NUM_THREADS=1, one with --only-peer and
one with --only-ours, then the plain command to check and print the cached rows.

What it does:
 1. saves SmolLM2 (dequantized from its GGUF, float32) as an HF directory, ONE set of calibration
    windows [N, L] (stdlib calibration modules, seed 0) and the evaluation windows (the first
    --eval-tokens of the stdlib evaluation modules, windows of 512): both sides read these files;
 2. our side, in this process: our passes on those windows (per setting the methods of
    METHODS: RTN and GPTQ with the options of --ours; with --awq also AWQ + GPTQ; 2:4 by Wanda
    and SparseGPT; 2:4 SparseGPT then INT4), perplexity on the evaluation windows;
 3. llm-compressor's side, in a subprocess under LLMC_PYTHON: its float perplexity and the same
    methods with its modifiers (QuantizationModifier for RTN, data-free; GPTQModifier with its
    defaults: block 128, dampening 0.01, actorder "static"; AWQModifier + GPTQModifier;
    SparseGPTModifier / WandaPruningModifier at 2:4; lm_head ignored; `oneshot` on the same
    windows);
 4. sanity checks before any table: the two float perplexities agree (same model, same text,
    same formula); at every setting llm-compressor's calibrated methods beat its own reference
    method (GPTQ and AWQ + GPTQ its RTN, SparseGPT its Wanda, GPTQ after SparseGPT its RTN
    after SparseGPT) and its 2:4 weights are 2:4. When a check fails the script prints why and
    exits 1 without a table.
Each row is cached as JSON under --work (delete the file, or pass --fresh, to measure again).
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
LLMC_PYTHON = os.environ.get("LLMC_PYTHON", "/work/llmc-venv/bin/python")

# setting -> our quantize-pass format fields; llm-compressor's scheme is built in llmc_scheme()
# SmolLM2-135M's hidden size 576 is not a multiple of 128: groups of 128 are impossible on
# q/k/v/gate/up for both tools (llm-compressor refuses them at initialize). 192 = gcd(576, 1536)
# is the nearest group size above 128 that divides every layer.
SETTINGS = {
    "int4-sym-g64": {"format": "int4", "group_size": 64, "symmetric": True},
    "int4-sym-g192": {"format": "int4", "group_size": 192, "symmetric": True},
    "int4-asym-g192": {"format": "int4", "group_size": 192, "symmetric": False},
    "nvfp4": {"format": "nvfp4"},
    "mxfp4": {"format": "mxfp4"},
    # 2:4 sparsity of every decoder linear, alone and followed by INT4 sym g64
    "sparse24": {},
    "sparse24-int4-sym-g64": {"format": "int4", "group_size": 64, "symmetric": True},
}
# The methods each setting is run with, both sides: a method is "+"-joined steps run in order
# (awq: activation-aware scales folded before quantizing; sparsegpt / wanda: 2:4 pruning;
# rtn / gptq: the quantizer). The first method of a row is the peer's reference for its sanity
# check: every other method of the row must beat it on the peer's side.
METHODS = {"sparse24": ("wanda", "sparsegpt"),
           "sparse24-int4-sym-g64": ("sparsegpt+rtn", "sparsegpt+gptq")}
DEFAULT_METHODS = ("rtn", "gptq")
OPTIONAL_METHODS = ("awq+gptq",)   # added to the quantization settings by --awq
FLOAT_TOLERANCE = 1e-3     # relative: the two venvs must agree on the float model


def perplexity(model, windows, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over [N, L] windows: the formula of compress.evaluation."""
    import torch
    import torch.nn.functional as F

    nll, tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for ids in windows.split(batch_size):
            ids = ids.to(device)
            logits = model(ids, use_cache=False).logits.float()
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   ids[:, 1:].reshape(-1), reduction="sum").item()
            tokens += ids[:, 1:].numel()
    return math.exp(nll / tokens)


# ---------------------------------------------------------------------------------------------
# llm-compressor side (runs under LLMC_PYTHON; imports nothing from compress)

def llmc_scheme(setting: str) -> dict:
    """Keyword arguments selecting the setting's scheme in llm-compressor's modifiers."""
    presets = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}
    if setting in presets:
        return {"targets": ["Linear"], "scheme": presets[setting]}
    fields = SETTINGS[setting]
    weights = {"num_bits": 4, "type": "int", "strategy": "group",
               "group_size": fields["group_size"], "symmetric": fields["symmetric"]}
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


def llmc_modifiers(setting: str, method: str) -> list:
    """The modifiers of one method, in order. GPTQ keeps its defaults (block_size 128,
    dampening_frac 0.01, actorder "static"); AWQModifier (the transform) takes its scheme from
    the quantization modifier after it; the 2:4 modifiers use block 128, damping 0.01."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    sparse = {"sparsity": 0.5, "mask_structure": "2:4", "targets": ["Linear"],
              "ignore": ["lm_head"]}
    steps = {"awq": lambda: AWQModifier(),
             "sparsegpt": lambda: SparseGPTModifier(block_size=128, dampening_frac=0.01,
                                                    **sparse),
             "wanda": lambda: WandaPruningModifier(**sparse),
             "rtn": lambda: QuantizationModifier(ignore=["lm_head"], **llmc_scheme(setting)),
             "gptq": lambda: GPTQModifier(ignore=["lm_head"], **llmc_scheme(setting))}
    return [steps[step]() for step in method.split("+")]


def is_24(model) -> bool:
    """Every decoder linear keeps at most 2 non-zeros in each 4 consecutive inputs."""
    import torch

    return all((m.weight.reshape(-1, 4) != 0).sum(-1).max().item() <= 2
               for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head")


def run_llmc(work: Path, setting: str, method: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    windows = torch.load(work / "eval.pt")
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    model.eval()
    if torch.cuda.is_available():   # llm-compressor calibrates on the GPU when there is one
        model.to("cuda")
    if method == "float":
        return {"perplexity": perplexity(model, windows), "seconds": 0.0}
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        # llm-compressor 0.14.0.1's AWQModifier pins its cached activations for faster host to
        # GPU copies, which raises "Cannot access accelerator device" on a machine without
        # one; pinning changes no value, so on the CPU it is skipped
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    calib = torch.load(work / "calib.pt")
    kwargs = {}
    if method != "rtn":   # RTN alone is data-free
        kwargs = {"dataset": Dataset.from_dict({"input_ids": calib.tolist(),
                                                "attention_mask": torch.ones_like(calib).tolist()}),
                  "num_calibration_samples": len(calib), "max_seq_length": calib.shape[1],
                  "shuffle_calibration_samples": False}
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, recipe=llmc_modifiers(setting, method), **kwargs)
    seconds = time.perf_counter() - start
    import llmcompressor

    result = {"perplexity": perplexity(model, windows), "seconds": seconds,
              "version": llmcompressor.__version__}
    if setting.startswith("sparse24"):
        result["is_24"] = is_24(model)
    return result


# ---------------------------------------------------------------------------------------------
# compress side

def prepare(work: Path, samples: int, seq_len: int, eval_tokens: int) -> None:
    """SmolLM2 as an HF directory, the calibration windows and the evaluation windows."""
    import torch

    from compress.calib import CalibrationConfig, calibration_windows, evaluation_windows
    from compress.models import load_model

    loaded = load_model("smollm2-135m")
    if not (work / "hf" / "config.json").exists():
        # transformers refuses to save a model it loaded from a GGUF: copy it into a fresh one
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_config(loaded.model.config, dtype=torch.float32)
        plain.load_state_dict(loaded.model.state_dict())
        plain.save_pretrained(work / "hf")
        loaded.tokenizer.save_pretrained(work / "hf")
    cfg = CalibrationConfig(samples=samples, seq_len=seq_len, seed=0)
    torch.save(calibration_windows(loaded.tokenizer, cfg), work / "calib.pt")
    torch.save(evaluation_windows(loaded.tokenizer, "stdlib", 512, eval_tokens), work / "eval.pt")


def our_passes(setting: str, method: str, options: dict) -> list:
    """Our pass configs of one method, in order (the same steps as llmc_modifiers)."""
    from compress.passes.quantize import QuantizeConfig
    from compress.passes.sparsify import SparsifyConfig

    steps, quantize = method.split("+"), {**SETTINGS[setting], "ignore": ["lm_head"]}
    passes = [SparsifyConfig(method=step, pattern="2:4", ignore=["lm_head"])
              for step in steps if step in ("sparsegpt", "wanda")]
    if "gptq" in steps:
        quantize.update({"method": "gptq", **options})
    if "awq" in steps:
        quantize["awq"] = True
    if "rtn" in steps or "gptq" in steps:
        passes.append(QuantizeConfig(**quantize))
    return passes


def run_ours(work: Path, setting: str, method: str, options: dict) -> dict:
    """Our passes on the saved windows, in this process; perplexity of the result."""
    import torch

    from compress.calib import CalibrationConfig
    from compress.models import load_model
    from compress.passes.base import PASSES, Context

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    windows, calib = torch.load(work / "eval.pt"), torch.load(work / "calib.pt")
    loaded = load_model(str(work / "hf"))
    # the passes move one layer at a time to the device; the whole model goes there to evaluate
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if method == "float":
        return {"perplexity": perplexity(loaded.model.to(device), windows), "seconds": 0.0}
    passes = our_passes(setting, method, options)
    start = time.perf_counter()
    for cfg in passes:
        ctx = Context(loaded.model, loaded.tokenizer, loaded.arch,
                      CalibrationConfig(samples=len(calib), seq_len=calib.shape[1], batch_size=8),
                      device, _calib_ids=calib)
        PASSES[type(cfg)](ctx, cfg)
    seconds = time.perf_counter() - start
    return {"perplexity": perplexity(loaded.model.to(device), windows), "seconds": seconds,
            "passes": [cfg.model_dump(exclude_unset=True) for cfg in passes]}


def cached(path: Path, fresh: bool, compute) -> dict:
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    result = compute()
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path.write_text(json.dumps(result))
    return result


def llmc_subprocess(work: Path, setting: str, method: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # none of our packages
    run = subprocess.run([LLMC_PYTHON, __file__, "--work", str(work), "--llmc",
                          f"{setting}:{method}"], capture_output=True, text=True, env=env,
                         check=False)
    if run.returncode:
        (work / f"llmc-{setting}-{method}.log").write_text(run.stdout + run.stderr)
        raise RuntimeError(f"llm-compressor {setting} {method} failed: "
                           + (run.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(run.stdout.strip().splitlines()[-1])


def methods_of(setting: str, awq: bool) -> tuple[str, ...]:
    if setting in METHODS:
        return METHODS[setting]
    return DEFAULT_METHODS + (OPTIONAL_METHODS if awq else ())


def ours_file(work: Path, setting: str, method: str, tag: str) -> Path:
    """Cache file of our row: the GPTQ steps are named by --tag (options differ per tag)."""
    return work / f"ours-{setting}-{method.replace('gptq', tag)}.json"


def peer_problems(setting: str, row: dict) -> list[str]:
    """Why the peer's results of one setting cannot be trusted (empty when they can)."""
    ref, *others = list(row)
    problems = [f"{setting} {m}: llm-compressor's {m} ({row[m]['perplexity']:.3f}) is not "
                f"better than its {ref} ({row[ref]['perplexity']:.3f})"
                for m in others if row[m]["perplexity"] >= row[ref]["perplexity"]]
    problems += [f"{setting} {m}: llm-compressor's weights are not 2:4 sparse"
                 for m, r in row.items() if r.get("is_24") is False]
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/peer"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--ours", default='{"act_order": true, "scale_search": "mse"}',
                        help="JSON: our GPTQ options (QuantizeConfig fields)")
    parser.add_argument("--tag", default="gptq", help="name of our GPTQ rows (cache key)")
    parser.add_argument("--awq", action="store_true",
                        help="also AWQ + GPTQ (AWQModifier + GPTQModifier) at quantization "
                             "settings")
    parser.add_argument("--fresh", action="store_true", help="measure cached rows again")
    parser.add_argument("--only-ours", action="store_true",
                        help="measure (and cache) our rows only, e.g. beside a running peer")
    parser.add_argument("--only-peer", action="store_true",
                        help="measure (and cache) llm-compressor's rows only, e.g. beside a "
                             "run of --only-ours: on 2 cores, one thread each side")
    parser.add_argument("--llmc", help=argparse.SUPPRESS)      # internal: one llm-compressor run
    args = parser.parse_args()
    if args.llmc:
        setting, method = args.llmc.split(":")
        print(json.dumps(run_llmc(args.work, setting, method)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "calib.pt").exists() or args.fresh:
        prepare(args.work, args.samples, args.seq_len, args.eval_tokens)
    options = json.loads(args.ours)
    w = args.work

    def ours(s: str, m: str) -> dict:
        return cached(ours_file(w, s, m, args.tag), args.fresh,
                      lambda: run_ours(w, s, m, options))

    if args.only_peer:
        print("float", cached(w / "llmc-float.json", args.fresh,
                              lambda: llmc_subprocess(w, "nvfp4", "float")), flush=True)
        for s in args.settings:
            for m in methods_of(s, args.awq):
                print(s, m, cached(w / f"llmc-{s}-{m}.json", args.fresh,
                                   lambda: llmc_subprocess(w, s, m)), flush=True)
        return
    if args.only_ours:
        print("float", cached(w / "ours-float.json", args.fresh,
                              lambda: run_ours(w, "nvfp4", "float", {})), flush=True)
        for s in args.settings:
            for m in methods_of(s, args.awq):
                print(s, m, ours(s, m), flush=True)
        return
    floats = {"compress": cached(w / "ours-float.json", args.fresh,
                                 lambda: run_ours(w, "nvfp4", "float", {})),
              "llmc": cached(w / "llmc-float.json", args.fresh,
                             lambda: llmc_subprocess(w, "nvfp4", "float"))}
    print(json.dumps({"float": floats}), flush=True)
    rows, problems = [], []
    a, b = floats["compress"]["perplexity"], floats["llmc"]["perplexity"]
    if abs(a - b) > FLOAT_TOLERANCE * a:
        problems.append(f"float perplexities differ: compress {a:.4f}, llm-compressor {b:.4f}")
    for s in args.settings:
        peer = {}
        try:
            for m in methods_of(s, args.awq):
                peer[m] = cached(w / f"llmc-{s}-{m}.json", args.fresh,
                                 lambda: llmc_subprocess(w, s, m))
        except RuntimeError as exc:      # no row for this setting; the others still count
            print(f"{s}: {exc}", flush=True)
            continue
        problems += peer_problems(s, peer)
        for m, theirs in peer.items():
            rows.append({"setting": s, "method": m, "llmc": theirs, "ours": ours(s, m)})
            print(json.dumps(rows[-1]), flush=True)
    if problems:
        print("\nREFUSING to print a comparison: the peer run failed its sanity checks:")
        for p in problems:
            print("  - " + p)
        sys.exit(1)
    f = floats["compress"]["perplexity"]
    print(f"\nfloat perplexity {f:.3f} (llm-compressor venv: {b:.3f}); calibration "
          f"{args.samples} x {args.seq_len} tokens; our GPTQ = {args.tag} {options}")
    print("| setting | method | llm-compressor | ours | loss ours / loss llmc | s llmc | s ours |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        theirs, ours_ppl = r["llmc"]["perplexity"], r["ours"]["perplexity"]
        print(f"| {r['setting']} | {r['method']} | {theirs:.3f} | {ours_ppl:.3f} | "
              f"{(ours_ppl - f) / (theirs - f):.2f} | {r['llmc']['seconds']:.0f} | "
              f"{r['ours']['seconds']:.0f} |")


if __name__ == "__main__":
    main()
