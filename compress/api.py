"""The Python API: what `compress apply` does, for a model in memory or on disk.

    import compress
    compress.apply("smollm2-135m", "int4-gptq", "out/int4")
    compress.apply(model, [QuantizeConfig(format="int4", group_size=128)], "out/int4",
                   tokenizer=tokenizer)
    model = compress.load("out/int4")
    compress.apply("path/to/model", "int4-gptq", "out/int4", gpus=4)   # 4 GPUs, data parallel
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from compress.errors import UsageError
from compress.passes import PassConfig
from compress.recipe import Recipe, load_recipe, parse_recipe


def as_recipe(recipe: str | Path | Recipe | Sequence[PassConfig | dict]) -> Recipe:
    """A recipe from a YAML path, a bundled recipe's name, a Recipe, or a list of pass configs
    (PassConfig objects or their dicts, as in a recipe's `passes:`)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    passes = [p.model_dump(by_alias=True) if isinstance(p, PassConfig) else p for p in recipe]
    return parse_recipe({"passes": passes}, "passes")


def apply(model: str | nn.Module, recipe: str | Path | Recipe | Sequence[PassConfig | dict],
          output: str | Path, *, tokenizer: Any = None, gpus: int | None = None,
          **options: Any) -> dict[str, Any]:
    """Compress `model` (a model source as on the command line, or a transformers model in
    memory; then pass its `tokenizer` for calibrated passes) with `recipe`, write the artifact
    to `output` and return its report. `options` are `compress apply`'s: overwrite, device,
    dtype (compute), save_dtype (artifact), strict, restart, trust_remote_code, allow_pickle.
    gpus: calibrate data parallel on that many GPUs (device cpu: CPU processes), in processes
    started here; under torchrun (default: its WORLD_SIZE) this process is one of them."""
    from compress import distributed
    from compress.formats.artifact import check_output, partial_dir

    parsed = as_recipe(recipe)   # errors here, before any model loads
    if isinstance(model, str):  # the output may not be, hold or lie inside the input
        from compress.pipeline import input_paths
        from compress.runtime.checkpoint import Checkpoint

        inputs = input_paths(Checkpoint.open(model, options.get("allow_pickle", False)))
    else:
        inputs = ()
    check_output(Path(output), options.get("overwrite", False), inputs)
    device = options.get("device", "auto")
    gpus = distributed.check_request(gpus, device, parsed)
    if distributed.should_launch(gpus):
        if not isinstance(model, str):
            raise UsageError(f"gpus={gpus} starts new processes, which load the model "
                             "themselves: pass a model source (path or alias), or run this "
                             "script under torchrun")
        return distributed.launch(gpus, apply, (model, parsed, output), {"gpus": gpus, **options},
                                  partial_dir(Path(output)))
    with distributed.joined(device) as rank_device:  # (outside a group: device unchanged)
        return _apply_here(model, parsed, output, tokenizer, {**options, "device": rank_device})


def _apply_here(model, parsed: Recipe, output, tokenizer, options: dict) -> dict[str, Any]:
    from compress.models import Loaded, arch_for, split_experts
    from compress.pipeline import apply_recipe

    if isinstance(model, nn.Module):
        if not hasattr(model, "config"):
            raise UsageError("compress.apply needs a transformers model (with .config) or a "
                             "model source string")
        split_experts(model)   # fused MoE experts -> per-expert Linears, in place
        model = Loaded(model, tokenizer, arch_for(model.config), None)
    return apply_recipe(parsed, model, Path(output), **options)
