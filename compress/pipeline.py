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

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from compress import __version__, distributed
from compress.errors import CompressError, DiskFull
from compress.formats.artifact import check_output, partial_dir, save_artifact, saved_dtype
from compress.lock import output_lock
from compress.models import Loaded, layers_path, load_model
from compress.passes import Context, run_pass
from compress.progress import console, status
from compress.recipe import Recipe
from compress.resume import MANIFEST
from compress.versions import versions


def logits_probe(model, ids: torch.Tensor) -> torch.Tensor:
    """Outputs on a few real windows: logits for decoders, hidden states for encoders."""
    with torch.no_grad():
        out = model(ids.to(next(model.parameters()).device))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().cpu()


def is_layerwise(recipe: Recipe) -> bool:
    return all(cfg.layerwise for cfg in recipe.passes)


def fingerprints(ctx: Context, source, recipe_yaml: str, options: dict[str, Any]
                 ) -> dict[str, str]:
    """What an interrupted run must share with this one to be resumed by it: the model's
    content, the recipe, the calibration tokens, and every option that changes the output."""
    calib = ctx.calibration_ids()
    with status("hashing the model's files (to recognise an interrupted run of the same model)"):
        model = source.fingerprint()
    return {"model": model,
            "recipe": hashlib.sha256((recipe_yaml + __version__).encode()).hexdigest()[:16],
            "calibration data": hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16],
            "options": json.dumps(options, sort_keys=True)}


def source_dtype(loaded: Loaded) -> torch.dtype | None:
    """The dtype the source model stores its weights in: config.json's for a directory, the
    in-memory parameters' for a model passed in memory; None for a GGUF (no 16-bit dtype)."""
    if loaded.source is None:
        return next(loaded.model.parameters()).dtype
    return loaded.source.stored_dtype()


def start_streaming(ctx: Context, loaded, out: Path, recipe_yaml: str, restart: bool,
                    options: dict[str, Any]) -> None:
    """Attach a LayerStore and a resumable Run (restoring an interrupted one) to ctx."""
    from compress.offload import LayerStore
    from compress.resume import Run
    from compress.runtime.artifact import structure, swap_quantized

    work = partial_dir(out)
    # Rank 0 opens (or resumes) the run; the other ranks get its state and never write.
    run = distributed.from_writer(
        lambda: Run.open(work, fingerprints(ctx, loaded.source, recipe_yaml, options), restart))
    run.writes = distributed.is_writer()
    ctx.store = LayerStore(layers_path(ctx.model, ctx.arch), work, loaded.tensors,
                           next(ctx.model.parameters()).dtype, writes=run.writes)
    ctx.run = run
    if run.resumed:
        # Rebuild the module structure the written layers were saved with: 2:4 storage modules
        # (converted as the last pass wrote their layer), then the quantized ones.
        if run.structure.get("sparse24"):
            from compress.runtime.sparse24 import load_sparse24

            load_sparse24(ctx.model, run.structure["sparse24"])
        swap_quantized(ctx.model, run.modules)
        structure(ctx.model).update(run.structure)
        ctx.store.load_rest(ctx.model)
        done = sum(1 for _ in ctx.store.written())
        console.print(f"resuming the interrupted run in {work}: {len(run.passes)} pass(es) "
                      f"finished, {done} layer file(s) written")


def input_paths(source) -> tuple[Path, ...]:
    """What the output must never touch: the model directory, or the GGUF file (nothing for a
    model already in memory)."""
    if source is None:
        return ()
    path = Path(source.path)
    if source.gguf_file:
        return (path / source.gguf_file,)
    return (path,) if path.exists() else ()


def apply_recipe(recipe: Recipe, model_spec: str | Loaded, out: Path, *, overwrite: bool = False,
                 device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False,
                 allow_pickle: bool = False, strict: bool = False,
                 restart: bool = False, save_dtype: str = "auto") -> dict[str, Any]:
    """Run every pass of `recipe` on `model_spec` (a model source, or a model already in
    memory as `Loaded`) and write the artifact to `out`, holding the output's lock throughout
    (a second run on the same output stops at once). The passes compute in `dtype`; the
    artifact stores unquantized tensors in `save_dtype` (auto: the source's 16-bit dtype, else
    bfloat16; float32 keeps the passes' values exactly)."""
    from compress.runtime.checkpoint import Checkpoint

    out = Path(out)
    saved_dtype(save_dtype, None)  # an unknown name fails before the model loads
    source = None if isinstance(model_spec, Loaded) else Checkpoint.open(model_spec, allow_pickle)
    # an unwritable place, or one overlapping the input, fails before the lock file is made
    check_output(out, overwrite, input_paths(source))
    # With several ranks, rank 0 alone holds the lock (and alone writes under it).
    with output_lock(out) if distributed.is_writer() else contextlib.nullcontext():
        return _apply_locked(recipe, model_spec, source, out, overwrite=overwrite,
                             device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                             allow_pickle=allow_pickle, strict=strict, restart=restart,
                             save_dtype=save_dtype)


def _apply_locked(recipe: Recipe, model_spec: str | Loaded, source, out: Path, *,
                  overwrite: bool, device: str, dtype: str, trust_remote_code: bool,
                  allow_pickle: bool, strict: bool, restart: bool, save_dtype: str
                  ) -> dict[str, Any]:
    from compress.preflight import check_disk, output_bytes, partial_bytes, plan

    check_output(out, overwrite, input_paths(source))
    in_memory = source is None
    if in_memory:  # the same checks, on the real model's shapes
        first = next(model_spec.model.parameters())
        estimated = output_bytes(model_spec.model, model_spec.arch, recipe, first.element_size())
    else:  # every check that needs no weight, from the config
        estimated = plan(recipe, source, dtype, trust_remote_code).output_bytes
    if restart and distributed.is_writer():
        shutil.rmtree(partial_dir(out), ignore_errors=True)
    streaming = is_layerwise(recipe) and not in_memory  # a model in memory is not streamed
    if not streaming and (partial_dir(out) / MANIFEST).is_file():
        raise CompressError(f"{partial_dir(out)} holds an interrupted run of another recipe; it "
                            "is kept: rerun the command that started it to resume, or add "
                            "--restart to discard it")
    check_disk(out, estimated, partial_bytes(out))
    start = time.perf_counter()
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
            start_streaming(ctx, loaded, out, recipe_yaml, restart,
                            {"dtype": dtype, "strict": strict,
                             "save dtype": str(ctx.save_dtype)})
        reports = run_passes(ctx, recipe)
        report = {"model": model_spec, "versions": versions(), "passes": reports,
                  "streamed": streaming, "seconds": round(time.perf_counter() - start, 2)}
        if ctx.run is not None and ctx.run.resumed_at_open:
            report["resumed"] = True
        report["ranks"] = distributed.peak_memory(compute)
        if distributed.is_writer():
            with status(f"saving {out}"):
                save_artifact(ctx.model, loaded.tokenizer, out, recipe_yaml, report, overwrite,
                              store=ctx.store, inputs=input_paths(source),
                              dtype=ctx.save_dtype)
    except BaseException as exc:
        if distributed.is_writer():  # what it wrote is what a rerun resumes
            _after_failure(exc, ctx.run, out, estimated)
        raise
    return report


def _after_failure(exc: BaseException, run, out: Path, estimated: int) -> None:
    """Keep an interrupted run, whatever stopped it, and say how to resume or discard it: only
    `--restart` or the run's own success deletes a partial run (Ctrl-C included: the user may
    want to continue later). A refused resume never gets here with a run (Run.open raised), so
    the run it refused stays untouched."""
    from compress.errors import disk_full
    from compress.preflight import disk_needed, free_space, partial_bytes

    if disk_full(exc) or isinstance(exc, DiskFull):
        needed = disk_needed(estimated, partial_bytes(out))
        where = (f"the interrupted run is kept in {run.dir}: free space and rerun the same "
                 "command to resume" if run is not None else "nothing was written")
        raise DiskFull(f"no space left on the device of {out}: about {needed / 1e9:.2f} GB "
                       f"more needed, {free_space(out) / 1e9:.2f} GB free; {where}") from None
    if run is None:
        return
    keep = (f"the interrupted run is kept in {run.dir}: rerun the same command to resume, or "
            "add --restart to discard it")
    if isinstance(exc, CompressError):
        exc.args = (f"{exc}; {keep}",)  # the caller re-raises it: one line, same exit code
    elif isinstance(exc, (Exception, KeyboardInterrupt)):
        console.print(f"[yellow]{keep}[/]", highlight=False)


def run_passes(ctx: Context, recipe: Recipe) -> list[dict[str, Any]]:
    reports = list(ctx.run.passes) if ctx.run else []
    for cfg in recipe.passes:
        if cfg.needs_family:
            ctx.arch.require(cfg.kind)
    for index, cfg in enumerate(recipe.passes):
        if index < len(reports):
            continue  # finished before an interruption; its layers are on disk
        ctx.pass_index = index
        if ctx.store is not None:  # the last pass writes the artifact's shards
            ctx.store.final = index == len(recipe.passes) - 1
            ctx.store.final_dtype = ctx.save_dtype if ctx.store.final else None
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
