"""The `compress` command line: apply, evaluate, compare, inspect, recipes.

Heavy libraries are imported inside commands, after offline mode is set, so `--help` is fast
and hub libraries see HF_HUB_OFFLINE before they import.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from compress.errors import CompressError
from compress.models import set_offline_unless_asked
from compress.progress import console, key_values

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress transformer language models: quantize, sparsify, prune, "
                       "precompute, convert norms; evaluate and serve the result.")

ModelArg = typer.Argument(..., help="HF directory, .gguf file, hub id, or alias (smollm2-135m)")


@app.command()
def apply(recipe: Path = typer.Argument(..., help="recipe YAML (or a bundled recipe's name)"),
          model: str = ModelArg,
          output: Path = typer.Option(..., "-o", "--output", help="artifact directory"),
          overwrite: bool = typer.Option(False, help="replace a non-empty output directory"),
          device: str = typer.Option("auto", help="compute device for calibration"),
          dtype: str = typer.Option("float32", help="dtype the passes compute in (the model is "
                                                    "loaded in it)"),
          save_dtype: str = typer.Option("auto", help="dtype of the artifact's unquantized "
                                         "tensors and INT scales: auto (the source's 16-bit "
                                         "dtype, else bfloat16), bfloat16, float16, float32"),
          trust_remote_code: bool = typer.Option(False, help="allow model code from the hub"),
          allow_pickle: bool = typer.Option(False, help="allow .bin/.pt pickle checkpoints"),
          strict: bool = typer.Option(False, help="make any fallback (e.g. GPTQ -> RTN) an error"),
          restart: bool = typer.Option(False, help="discard an interrupted run instead of "
                                                   "resuming it"),
          dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and estimates; "
                                                                "load no weights"),
          tp: int = typer.Option(1, help="tensor-parallel size to check vLLM compatibility for"),
          gpus: Optional[int] = typer.Option(
              None, help="calibrate data parallel on this many GPUs (with --device cpu: CPU "
                         "processes); default 1, or torchrun's WORLD_SIZE (docs/multi_gpu.md)"),
          as_json: bool = typer.Option(False, "--json", help="print the report as JSON on stdout"),
          allow_path: list[Path] = typer.Option(
              [], "--allow-path", help="a file or directory calibration text may be read from "
                                       "(besides the current and the recipe's directory)"),
          ) -> None:
    """Apply a recipe's passes to MODEL and write the compressed artifact to -o.

    A killed run resumes when the same command is run again (see --restart)."""
    from compress.errors import UsageError
    from compress.recipe import load_recipe

    if tp < 1:
        raise UsageError(f"--tp {tp}: the tensor-parallel size must be at least 1")
    _check_dtype(dtype)
    device = _device(device, resolve_auto=False)
    parsed = load_recipe(recipe, allow_paths=allow_path)  # fails here, before any model loads
    if dry_run:
        from compress.formats.artifact import check_output
        from compress.pipeline import input_paths
        from compress.preflight import preflight
        from compress.runtime.checkpoint import Checkpoint

        check_output(output, overwrite, input_paths(Checkpoint.open(model, allow_pickle)))
        preflight(parsed, model, output, device=device, dtype=dtype, tp=tp,
                  trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        return
    from compress.api import apply as apply_api

    report = apply_api(model, parsed, output, overwrite=overwrite, device=device, dtype=dtype,
                       save_dtype=save_dtype,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                       strict=strict, restart=restart, gpus=gpus)
    if as_json and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0's only
        print(json.dumps(report))
    for item in report["passes"]:
        console.print(f"[bold]{item['pass']}[/] {item['seconds']:.1f}s "
                      f"{key_values(item['summary'])}", highlight=False, soft_wrap=True)
    console.print(f"wrote {output}")


@app.command()
def evaluate(artifact: str = typer.Argument(..., help="artifact directory or any model source"),
             baseline: Optional[str] = typer.Option(None, help="model to compare against"),
             tasks: Optional[str] = typer.Option(
                 None, help="lm-eval tasks, comma-separated (local: stdlib_docs, stdlib_lastword)"),
             limit: Optional[int] = typer.Option(None, help="at most this many items per task"),
             min_recovery: Optional[float] = typer.Option(
                 None, help="exit 1 if any metric's recovery (compressed/baseline) is below"),
             text: str = typer.Option("stdlib", help="evaluation text: stdlib, .txt or .jsonl"),
             seq_len: int = typer.Option(512, help="tokens per window"),
             max_tokens: int = typer.Option(16384, help="evaluate on at most this many tokens"),
             batch_size: int = typer.Option(4, help="windows / requests per forward"),
             output: Optional[Path] = typer.Option(
                 None, "-o", "--output",
                 help="JSON results (default: ARTIFACT/evaluation.json when it is writable)"),
             allow_path: list[Path] = typer.Option(
                 [], "--allow-path", help="a file or directory --text may be read from (besides "
                                          "the current directory)"),
             ) -> None:
    """Perplexity, KL and top-1 agreement against --baseline, lm-eval --tasks, recovery gates."""
    from compress.errors import UsageError

    if min_recovery is not None and not baseline:
        raise UsageError("--min-recovery compares against a baseline: pass --baseline MODEL")
    if seq_len < 2 or batch_size < 1 or max_tokens < seq_len or (limit is not None and limit < 1):
        raise UsageError("--seq-len must be at least 2, --max-tokens at least --seq-len, "
                         "--batch-size and --limit at least 1")
    from compress.calib import check_text_source
    from compress.evaluation.report import evaluate as run
    from compress.evaluation.report import failing, results_path, write_json

    check_text_source(text, allow_path)
    path = results_path(artifact, output)  # checked writable now, not after the evaluation
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    result = run(artifact, baseline, text, seq_len, max_tokens, names, limit, batch_size)
    failures = failing(result["recovery"], min_recovery, result) \
        if min_recovery is not None else []
    result["gate"] = {"min_recovery": min_recovery, "failed": failures}
    _print_evaluation(result)
    if path:
        write_json(result, path)
        console.print(f"wrote {path}")
    elif output is None and Path(artifact).is_dir():
        console.print(f"{artifact} is not writable: the results are on stdout only (-o FILE "
                      "saves them)", highlight=False)
    print(json.dumps(result))  # stdout stays machine-readable; tables go to stderr
    for line in failures:
        console.print(f"[red]recovery gate failed:[/] {line}", highlight=False)
    if failures:
        sys.exit(1)  # (typer.Exit's code is dropped under standalone_mode=False)


def _print_evaluation(result: dict) -> None:
    from rich.table import Table

    table = Table("metric", "value", "recovery")
    rec = result["recovery"]
    for key in ("tokens", "perplexity", "baseline_perplexity", "kl_divergence", "top1_agreement"):
        if key in result:
            value = result[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value),
                          f"{rec[key]:.4f}" if key in rec else "")
    for task, scores in result["tasks"].items():
        for metric, value in scores.items():
            name = f"{task}/{metric}"
            table.add_row(name, f"{value:.4f}", f"{rec[name]:.4f}" if name in rec else "")
    table.add_row("bits_per_weight", f"{result['size']['bits_per_weight']:.2f}", "")
    console.print(table)


@app.command()
def compare(model: str = ModelArg,
            recipe_files: list[str] = typer.Argument(..., metavar="RECIPE...",
                                                     help="recipe YAMLs or bundled names"),
            output: Path = typer.Option(..., "-o", "--output", help="sweep directory"),
            tasks: Optional[str] = typer.Option(
                "stdlib_lastword", help="lm-eval tasks, comma-separated ('' for none)"),
            limit: Optional[int] = typer.Option(100, help="at most this many items per task"),
            seq_len: int = typer.Option(512, help="tokens per perplexity window"),
            max_tokens: int = typer.Option(8192, help="perplexity/KL on this many tokens"),
            bench: bool = typer.Option(True, help="measure speed and peak memory"),
            ) -> None:
    """Apply each recipe to MODEL, evaluate and benchmark each; write compare.md, pareto.png."""
    from compress.compare import compare as sweep
    from compress.compare import write_outputs

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    result = sweep(model, recipe_files, output, names, limit, seq_len, max_tokens, bench)
    for path in write_outputs(result, output):
        console.print(f"wrote {path}")
    print((output / "compare.md").read_text())


@app.command()
def inspect(artifact: Path = typer.Argument(..., help="artifact directory"),
            as_json: bool = typer.Option(False, "--json", help="print the facts as JSON on stdout"),
            ) -> None:
    """Show what an artifact holds: formats per module, sizes, and the recipe's report."""
    from compress.inspect import describe_artifact

    facts = describe_artifact(artifact)
    if as_json:
        print(json.dumps(facts))


@app.command()
def recipes() -> None:
    """List the bundled recipes."""
    import yaml

    from compress.recipe import BUNDLED

    for path in sorted(BUNDLED.glob("*.yaml")):
        first = next((line[1:].strip() for line in path.read_text().splitlines()
                      if line.startswith("#")), "")
        passes = [p.get("pass") for p in yaml.safe_load(path.read_text()).get("passes", [])]
        print(f"{path.stem:24} {' + '.join(passes):28} {first}")


DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(dtype: str) -> None:
    from compress.errors import UsageError

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


def _device(device: str, resolve_auto: bool = True) -> str:
    """A device torch can use here; "auto" becomes cuda or cpu (unless resolve_auto=False)."""
    import torch

    from compress.errors import UsageError

    if device == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu") if resolve_auto else device
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: not a device; use auto, cpu, cuda or "
                         "cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available; use --device "
                             "cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    elif parsed.type != "cpu":
        raise UsageError(f"--device {device!r}: compress runs on cpu or cuda")
    return device


def _load_for_run(spec: str, device: str, dtype: str):
    """Load an artifact (packed weights kept in their stored dtypes) or any model source, in
    dtype, on device."""
    import torch

    from compress.models import load_model
    from compress.runtime.checkpoint import Checkpoint

    torch_dtype = getattr(torch, dtype)
    checkpoint = Checkpoint.open(spec)
    if checkpoint.kind == "artifact":
        from transformers import AutoTokenizer

        from compress.runtime.artifact import load_artifact

        model = load_artifact(checkpoint.path, device=device, dtype=torch_dtype)
        return model, AutoTokenizer.from_pretrained(checkpoint.path)
    loaded = load_model(spec, dtype=dtype)
    return loaded.model.to(device), loaded.tokenizer


@app.command()
def generate(artifact: str = typer.Argument(..., help="artifact directory or any model source"),
             prompt: str = typer.Argument(..., help="text to continue"),
             max_new_tokens: int = typer.Option(64, help="tokens to generate"),
             sample: bool = typer.Option(False, help="sample instead of greedy decoding"),
             chat: bool = typer.Option(False, help="wrap the prompt in the chat template"),
             device: str = typer.Option("auto", help="cpu, cuda or auto"),
             dtype: str = typer.Option("bfloat16", help="activation dtype (float32 on CPU)"),
             ) -> None:
    """Stream a continuation of PROMPT (greedy by default) and report the kernel paths used."""
    import torch
    from transformers import TextStreamer

    from compress.errors import UsageError
    from compress.runtime.modules import dispatch_summary

    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    _check_dtype(dtype)
    device = _device(device)
    model, tokenizer = _load_for_run(artifact, device, "float32" if device == "cpu" else dtype)
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=not chat, skip_special_tokens=True)
    if not chat:
        print(prompt, end="", flush=True)
    with torch.inference_mode():
        model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                       max_new_tokens=max_new_tokens, do_sample=sample, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    for kind, paths in dispatch_summary(model).items():
        console.print(f"[dim]{kind}: {paths}[/]", highlight=False)


@app.command()
def bench(artifact: str = typer.Argument(..., help="artifact directory or any model source"),
          baseline: Optional[str] = typer.Option(
              None, help="model to compare against (default: the artifact with its weights "
                         "dequantized to dense linears: same shapes, unquantized)"),
          prompt_len: int = typer.Option(128, help="prompt tokens (prefill)"),
          new_tokens: int = typer.Option(64, help="decode steps"),
          batch: int = typer.Option(1, help="sequences at once"),
          repeats: int = typer.Option(3, help="timed repeats (the median is reported)"),
          device: str = typer.Option("auto", help="cpu, cuda or auto"),
          dtype: str = typer.Option("bfloat16", help="activation dtype (float32 on CPU)"),
          output: Optional[Path] = typer.Option(None, "-o", "--output", help="JSON results"),
          ) -> None:
    """Prefill and decode tokens/s and peak memory of ARTIFACT and its baseline, in one run."""
    from rich.table import Table

    from compress.errors import UsageError
    from compress.evaluation.bench import dequantized_copy, measure_speed

    if min(prompt_len, new_tokens, batch, repeats) < 1:
        raise UsageError("--prompt-len, --new-tokens, --batch and --repeats must be >= 1")
    _check_dtype(dtype)
    device = _device(device)
    dtype = "float32" if device == "cpu" else dtype
    model, _ = _load_for_run(artifact, device, dtype)
    results = [measure_speed(model, artifact, batch, prompt_len, new_tokens, repeats)]
    if baseline:
        del model
        base, _ = _load_for_run(baseline, device, dtype)
        label = baseline
    else:
        base, label = dequantized_copy(model), "dequantized baseline"
        del model
    results.append(measure_speed(base, label, batch, prompt_len, new_tokens, repeats))
    table = Table("model", "method", "prefill tok/s", "decode tok/s", "ms/step", "peak MB",
                  title=f"{device} ({dtype}), batch {batch}, prompt {prompt_len}, "
                        f"{new_tokens} new tokens")
    for r in results:
        table.add_row(r.label, r.method, f"{r.prefill_tokens_per_s:.1f}",
                      f"{r.decode_tokens_per_s:.2f}", f"{r.decode_ms_per_step:.2f}",
                      f"{r.peak_memory_mb:.0f}")
    console.print(table)
    console.print(f"decode speed-up over the baseline: "
                  f"{results[0].decode_tokens_per_s / results[1].decode_tokens_per_s:.2f}x")
    console.print("kernel path per layer type (artifact):")
    for kind, paths in results[0].kernel_paths.items():
        console.print(f"  {kind}: {paths}", highlight=False)
    if output:
        output.write_text(json.dumps([r.to_dict() for r in results], indent=2))
        console.print(f"wrote {output}")


def _is_click(exc: Exception, name: str) -> bool:
    """exc is click's exception class `name`: from click itself, or from the copy of click
    that typer >= 0.20 vendors (typer._click), whose classes are not click's."""
    modules = ["click.exceptions", "typer._click.exceptions"]
    import importlib

    for module in modules:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(exc, cls):
            return True
    return False


def main() -> None:
    set_offline_unless_asked()
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer returns 130 for Ctrl-C in this mode
            if code == 130:
                console.print("interrupted")
            sys.exit(code)
    except CompressError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click's usage errors
        if _is_click(exc, "ClickException"):
            exc.show()
            sys.exit(exc.exit_code)
        if _is_click(exc, "Abort"):
            sys.exit(130)
        if os.environ.get("COMPRESS_DEBUG") == "1":
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        console.print(f"[red]error:[/] unexpected {type(exc).__name__}: {first} (a bug in "
                      "compress: please report it; COMPRESS_DEBUG=1 shows the traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)
