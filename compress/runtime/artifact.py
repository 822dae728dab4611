"""The artifact reader: config.json + safetensors -> an nn.Module that computes with the
compressed weights (compress.load). The writer is compress/formats/artifact.py.

A structural change that a plain HF config cannot express (pruned heads, a precomputed first
layer, CRMSNorm, 2:4 storage) is recorded by its pass in model.compress_structure, saved under
config["compress"]["structure"], and rebuilt here by the loader of its key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compress.errors import CompressError, UsageError
from compress.formats import WeightFormat
from compress.runtime.checkpoint import Checkpoint, read_config_json
from compress.runtime.modules import QuantizedLinear, get_module, set_module


def structure(model: nn.Module) -> dict[str, Any]:
    """Where passes record what a plain HF config cannot express (saved under "compress")."""
    if not hasattr(model, "compress_structure"):
        model.compress_structure = {}
    return model.compress_structure


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def swap_quantized(model: nn.Module, modules: dict[str, dict]) -> None:
    for name, fmt in modules.items():
        linear = get_module(model, name)
        if isinstance(linear, QuantizedLinear):
            continue  # a structure loader already built it (e.g. 2:4 storage)
        bias = linear.bias if getattr(linear, "bias", None) is not None else None
        set_module(model, name, QuantizedLinear(linear.in_features, linear.out_features,
                                                WeightFormat(**fmt), bias))


def structure_loaders() -> dict[str, Callable[[nn.Module, Any], None]]:
    """Key in config["compress"]["structure"] -> fn(model, record) that reshapes a freshly built
    model before its weights are loaded. One explicit table: no pass registers anything."""
    from compress.runtime import heads, moe, norms, precompute, sparse24

    return {"rmsnorm": norms.load_rmsnorm,
            "precompute": precompute.load_precompute,
            "attention_heads": heads.rebuild_heads,
            "sparsity": lambda model, record: None,  # a marker: the zeros are in the weights
            "sparse24": sparse24.load_sparse24,
            "experts": moe.load_experts}


def read_artifact_config(path: Path, verify: bool = True) -> dict:
    """config.json of an artifact, after its checksums (unless verify=False) and the agreement of
    quantization_config with compress's module formats are checked."""
    from compress.formats.artifact import quantization_config_for
    from compress.integrity import quantization_mismatch, verify_checksums

    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not an artifact (no config.json)")
    raw = read_config_json(path / "config.json", "artifact")
    if not isinstance(raw.get("compress", {}), dict):
        raise CompressError(f"{path / 'config.json'} is not a config object; the artifact is "
                            "corrupt")
    section = raw.get("compress", {})
    if verify:
        verify_checksums(path, required="checksums" in section)
    try:
        formats = {n: WeightFormat(**f) for n, f in section.get("modules", {}).items()}
        expected = quantization_config_for(formats)
    except (TypeError, ValueError, AttributeError) as exc:
        raise CompressError(f"{path}: the compress module formats are invalid "
                            f"({str(exc).splitlines()[0]}); the artifact is corrupt") from None
    problem = quantization_mismatch(raw.get("quantization_config"), expected)
    if problem:
        raise CompressError(f"{path}: {problem}; transformers and vLLM would run a different "
                            "model than compress: rebuild the artifact")
    return raw


def _corrupt_on_error(load: Callable) -> Callable:
    """Anything the rebuild trips over in a damaged artifact becomes one CompressError line."""
    import functools

    @functools.wraps(load)
    def wrapper(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except (CompressError, KeyboardInterrupt, MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 (torch/transformers raise many types here)
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise CompressError(f"{path}: cannot rebuild the model ({type(exc).__name__}: "
                                f"{first}); the artifact is corrupt") from None
    return wrapper


@_corrupt_on_error
def load_artifact(path: str | Path, device=None, dtype=None, verify: bool = True) -> nn.Module:
    """Rebuild the compressed model: quantized linears keep packed weights and compute with them.
    verify=False skips the checksums (faster for large artifacts)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from compress.models import arch_for

    path = Path(path)
    raw = read_artifact_config(path, verify)
    section = raw.get("compress", {})
    checkpoint = Checkpoint.artifact(path)
    config = checkpoint.config()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch = arch_for(config)
    auto = AutoModel if arch.encoder else AutoModelForCausalLM
    torch_dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with _skeleton():   # every weight is read below: random init would be wasted (minutes at 8B)
        model = auto.from_config(config, dtype=torch_dtype)
    model.compress_structure = dict(section.get("structure", {}))
    loaders = structure_loaders()
    for key, value in model.compress_structure.items():
        if key not in loaders:
            raise CompressError(f"{path}: this version of compress cannot rebuild structure "
                                f"{key!r}; upgrade compress")
        loaders[key](model, value)
    swap_quantized(model, section.get("modules", {}))
    tensors = checkpoint.read_prefix("")
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
    for module in model.modules():
        if hasattr(module, "reference_forward"):
            module.keep_decoded = True   # decoded weights may be kept on the CPU (modules.py)
    model.eval()
    if device is not None:
        model = model.to(device)
    from compress.runtime.attention import pack_gqa_decode

    pack_gqa_decode(model)   # single-token GQA attention without repeat_kv's K/V copies
    if any(p.is_cuda for p in model.parameters()):
        from compress.runtime.fused import fuse_projections
        from compress.runtime.kv_cache import fuse_static_cache
        from compress.runtime.norms import fuse_residual_norms, fuse_rmsnorms
        from compress.runtime.rope import fuse_rope

        fuse_rmsnorms(model)   # one Triton kernel per norm call in the decode step
        fuse_residual_norms(model)   # and the attention's residual add in that kernel
        fuse_rope(model)   # and per RoPE of q and k
        fuse_projections(model)   # q/k/v and gate/up: one matmul each (same memory)
        fuse_static_cache(model)   # a static cache's update: one launch a layer, not five
    return model


def _skeleton():
    """transformers' own no-init context (the one from_pretrained uses): parameters are left
    uninitialized, buffers computed in __init__ (rotary inv_freq, position ids) are kept. Every
    parameter is then either loaded or tied, else load_artifact refuses the artifact."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:   # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _is_buffer(model: nn.Module, key: str) -> bool:
    module_name, _, leaf = key.rpartition(".")
    return leaf in dict(get_module(model, module_name).named_buffers(recurse=False))


