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
 5. with --save-models, each side also writes every quantized model of a row as a plain float
    HF checkpoint (its weights the dequantized values it computes with) under --work/models/;
    with --lm-eval, the local lm-eval tasks (stdlib_docs: rolling loglikelihood, word
    perplexity; stdlib_lastword: LAMBADA-style last word, accuracy) run in THIS venv on the float
    model and on both sides' saved checkpoints, through the same call (compress.evaluation's
    HFLM wrapper, full task sets unless --lm-eval-limit), and a second table prints accuracy /
    word perplexity side by side with the loss ratio and compress's recovery gate. The saved
    checkpoint's perplexity on the evaluation windows must equal the row's: else no table.
Each row is cached as JSON under --work (delete the file, or pass --fresh, to measure again).

Speed (--speed N, with one --settings entry): GPTQ of both tools, each run a child process,
interleaved (ours, llm-compressor, ours, llm-compressor, ...: N runs each), so that on a shared
machine both sides see the same load. Each run is timed from the model load to the written
artifact (ours: `compress apply` of a recipe with the setting and --ours, calibration
`source: stdlib` with the windows' size and seed 0, checked to give the very windows of
calib.pt; llm-compressor: from_pretrained + `oneshot` with GPTQModifier + save_pretrained
(save_compressed)); imports are outside the clock on both sides, the child's whole life is
recorded too. The 1-minute load average is sampled every 5 s during each run. Rows are appended
to WORK/speed-SETTING.jsonl and the table of every row there is printed.
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


def llmc_plain_state(model, names: set[str]) -> dict:
    """The state of `names` (a plain model's keys) from llm-compressor's calibrated model, each
    quantized weight replaced by the fake-quantized values its forward computes with."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in names:
                state[name] = tensor.detach().float().cpu()
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None and name + ".weight" in names:
                state[name + ".weight"] = forward_quantize(
                    module, module.weight, "weight", scheme.weights).float().cpu()
    return state


def save_plain(work: Path, state: dict, out: Path) -> float:
    """Write `state` as a plain float32 HF checkpoint with the tokenizer of work/hf; returns its
    perplexity on the evaluation windows after reloading it (must equal the row's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    missing, unexpected = set(plain.state_dict()) - set(state), set(state) - set(plain.state_dict())
    if missing - {"lm_head.weight"} or unexpected:   # lm_head is tied to the embedding
        raise RuntimeError(f"the calibrated model's names differ from the plain model's: "
                           f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    plain.load_state_dict(state, strict=False)
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(work / "hf").save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return perplexity(reloaded, torch.load(work / "eval.pt"))


def model_dir(work: Path, side: str, setting: str, method: str) -> Path:
    return work / "models" / f"{side}-{setting}-{method}"


def run_llmc(work: Path, setting: str, method: str, save: bool = False) -> dict:
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
    if save:
        from transformers import AutoModelForCausalLM

        names = set(AutoModelForCausalLM.from_pretrained(work / "hf").state_dict())
        result["saved_perplexity"] = save_plain(work, llmc_plain_state(model, names),
                                                model_dir(work, "llmc", setting, method))
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


def our_plain_state(model) -> dict:
    """Our compressed model's state as a plain model's: each QuantizedLinear's weight is its
    dequantized weight (what its reference forward multiplies by), other tensors as they are."""
    import torch

    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "dequantized_weight"):
                state[name + ".weight"] = module.dequantized_weight().float().cpu()
            for key, tensor in list(module.named_parameters(recurse=False)):
                state[f"{name}.{key}" if name else key] = tensor.detach().float().cpu()
    return state


def run_ours(work: Path, setting: str, method: str, options: dict, save: bool = False) -> dict:
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
    result = {"perplexity": perplexity(loaded.model.to(device), windows), "seconds": seconds,
              "passes": [cfg.model_dump(exclude_unset=True) for cfg in passes]}
    if save:
        result["saved_perplexity"] = save_plain(work, our_plain_state(loaded.model),
                                                model_dir(work, "ours", setting, method))
    return result


def cached(path: Path, fresh: bool, compute) -> dict:
    """The row of `path`, measured when absent or `fresh`; a row measured again keeps the
    earlier perplexity and date as "previous" (the methods are deterministic: they must agree)."""
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    result = compute()
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if path.exists():
        old = json.loads(path.read_text())
        result["previous"] = {k: old[k] for k in ("perplexity", "date") if k in old}
    path.write_text(json.dumps(result))
    return result


def llmc_subprocess(work: Path, setting: str, method: str, save: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # none of our packages
    run = subprocess.run([LLMC_PYTHON, __file__, "--work", str(work), "--llmc",
                          f"{setting}:{method}"] + (["--save-models"] if save else []),
                         capture_output=True, text=True, env=env, check=False)
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


# ---------------------------------------------------------------------------------------------
# Speed: one tool's GPTQ in a child process, from model load to the written artifact

def speed_recipe(setting: str, options: dict, calib_shape) -> dict:
    """Our recipe of the speed runs: the setting's quantize pass with GPTQ and `options`,
    calibrated on the stdlib windows of calib.pt's size (seed 0: the same windows)."""
    samples, seq_len = calib_shape
    return {"calibration": {"source": "stdlib", "samples": samples, "seq_len": seq_len,
                            "seed": 0},
            "passes": [{"pass": "quantize", **SETTINGS[setting], "method": "gptq",
                        "ignore": ["lm_head"], **options}]}


def speed_ours(work: Path, setting: str, options: dict) -> dict:
    """`compress apply` of speed_recipe in this process; imports before the clock."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the clock)
    import yaml

    import compress.api
    import compress.pipeline  # noqa: F401
    from compress.cli import main

    out = work / "speed" / f"ours-{setting}"
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(speed_recipe(setting, options,
                                                  torch.load(work / "calib.pt").shape),
                                     sort_keys=False))
    sys.argv = ["compress", "apply", str(recipe), str(work / "hf"), "-o", str(out / "artifact"),
                "--overwrite", "--restart"]
    start = time.perf_counter()
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
    seconds = time.perf_counter() - start
    report = json.loads((out / "artifact" / "report.json").read_text())["passes"][0]
    return {"seconds": seconds, "pass_seconds": report["seconds"],
            "stages": report["summary"]["seconds"], "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def speed_llmc(work: Path, setting: str) -> dict:
    """llm-compressor (LLMC_PYTHON): load, `oneshot` with its GPTQModifier (llmc_modifiers),
    save_pretrained(save_compressed=True); imports before the clock."""
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = torch.load(work / "calib.pt")
    out = work / "speed" / f"llmc-{setting}"
    recipe = llmc_modifiers(setting, "gptq")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    loaded = time.perf_counter()
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=data,
            num_calibration_samples=len(calib), max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False)
    done = time.perf_counter()
    model.save_pretrained(out / "artifact", save_compressed=True)
    tokenizer.save_pretrained(out / "artifact")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "load_seconds": loaded - start, "oneshot_seconds": done - loaded,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "version": llmcompressor.__version__}


def speed_child(work: Path, side: str, setting: str, options: dict) -> dict:
    """One speed run in a child process, with the 1-minute load average sampled every 5 s."""
    import threading

    if side == "ours":
        cmd = [sys.executable, __file__, "--work", str(work), "--speed-job",
               f"ours:{setting}", "--ours", json.dumps(options)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
    else:
        cmd = [LLMC_PYTHON, __file__, "--work", str(work), "--speed-job", f"llmc:{setting}"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loads, done = [os.getloadavg()[0]], threading.Event()

    def sample() -> None:
        while not done.wait(5):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began, start = time.strftime("%H:%M:%S", time.gmtime()), time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    life = time.perf_counter() - start
    done.set()
    sampler.join()
    loads.append(os.getloadavg()[0])
    log = work / "speed" / f"{side}-{setting}.log"
    log.write_text(run.stdout + run.stderr)
    if run.returncode:
        raise RuntimeError(f"speed run {side} {setting} failed (see {log})")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return {"side": side, "setting": setting, "start_utc": began, "process_seconds": life,
            "load_start": loads[0], "load_mean": sum(loads) / len(loads),
            "load_max": max(loads), "load_end": loads[-1], **result}


def speed_table(rows: list[dict]) -> list[str]:
    lines = [("| run | side | start (UTC) | wall s (load -> artifact) | process s | ours: pass s "
              "(statistics / solve) | llmc: load s / oneshot s | load avg start / mean / max "
              "/ end | threads |"), "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        ours = (f"{r['pass_seconds']:.0f} ({r['stages']['statistics']:.0f} / "
                f"{r['stages']['solve']:.0f})" if r["side"] == "ours" else "")
        peer = (f"{r['load_seconds']:.1f} / {r['oneshot_seconds']:.0f}"
                if r["side"] == "llmc" else "")
        lines.append(f"| {i} | {r['side']} | {r['date']} {r['start_utc']} | {r['seconds']:.0f} | "
                     f"{r['process_seconds']:.0f} | {ours} | {peer} | {r['load_start']:.1f} / "
                     f"{r['load_mean']:.1f} / {r['load_max']:.1f} / {r['load_end']:.1f} | "
                     f"{r['threads']} |")
    return lines


def run_speed(work: Path, setting: str, options: dict, runs: int) -> None:
    """`runs` interleaved pairs (ours first); rows appended to WORK/speed-SETTING.jsonl."""
    import torch
    from transformers import AutoTokenizer

    from compress.calib import CalibrationConfig, calibration_windows

    calib = torch.load(work / "calib.pt")
    cfg = CalibrationConfig(**speed_recipe(setting, options, calib.shape)["calibration"])
    if not torch.equal(calibration_windows(AutoTokenizer.from_pretrained(work / "hf"), cfg),
                       calib):
        raise SystemExit(f"the stdlib windows of {cfg} differ from {work / 'calib.pt'}: the "
                         "two sides would not calibrate on the same tokens")
    (work / "speed").mkdir(exist_ok=True)
    path = work / f"speed-{setting}.jsonl"
    for _ in range(runs):
        for side in ("ours", "llmc"):
            row = speed_child(work, side, setting, options)
            row["date"] = time.strftime("%Y-%m-%d", time.gmtime())
            row["options"] = options if side == "ours" else {}
            with path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("\n".join(speed_table(rows)))


# ---------------------------------------------------------------------------------------------
# lm-eval on the saved checkpoints (this venv, one harness for both sides)

TASKS = ("stdlib_docs", "stdlib_lastword")
# the metric of each task in the table (lm-eval's names) and whether higher is better
TASK_METRICS = {"stdlib_docs": ("word_perplexity", False), "stdlib_lastword": ("acc", True)}


def run_lm_eval(path: Path, limit: int | None) -> dict:
    """The local tasks on the plain checkpoint at `path`, through compress.evaluation's lm-eval
    call (lm-eval's HFLM, max length 2048). Batch 1: lm-eval batches the rolling windows of
    stdlib_docs in document order, padded to the longest of each batch, and at batch 8 that
    padding made one model's run take several times longer on the CPU."""
    import lm_eval
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.evaluation.lm_eval_adapter import run_tasks

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    start = time.perf_counter()
    scores = run_tasks(model, AutoTokenizer.from_pretrained(path), list(TASKS), limit=limit,
                       batch_size=1)
    return {"tasks": scores, "limit": limit, "lm_eval": lm_eval.__version__,
            "seconds": time.perf_counter() - start}


def lm_eval_row(work: Path, side: str, setting: str, method: str, limit: int | None,
                fresh: bool) -> dict | None:
    """Cached lm-eval scores of one saved model (None when it was not saved)."""
    path = work / "hf" if side == "float" else model_dir(work, side, setting, method)
    if not (path / "config.json").exists():
        return None
    name = "float" if side == "float" else f"{side}-{setting}-{method}"
    suffix = "" if limit is None else f"-limit{limit}"
    return cached(work / f"lmeval-{name}{suffix}.json", fresh,
                  lambda: run_lm_eval(path, limit))


def lm_eval_problems(rows: list[dict]) -> list[str]:
    """A saved checkpoint that does not reproduce its row's perplexity is not the model that
    row measured: its lm-eval scores cannot stand beside it."""
    return [f"{r['setting']} {r['method']} {side}: saved checkpoint perplexity "
            f"{r[side]['saved_perplexity']:.6f} != row {r[side]['perplexity']:.6f}"
            for r in rows for side in ("llmc", "ours") if "saved_perplexity" in r[side]
            and abs(r[side]["saved_perplexity"] - r[side]["perplexity"])
            > 1e-4 * r[side]["perplexity"]]


def lm_eval_table(floats: dict, rows: list[dict], gate: float) -> list[str]:
    """Markdown lines: per row with both sides' scores, each task's metric for float,
    llm-compressor and ours, (ours - float) / (llmc - float), and compress's recovery
    (compressed / float, inverted for perplexities) of each side against the gate."""
    lines = [("| setting | method | task | metric | float | llm-compressor | ours | "
              "(ours - float) / (llmc - float) | recovery llmc | recovery ours | "
              f"gate {gate} |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not (r.get("lm_llmc") and r.get("lm_ours")):
            continue
        for task, (metric, higher) in TASK_METRICS.items():
            f = floats["tasks"][task][metric]
            a, b = r["lm_llmc"]["tasks"][task][metric], r["lm_ours"]["tasks"][task][metric]
            rec = [(x / f) if higher else (f / x) for x in (a, b)]
            ratio = f"{(b - f) / (a - f):.2f}" if a != f else "-"
            verdict = "/".join("pass" if x >= gate else "FAIL" for x in rec)
            lines.append(f"| {r['setting']} | {r['method']} | {task} | {metric} | {f:.4f} | "
                         f"{a:.4f} | {b:.4f} | {ratio} | {rec[0]:.3f} | {rec[1]:.3f} | "
                         f"{verdict} |")
    return lines


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
    parser.add_argument("--save-models", nargs="*", metavar="METHOD", default=None,
                        help="save the quantized models of these methods (none named: every "
                             "method) as plain float HF checkpoints under WORK/models; a cached "
                             "row without its model is measured again")
    parser.add_argument("--lm-eval", action="store_true",
                        help="run the local lm-eval tasks on the float model and every saved "
                             "model; print their table")
    parser.add_argument("--lm-eval-limit", type=int, default=None,
                        help="documents per task (default: the full sets)")
    parser.add_argument("--min-recovery", type=float, default=0.9,
                        help="compress's recovery gate shown in the lm-eval table")
    parser.add_argument("--speed", type=int, metavar="N",
                        help="time GPTQ of both tools, N interleaved runs each, at the one "
                             "setting of --settings (see the module docstring)")
    parser.add_argument("--llmc", help=argparse.SUPPRESS)      # internal: one llm-compressor run
    parser.add_argument("--speed-job", help=argparse.SUPPRESS)  # internal: one speed run
    args = parser.parse_args()
    if args.speed_job:
        side, setting = args.speed_job.split(":")
        result = (speed_ours(args.work, setting, json.loads(args.ours)) if side == "ours"
                  else speed_llmc(args.work, setting))
        print(json.dumps(result))
        return
    if args.llmc:
        setting, method = args.llmc.split(":")
        print(json.dumps(run_llmc(args.work, setting, method, args.save_models is not None)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "calib.pt").exists() or args.fresh:
        prepare(args.work, args.samples, args.seq_len, args.eval_tokens)
    options = json.loads(args.ours)
    w = args.work
    if args.speed:
        if len(args.settings) != 1:
            raise SystemExit("--speed: give one setting (--settings SETTING)")
        run_speed(w, args.settings[0], options, args.speed)
        return

    def save(m: str) -> bool:
        return args.save_models is not None and (not args.save_models or m in args.save_models)

    def again(side: str, s: str, m: str) -> bool:
        """Measure a cached row again when its model is asked for and was not saved."""
        return args.fresh or (save(m) and not (model_dir(w, side, s, m) / "config.json").exists())

    def ours(s: str, m: str) -> dict:
        return cached(ours_file(w, s, m, args.tag), again("ours", s, m),
                      lambda: run_ours(w, s, m, options, save(m)))

    def theirs(s: str, m: str) -> dict:
        return cached(w / f"llmc-{s}-{m}.json", again("llmc", s, m),
                      lambda: llmc_subprocess(w, s, m, save(m)))

    def scores(side: str, s: str = "", m: str = "") -> dict | None:
        if not args.lm_eval:
            return None
        return lm_eval_row(w, side, s, m, args.lm_eval_limit, args.fresh)

    if args.only_peer or args.only_ours:
        side, measure = ("llmc", theirs) if args.only_peer else ("ours", ours)
        print("float", cached(w / f"{side}-float.json", args.fresh, lambda: (
            llmc_subprocess(w, "nvfp4", "float") if args.only_peer
            else run_ours(w, "nvfp4", "float", {}))), scores("float"), flush=True)
        for s in args.settings:
            for m in methods_of(s, args.awq):
                print(s, m, measure(s, m), scores(side, s, m), flush=True)
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
                peer[m] = theirs(s, m)
        except RuntimeError as exc:      # no row for this setting; the others still count
            print(f"{s}: {exc}", flush=True)
            continue
        problems += peer_problems(s, peer)
        for m, row in peer.items():
            rows.append({"setting": s, "method": m, "llmc": row, "ours": ours(s, m),
                         "lm_llmc": scores("llmc", s, m), "lm_ours": scores("ours", s, m)})
            print(json.dumps(rows[-1]), flush=True)
    problems += lm_eval_problems(rows)
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
        peer_ppl, ours_ppl = r["llmc"]["perplexity"], r["ours"]["perplexity"]
        print(f"| {r['setting']} | {r['method']} | {peer_ppl:.3f} | {ours_ppl:.3f} | "
              f"{(ours_ppl - f) / (peer_ppl - f):.2f} | {r['llmc']['seconds']:.0f} | "
              f"{r['ours']['seconds']:.0f} |")
    float_scores = scores("float")
    if float_scores:
        limit = args.lm_eval_limit or "all"
        print(f"\nlm-eval {float_scores['lm_eval']} (local tasks, {limit} documents per task, "
              "one harness: plain float checkpoints of both sides, this venv)")
        print("\n".join(lm_eval_table(float_scores, rows, args.min_recovery)))


if __name__ == "__main__":
    main()
