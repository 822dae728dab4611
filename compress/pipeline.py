"""`compress apply`: recipe -> passes -> artifact.

Two ways to run, chosen by the recipe:
- layer-wise recipes (every pass touches decoder layers one at a time, e.g. quantize, sparsify):
  layers stream from the checkpoint's shards through the passes to the artifact's shards, with
  memory for about one layer plus the calibration activations; progress is recorded after every
  layer, so a killed run resumes where it stopped;
- other recipes (passes that need the whole model: rmsnorm, precompute, prune_heads) hold the
  model in memory, and exact passes are checked: logits before and after must agree.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from compress import __version__
from compress.formats.artifact import check_output, partial_dir, save_artifact, saved_dtype
from compress.models import Loaded, layers_path, load_model, model_fingerprint
from compress.passes import Context, run_pass
from compress.progress import console, status
from compress.recipe import Recipe
from compress.versions import versions


def logits_probe(model, ids: torch.Tensor) -> torch.Tensor:
    """Outputs on a few real windows: logits for decoders, hidden states for encoders."""
    with torch.no_grad():
        out = model(ids.to(next(model.parameters()).device))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().cpu()


def is_layerwise(recipe: Recipe) -> bool:
    return all(cfg.layerwise for cfg in recipe.passes)


def fingerprints(ctx: Context, source, recipe_yaml: str) -> dict[str, str]:
    calib = ctx.calibration_ids()
    return {"model": model_fingerprint(source), "save dtype": str(ctx.save_dtype),
            "recipe": hashlib.sha256((recipe_yaml + __version__).encode()).hexdigest()[:16],
            "calibration data": hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16]}


def source_dtype(loaded: Loaded) -> torch.dtype | None:
    """The dtype the source model stores its weights in: config.json's for a directory, the
    in-memory parameters' for a model passed in memory; None for a GGUF (no 16-bit dtype)."""
    import json

    if loaded.source is None:
        return next(loaded.model.parameters()).dtype
    config = Path(loaded.source.path) / "config.json"
    if loaded.source.gguf_file or not config.is_file():
        return None
    raw = json.loads(config.read_text())
    name = raw.get("dtype") or raw.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def start_streaming(ctx: Context, loaded, out: Path, recipe_yaml: str, restart: bool) -> None:
    """Attach a LayerStore and a resumable Run (restoring an interrupted one) to ctx."""
    from compress.offload import LayerStore, safetensors_index
    from compress.resume import Run
    from compress.runtime.artifact import structure, swap_quantized

    work = partial_dir(out)
    run = Run.open(work, fingerprints(ctx, loaded.source, recipe_yaml), restart)
    lazy = loaded.source.kind == "dir"
    ctx.store = LayerStore(layers_path(ctx.model, ctx.arch), work,
                           safetensors_index(Path(loaded.source.path)) if lazy else None,
                           next(ctx.model.parameters()).dtype)
    ctx.run = run
    if run.resumed:
        # Rebuild the module structure the written layers were saved with.
        swap_quantized(ctx.model, run.modules)
        structure(ctx.model).update(run.structure)
        ctx.store.load_rest(ctx.model)
        done = sum(1 for _ in ctx.store.written())
        console.print(f"resuming the interrupted run in {work}: {len(run.passes)} pass(es) "
                      f"finished, {done} layer file(s) written")


def apply_recipe(recipe: Recipe, model_spec: str | Loaded, out: Path, *, overwrite: bool = False,
                 device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False,
                 allow_pickle: bool = False, strict: bool = False,
                 restart: bool = False, save_dtype: str = "auto") -> dict[str, Any]:
    """Run every pass of `recipe` on `model_spec` (a model source, or a model already in
    memory as `Loaded`) and write the artifact to `out`. The passes compute in `dtype`; the
    artifact stores unquantized tensors in `save_dtype` (auto: the source's 16-bit dtype)."""
    out = Path(out)
    check_output(out, overwrite)
    saved_dtype(save_dtype, None)  # an unknown name fails before the model loads
    start = time.perf_counter()
    in_memory = isinstance(model_spec, Loaded)
    streaming = is_layerwise(recipe) and not in_memory  # a model in memory is not streamed
    if in_memory:
        loaded, model_spec = model_spec, type(model_spec.model).__name__
    else:
        with status(f"loading {model_spec}"):
            loaded = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code,
                                allow_pickle=allow_pickle, lazy=streaming)
    compute = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                           else ("cpu" if device == "auto" else device))
    ctx = Context(loaded.model, loaded.tokenizer, loaded.arch, recipe.calibration, compute,
                  strict=strict)
    ctx.save_dtype = saved_dtype(save_dtype, source_dtype(loaded))
    recipe_yaml = recipe.to_yaml()
    try:
        if streaming:
            start_streaming(ctx, loaded, out, recipe_yaml, restart)
        reports = run_passes(ctx, recipe)
        report = {"model": model_spec, "versions": versions(), "passes": reports,
                  "streamed": streaming, "seconds": round(time.perf_counter() - start, 2)}
        if ctx.run is not None and ctx.run.resumed:
            report["resumed"] = True
        with status(f"saving {out}"):
            save_artifact(ctx.model, loaded.tokenizer, out, recipe_yaml, report, overwrite,
                          store=ctx.store, dtype=ctx.save_dtype)
    except BaseException:
        # Python-level failures and Ctrl-C clean up; only a hard kill (SIGKILL, power loss)
        # leaves the partial directory, and the same command then resumes from it.
        shutil.rmtree(partial_dir(out), ignore_errors=True)
        raise
    return report


def run_passes(ctx: Context, recipe: Recipe) -> list[dict[str, Any]]:
    reports = list(ctx.run.passes) if ctx.run else []
    for index, cfg in enumerate(recipe.passes):
        if index < len(reports):
            continue  # finished before an interruption; its layers are on disk
        ctx.pass_index = index
        if ctx.store is not None:  # the last pass writes the artifact's shards
            ctx.store.final_dtype = ctx.save_dtype if index == len(recipe.passes) - 1 else None
        probe = ctx.calibration_ids()[:2, :128] if cfg.exact else None
        before = logits_probe(ctx.model, probe) if cfg.exact else None
        resumed_at = ctx.first_layer()
        report = run_pass(ctx, cfg)
        if cfg.exact:
            diff = (logits_probe(ctx.model, probe) - before).abs().max().item()
            report.summary["max_abs_logit_diff"] = diff
        if resumed_at:
            report.summary["resumed_at_layer"] = resumed_at  # statistics cover later layers
        reports.append(report.to_dict())
        if ctx.run:
            ctx.store.save_rest(ctx.model)
            ctx.run.pass_done(report.to_dict())
    return reports
