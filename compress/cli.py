"""The `compress` command line: apply, evaluate, compare, inspect, recipes.

Heavy libraries are imported inside commands, after offline mode is set, so `--help` is fast
and hub libraries see HF_HUB_OFFLINE before they import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from compress.errors import CompressError
from compress.models import set_offline_unless_asked
from compress.progress import console

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
          dtype: str = typer.Option("float32", help="dtype to load the model in"),
          trust_remote_code: bool = typer.Option(False, help="allow model code from the hub"),
          allow_pickle: bool = typer.Option(False, help="allow .bin/.pt pickle checkpoints"),
          strict: bool = typer.Option(False, help="make any fallback (e.g. GPTQ -> RTN) an error"),
          ) -> None:
    """Apply a recipe's passes to MODEL and write the compressed artifact to -o."""
    from compress.recipe import load_recipe

    parsed = load_recipe(recipe)  # fails here, before any model loads
    from compress.formats.artifact import check_output

    check_output(output, overwrite)
    from compress.pipeline import apply_recipe

    report = apply_recipe(parsed, model, output, overwrite=overwrite, device=device, dtype=dtype,
                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                          strict=strict)
    for item in report["passes"]:
        console.print(f"[bold]{item['pass']}[/]: {item['seconds']:.1f}s {item['summary']}")
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
             output: Optional[Path] = typer.Option(None, "-o", "--output", help="JSON results"),
             ) -> None:
    """Perplexity, KL and top-1 agreement against --baseline, lm-eval --tasks, recovery gates."""
    from compress.errors import UsageError

    if min_recovery is not None and not baseline:
        raise UsageError("--min-recovery compares against a baseline: pass --baseline MODEL")
    from compress.evaluation.report import evaluate as run, failing, write_json

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    result = run(artifact, baseline, text, seq_len, max_tokens, names, limit, batch_size)
    failures = failing(result["recovery"], min_recovery) if min_recovery is not None else []
    result["gate"] = {"min_recovery": min_recovery, "failed": failures}
    _print_evaluation(result)
    path = output or (Path(artifact) / "evaluation.json" if Path(artifact).is_dir() else None)
    if path:
        write_json(result, path)
        console.print(f"wrote {path}")
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
    from compress.evaluation.compare import compare as sweep, write_outputs

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    result = sweep(model, recipe_files, output, names, limit, seq_len, max_tokens, bench)
    for path in write_outputs(result, output):
        console.print(f"wrote {path}")
    print((output / "compare.md").read_text())


@app.command()
def inspect(artifact: Path = typer.Argument(..., help="artifact directory")) -> None:
    """Show what an artifact holds: formats per module, sizes, and the recipe's report."""
    from compress.inspect import describe_artifact

    describe_artifact(artifact)


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


def main() -> None:
    set_offline_unless_asked()
    try:
        app(standalone_mode=False)
    except CompressError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise
