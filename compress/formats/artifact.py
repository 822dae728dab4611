"""The artifact: a directory a user can serve, inspect and reload.

    config.json        HF config + quantization_config (compressed-tensors) + "compress" section
    model.safetensors  packed weights (compressed-tensors names: weight_packed, weight_scale, ...)
    tokenizer files, recipe.yaml, report.json

It is written into a temporary sibling directory and renamed when complete, so an interrupted
run leaves no partial artifact. Passes that change structure (pruned heads, precomputed first
layer, ...) record it in model.compress_structure; STRUCTURE_LOADERS rebuild it on load.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compress import __version__
from compress.errors import CompressError, UsageError
from compress.formats import WeightFormat, codec
from compress.modules import QuantizedLinear, get_module, set_module

WEIGHTS = "model.safetensors"


def structure(model: nn.Module) -> dict[str, Any]:
    """Where passes record what a plain HF config cannot express (saved under "compress")."""
    if not hasattr(model, "compress_structure"):
        model.compress_structure = {}
    return model.compress_structure


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output we must not write, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is a file: choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output {out} is not empty: pass --overwrite to replace it")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:  # a real probe: os.access says yes to root even where writing fails
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise UsageError(f"output {out}: cannot write to {parent} ({exc.strerror}); "
                         "choose a writable location") from None


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantization_config(model: nn.Module) -> dict | None:
    """compressed-tensors quantization_config: one config group per distinct weight format."""
    groups: dict[str, tuple[WeightFormat, list[str]]] = {}
    for name, module in quantized_modules(model).items():
        groups.setdefault(module.fmt.name, (module.fmt, []))[1].append(name)
    if not groups:
        return None
    formats = {codec(fmt).FORMAT_NAME for fmt, _ in groups.values()}
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {"targets": [f"re:^{re.escape(n)}$" for n in names],
                           "weights": codec(fmt).scheme_args(fmt),
                           "input_activations": None, "output_activations": None,
                           "format": codec(fmt).FORMAT_NAME}
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
    for name, tensor in model.state_dict(keep_vars=True).items():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue  # a tied weight (lm_head sharing the embedding)
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    return tensors


# Hooks run on the model just before it is written: passes that store weights differently from
# how they compute on them (2:4 storage, ...) convert and verify here. fn(model) -> None.
BEFORE_SAVE: list[Callable[[nn.Module], None]] = []


def partial_dir(out: Path) -> Path:
    """Where an artifact is built before the rename; also what an interrupted run resumes."""
    return out.parent / f".{out.name}.partial"


def write_weights(model: nn.Module, directory: Path, store=None) -> None:
    """One model.safetensors; or, when a LayerStore wrote the layers as shards, the remaining
    tensors as rest.safetensors plus the shard index transformers reads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if store is None:
        save_file(state_tensors(model), str(directory / WEIGHTS), metadata={"format": "pt"})
        return
    rest = state_tensors(model, skip_prefix=store.layers_prefix + ".")
    save_file(rest, str(directory / "rest.safetensors"), metadata={"format": "pt"})
    weight_map = {name: "rest.safetensors" for name in rest}
    for file in store.written():
        with safe_open(str(file), "pt") as handle:
            weight_map.update({name: file.name for name in handle.keys()})
    total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def save_artifact(model: nn.Module, tokenizer, out: Path, recipe_yaml: str,
                  report: dict[str, Any], overwrite: bool = False, store=None) -> Path:
    """Write the artifact into partial_dir(out), then rename it to out. With a LayerStore the
    partial directory already holds the layer shards (and is kept for resume until here)."""
    out = Path(out)
    check_output(out, overwrite)
    for hook in BEFORE_SAVE:
        hook(model)
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
        }
        write_weights(model, tmp, store)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        for leftover in ("run.json", "run.json.tmp"):
            (tmp / leftover).unlink(missing_ok=True)
        tmp.chmod(0o755)  # an artifact is meant to be shared (safetensors writes 0600 files)
        for file in tmp.iterdir():
            file.chmod(0o644)
        _replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CompressError(f"could not write {out}: {exc.strerror or exc}; nothing was "
                            "written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


# ---------------------------------------------------------------------------------------------
# Loading

def _swap_quantized(model: nn.Module, modules: dict[str, dict]) -> None:
    for name, fmt in modules.items():
        linear = get_module(model, name)
        if isinstance(linear, QuantizedLinear):
            continue  # a structure loader already built it (e.g. 2:4 storage)
        bias = linear.bias if getattr(linear, "bias", None) is not None else None
        set_module(model, name, QuantizedLinear(linear.in_features, linear.out_features,
                                                WeightFormat(**fmt), bias))


# Structure loaders: key in config["compress"]["structure"] -> fn(model, value) that reshapes
# the freshly built model before its weights are loaded. Passes add theirs.
STRUCTURE_LOADERS: dict[str, Callable[[nn.Module, Any], None]] = {}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CompressError(f"{path} has no *.safetensors weights")
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CompressError(f"{file} is corrupt or truncated ({exc}); rebuild the "
                                "artifact") from None
    return tensors


def load_artifact(path: str | Path, device=None, dtype=None) -> nn.Module:
    """Rebuild the compressed model: quantized linears keep packed weights and compute with them."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    import compress.passes  # noqa: F401  (pass modules register their STRUCTURE_LOADERS)
    from compress.models import arch_for

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not an artifact (no config.json)")
    raw = json.loads((path / "config.json").read_text())
    section = raw.get("compress", {})
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch = arch_for(config)
    auto = AutoModel if arch.encoder else AutoModelForCausalLM
    torch_dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    model = auto.from_config(config, dtype=torch_dtype)
    model.compress_structure = dict(section.get("structure", {}))
    for key, value in model.compress_structure.items():
        if key not in STRUCTURE_LOADERS:
            raise CompressError(f"{path}: this version of compress cannot rebuild structure "
                                f"{key!r}; upgrade compress")
        STRUCTURE_LOADERS[key](model, value)
    _swap_quantized(model, section.get("modules", {}))
    tensors = read_tensors(path)
    for name, module in quantized_modules(model).items():
        prefix = name + "."
        packed = {k[len(prefix):]: tensors.pop(k) for k in list(tensors)
                  if k.startswith(prefix) and k[len(prefix):].startswith("weight")}
        if not packed:
            raise CompressError(f"{path}: no packed weight for {name}; the artifact is corrupt")
        module.load_packed(packed)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") or k.endswith("embed_out.weight")}
    missing = [k for k in missing if k not in tied and not _is_buffer(model, k)]
    if missing or unexpected:
        raise CompressError(f"{path}: weights do not match the config (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}); the artifact is corrupt")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model.to(device) if device is not None else model


def _is_buffer(model: nn.Module, key: str) -> bool:
    module_name, _, leaf = key.rpartition(".")
    return leaf in dict(get_module(model, module_name).named_buffers(recurse=False))
