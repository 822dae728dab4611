"""`compress apply`: recipe -> passes -> artifact, with the exactness check of exact passes."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from compress import __version__
from compress.formats.artifact import check_output, save_artifact
from compress.models import load_model
from compress.passes import Context, run_pass
from compress.recipe import Recipe
from compress.progress import status


def logits_probe(model, ids: torch.Tensor) -> torch.Tensor:
    """Outputs on a few real windows: logits for decoders, hidden states for encoders."""
    with torch.no_grad():
        out = model(ids.to(next(model.parameters()).device))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().cpu()


def versions() -> dict[str, str]:
    import transformers

    return {"compress": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def apply_recipe(recipe: Recipe, model_spec: str, out: Path, *, overwrite: bool = False,
                 device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False,
                 allow_pickle: bool = False, strict: bool = False) -> dict[str, Any]:
    """Run every pass of `recipe` on `model_spec` and write the artifact to `out`."""
    check_output(out, overwrite)
    start = time.perf_counter()
    with status(f"loading {model_spec}"):
        loaded = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle)
    compute = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                           else ("cpu" if device == "auto" else device))
    ctx = Context(loaded.model, loaded.tokenizer, loaded.arch, recipe.calibration, compute,
                  strict=strict)
    reports = []
    for cfg in recipe.passes:
        probe = ctx.calibration_ids()[:2, :128] if cfg.exact else None
        before = logits_probe(ctx.model, probe) if cfg.exact else None
        report = run_pass(ctx, cfg)
        if cfg.exact:
            diff = (logits_probe(ctx.model, probe) - before).abs().max().item()
            report.summary["max_abs_logit_diff"] = diff
        reports.append(report.to_dict())
    report = {"model": model_spec, "versions": versions(), "passes": reports,
              "seconds": round(time.perf_counter() - start, 2)}
    with status(f"saving {out}"):
        save_artifact(ctx.model, loaded.tokenizer, out, recipe.to_yaml(), report, overwrite)
    return report
