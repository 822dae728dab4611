"""The artifact: a directory a user can serve, inspect and reload.

    config.json        HF config + quantization_config (compressed-tensors) + "compress" section
    model.safetensors  packed weights (compressed-tensors names: weight_packed, weight_scale, ...)
    tokenizer files, recipe.yaml, report.json

It is written into a temporary sibling directory and renamed when complete, so an interrupted
run leaves no partial artifact. Passes that change structure (pruned heads, precomputed first
layer, ...) record it in model.compress_structure; compress/runtime/artifact.py (the reader)
rebuilds it on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compress import __version__
from compress.errors import CompressError, DiskFull, UsageError, disk_full
from compress.formats import FIXED_DTYPE_TENSORS, WeightFormat, codec
from compress.integrity import CHECKSUMS, write_checksums
from compress.runtime.artifact import quantized_modules, structure

WEIGHTS = "model.safetensors"
SAVE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def saved_dtype(option: str, source_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype unquantized tensors (and INT scales) are saved in: `option` when given, else
    ("auto") the source model's 16-bit dtype, bfloat16 when it has none (float32, GGUF)."""
    if option not in SAVE_DTYPES:
        raise UsageError(f"--save-dtype {option!r}: choose one of {', '.join(SAVE_DTYPES)}")
    if option != "auto":
        return getattr(torch, option)
    return source_dtype if source_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def cast_for_save(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None
                  ) -> dict[str, torch.Tensor]:
    """Floating tensors (float32/float16/bfloat16) in `dtype`, except those whose dtype the
    format fixes (compress.formats.FIXED_DTYPE_TENSORS); codes and FP8/E8M0 scales untouched.
    dtype None: unchanged (intermediate files of a multi-pass run keep full precision)."""
    if dtype is None:
        return tensors
    wide = (torch.float32, torch.float16, torch.bfloat16)
    return {name: t.to(dtype) if t.dtype in wide and t.dtype != dtype
            and not name.endswith(FIXED_DTYPE_TENSORS) else t for name, t in tensors.items()}


def check_output(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output we must not write, before any work is done: a file, a non-empty
    directory without --overwrite, a directory --overwrite must not delete (not an artifact, or
    the working directory), an output that is, holds or lies inside an input."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is a file: choose a directory path")
    check_not_input(out, inputs)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output {out} is not empty: pass --overwrite to replace it")
        if not is_artifact_dir(out):
            raise UsageError(f"output {out} is not a compress artifact: --overwrite replaces "
                             "only an artifact or an empty directory; choose a new path")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:  # a real probe: os.access says yes to root even where writing fails
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise UsageError(f"output {out}: cannot write to {parent} ({exc.strerror}); "
                         "choose a writable location") from None


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_input(out: Path, inputs: tuple[Path, ...]) -> None:
    """The output (and its partial and old copies beside it) may not touch an input or the
    directory we run in: replacing it would delete them."""
    target = Path(out).resolve()
    if _contains(target, Path.cwd().resolve()):
        raise UsageError(f"output {out} is the current directory or contains it: name a new "
                         "directory for the artifact")
    for source in inputs:
        source = Path(source).resolve()
        if _contains(target, source) or _contains(source, target):
            raise UsageError(f"output {out} overlaps the input {source}: the output may not be "
                             "the input, hold it or lie inside it")


def is_artifact_dir(path: Path) -> bool:
    """A directory compress wrote: config.json with a "compress" section."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "compress" in config


def quantization_config(model: nn.Module) -> dict | None:
    """compressed-tensors quantization_config: one config group per distinct weight format."""
    return quantization_config_for({n: m.fmt for n, m in quantized_modules(model).items()})


def quantization_config_for(formats: dict[str, WeightFormat]) -> dict | None:
    """The quantization_config of modules stored in these formats (what compress writes, and
    what a loaded artifact's quantization_config must equal)."""
    groups: dict[str, tuple[WeightFormat, list[str]]] = {}
    for name, fmt in formats.items():
        groups.setdefault(fmt.name, (fmt, []))[1].append(name)
    if not groups:
        return None
    format_names = {codec(fmt).format_name(fmt) for fmt, _ in groups.values()}
    config = {
        "quant_method": "compressed-tensors",
        "format": format_names.pop() if len(format_names) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {"targets": [f"re:^{re.escape(n)}$" for n in names],
                           "weights": codec(fmt).scheme_args(fmt),
                           "input_activations": None, "output_activations": None,
                           "format": codec(fmt).format_name(fmt)}
            for i, (fmt, names) in enumerate(groups.values())},
        "ignore": [],
        "kv_cache_scheme": None,
    }
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(config)  # what we write, the library must accept
    return config


def state_tensors(model: nn.Module, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor to save, tied weights once (transformers re-ties them on load).
    skip_prefix: leave out tensors under it (decoder layers already written by a LayerStore)."""
    tensors = {}
    seen: set[int] = set()
    storages: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        shared = tensor.data_ptr() in seen and tensor.numel() > 0
        if shared and isinstance(tensor, nn.Parameter):
            continue  # a tied weight (lm_head sharing the embedding)
        seen.add(tensor.data_ptr())
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        # a buffer several modules share (NVFP4's global scale of fused q/k/v), or rows of one
        # stack (compress/runtime/fused.py): each module keeps its own copy, as
        # compressed-tensors expects; safetensors refuses tensors that share memory
        copy = shared or storage in storages
        storages.add(storage)
        tensors[name] = tensor.detach().clone() if copy else tensor.detach().contiguous()
    return tensors


# Hooks run on the model just before it is written: passes that store weights differently from
# how they compute on them (2:4 storage, ...) convert and verify here. fn(model, include) ->
# None, include(module name) -> bool: the modules to handle now. A streamed run calls them for
# each decoder layer as the last pass writes it (Context.close_layer), then for the rest here.
BEFORE_SAVE: list[Callable[[nn.Module, Callable[[str], bool]], None]] = []


def partial_dir(out: Path) -> Path:
    """Where an artifact is built before the rename; also what an interrupted run resumes."""
    return out.parent / f".{out.name}.partial"


def write_weights(model: nn.Module, directory: Path, store=None,
                  dtype: torch.dtype | None = None) -> None:
    """One model.safetensors; or, when a LayerStore wrote the layers as shards (already in
    `dtype`: see LayerStore.final_dtype), the remaining tensors as rest.safetensors plus the
    shard index transformers reads. Floating tensors are saved in `dtype` (cast_for_save)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if store is None:
        save_file(cast_for_save(state_tensors(model), dtype), str(directory / WEIGHTS),
                  metadata={"format": "pt"})
        return
    rest = cast_for_save(state_tensors(model, skip_prefix=store.layers_prefix + "."), dtype)
    tmp = directory / "rest.safetensors.tmp"  # a kill mid-write must not leave a truncated rest
    save_file(rest, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "rest.safetensors")
    weight_map = {name: "rest.safetensors" for name in rest}
    for file in store.written():
        with safe_open(str(file), "pt") as handle:
            weight_map.update({name: file.name for name in handle.keys()})
    total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def save_artifact(model: nn.Module, tokenizer, out: Path, recipe_yaml: str,
                  report: dict[str, Any], overwrite: bool = False, store=None,
                  inputs: tuple[Path, ...] = (), dtype: torch.dtype | None = None) -> Path:
    """Write the artifact into partial_dir(out), then rename it to out. With a LayerStore the
    partial directory already holds the layer shards (and is kept for resume until here).
    dtype: what floating tensors are saved in (None: as they are in memory)."""
    out = Path(out)
    check_output(out, overwrite, inputs)
    layers = store.layers_prefix + "." if store is not None else None
    for hook in BEFORE_SAVE:   # the streamed layers were handled as they were written
        hook(model, lambda name: layers is None or not name.startswith(layers))
    tmp = partial_dir(out)
    if store is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        qconfig = quantization_config(model)
        if qconfig:
            config["quantization_config"] = qconfig
        config["compress"] = {
            "version": __version__,
            "modules": {n: m.fmt.model_dump() for n, m in quantized_modules(model).items()},
            "structure": structure(model),
            "checksums": CHECKSUMS,
        }
        if dtype is not None:
            set_config_dtype(config, dtype)
        write_weights(model, tmp, store, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        for leftover in [tmp / "run.json", *tmp.glob("*.tmp")]:
            leftover.unlink(missing_ok=True)  # progress and temp files of a resumed run
        write_checksums(tmp)
        tmp.chmod(0o755)  # an artifact is meant to be shared (safetensors writes 0600 files)
        for file in tmp.iterdir():
            file.chmod(0o644)
        _replace_dir(tmp, out)
    except BaseException as exc:
        # A streamed run's partial directory holds its finished layers: kept for resume (the
        # pipeline says so). Otherwise nothing of value was written yet.
        if store is None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or disk_full(exc):
            kept = f"; the finished layers are kept in {tmp} for resume" if store else \
                "; nothing was written"
            error = DiskFull if disk_full(exc) else CompressError
            raise error(f"could not write {out}: {_os_reason(exc)}{kept}") from None
        raise
    return out


def _os_reason(exc: BaseException) -> str:
    if disk_full(exc):
        return "No space left on device"
    return getattr(exc, "strerror", None) or str(exc)


def set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    """config.json says the dtype the tensors are saved in (transformers loads in it)."""
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
