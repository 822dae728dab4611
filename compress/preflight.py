"""`compress apply --dry-run`: the plan and its costs, from the config alone (no weights read).

Prints what each pass will do to which modules, the estimated output size, peak memory and
time, checks free disk space, and (with --tp) what vLLM's kernels can serve.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError
from compress.progress import console

# vLLM's Marlin INT4/FP4 kernels tile the per-GPU weight in 64 output x 128 input blocks.
MARLIN_N, MARLIN_K = 64, 128


@dataclass
class Estimate:
    output_bytes: int
    peak_bytes: int
    seconds: float
    streamed: bool


def meta_model(config, arch) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    with init_empty_weights():
        return (AutoModel if arch.encoder else AutoModelForCausalLM).from_config(config)


def tensor_bytes(model: nn.Module, arch, dtype_bytes: int) -> dict[str, int]:
    """Bytes per saved tensor; a tied LM head is stored once (as the embedding)."""
    tied = {f"{arch.lm_head}.weight"} if getattr(model.config, "tie_word_embeddings", False) \
        and arch.lm_head else set()
    return {name: tensor.numel() * dtype_bytes
            for name, tensor in model.state_dict(keep_vars=True).items() if name not in tied}


def measured_flops() -> float:
    """This machine's matmul throughput (FLOP/s), from a short timed product."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(1024, 1024, device=device)
    torch.mm(a, a)
    start = time.perf_counter()
    for _ in range(4):
        torch.mm(a, a)
    if device == "cuda":
        torch.cuda.synchronize()
    return 4 * 2 * 1024 ** 3 / (time.perf_counter() - start)


def output_bytes(model: nn.Module, arch, recipe, dtype_bytes: int) -> int:
    """Estimated size of the artifact's weights."""
    sizes = tensor_bytes(model, arch, dtype_bytes)
    bits: dict[str, float] = {}
    for cfg in recipe.passes:
        bits.update(cfg.output_bits(model, arch))
    output = sum(size for name, size in sizes.items()
                 if name.removesuffix(".weight") not in bits)
    output += sum(model.get_submodule(n).weight.numel() * b / 8 for n, b in bits.items())
    return int(output)


def estimate(model: nn.Module, arch, recipe, dtype_bytes: int, streamed: bool) -> Estimate:
    from compress.models import layers_path

    sizes = tensor_bytes(model, arch, dtype_bytes)
    output = output_bytes(model, arch, recipe, dtype_bytes)
    prefix = layers_path(model, arch)
    layer_sizes = [sum(s for n, s in sizes.items() if n.startswith(f"{prefix}.{i}."))
                   for i in range(len(model.get_submodule(prefix)))]
    cal = recipe.calibration
    tokens = cal.samples * cal.seq_len
    activations = 2 * tokens * model.config.hidden_size * 4          # layer inputs and outputs
    widest = max(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
    hessian = 2 * widest * widest * 4
    held = sum(sizes.values()) - sum(layer_sizes) + 2 * max(layer_sizes) if streamed \
        else sum(sizes.values())
    # Each layer runs ~3 times per pass over the calibration tokens (capture, statistics,
    # re-run): 2 FLOPs per weight per token each time.
    calibrated = sum(1 for cfg in recipe.passes if cfg.needs_calibration())
    flops = 3 * 2 * sum(layer_sizes) / dtype_bytes * tokens * calibrated
    return Estimate(int(output), int(held + activations + hessian),
                    flops / measured_flops(), streamed)


def vllm_warnings(model: nn.Module, arch, recipe, tp: int) -> list[str]:
    """Per-module reasons vLLM could not serve the planned formats at tensor-parallel size tp."""
    warnings = []
    config = model.config
    heads = getattr(config, "num_attention_heads", 0)
    kv_heads = getattr(config, "num_key_value_heads", heads) or heads
    if heads % tp:
        warnings.append(f"num_attention_heads {heads} is not divisible by --tp {tp}")
    if kv_heads % tp and tp % kv_heads:
        warnings.append(f"num_key_value_heads {kv_heads} and --tp {tp}: neither divides the other")
    row_parallel = (arch.o, arch.mlp_out)      # split along the input axis across GPUs
    for cfg in recipe.passes:
        for name, _ in cfg.output_bits(model, arch).items():
            module = model.get_submodule(name)
            split_input = name.endswith(row_parallel)
            k = module.in_features // tp if split_input else module.in_features
            n = module.out_features if split_input else module.out_features // tp
            group = getattr(cfg, "group_size", None)
            if split_input and module.in_features % tp:
                warnings.append(f"{name}: in_features {module.in_features} not divisible by tp")
            elif group and k % group:
                warnings.append(f"{name}: per-GPU input size {k} not divisible by group_size "
                                f"{group}")
            elif k % MARLIN_K or n % MARLIN_N:
                warnings.append(f"{name}: per-GPU shape {n}x{k} is not a multiple of "
                                f"{MARLIN_N}x{MARLIN_K} (Marlin tiles); vLLM falls back to a "
                                "slower kernel or refuses")
    return warnings


def summarize(warnings: list[str]) -> dict[str, int]:
    """The same warning for every layer, once: model.layers.7.x -> model.layers.*.x."""
    import re
    from collections import Counter

    return dict(Counter(re.sub(r"\.\d+\.", ".*.", w, count=1) for w in warnings))


# Room beyond the estimate: tokenizer and JSON files, filesystem rounding, estimate error.
DISK_MARGIN = 64 << 20


def disk_needed(estimated: int, already_written: int = 0) -> int:
    return max(int(estimated * 1.1) + DISK_MARGIN - already_written, 0)


def free_space(out: Path) -> int:
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free


def check_disk(out: Path, estimated: int, already_written: int = 0) -> None:
    """Refuse to start when the output's filesystem lacks the estimate plus a margin."""
    needed, free = disk_needed(estimated, already_written), free_space(out)
    if free < needed:
        raise CompressError(f"not enough free disk space for {out}: about {needed / 1e9:.2f} GB "
                            f"needed, {free / 1e9:.2f} GB free; free some space or choose "
                            "another output location")


@dataclass
class Plan:
    """What the recipe will do to this model, known from its config alone."""

    model: nn.Module | None   # on the meta device (None for an artifact: see plan)
    arch: object
    source: object
    output_bytes: int


def plan(recipe, source, dtype: str = "float32", trust_remote_code: bool = False) -> Plan:
    """Read the config and check every pass against the model's names and shapes (group
    sizes, fused groups, ...): the checks that need no weights, before any weight loads."""
    from compress.models import arch_for

    config = source.config(trust_remote_code)
    arch = arch_for(config)
    if source.kind == "artifact":
        # Its config describes the model before compress changed its structure (pruned heads,
        # ...): shapes are known only once it is rebuilt, so the passes check them then.
        on_disk = sum(f.stat().st_size for f in Path(source.path).glob("*.safetensors"))
        return Plan(None, arch, source, on_disk)
    try:
        model = meta_model(config, arch)
    except (TypeError, ValueError, AttributeError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CompressError(f"the config of {source.label} does not describe a model "
                            f"transformers can build ({type(exc).__name__}: {first})") from None
    dtype_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return Plan(model, arch, source, output_bytes(model, arch, recipe, dtype_bytes))


def partial_bytes(out: Path) -> int:
    """Bytes an interrupted run already wrote (a resume needs only the rest)."""
    from compress.formats.artifact import partial_dir

    work = partial_dir(Path(out))
    return sum(f.stat().st_size for f in work.glob("layer-*.safetensors")) if work.is_dir() else 0


def preflight(recipe, model_spec: str, out: Path, *, device: str = "auto",
              dtype: str = "float32", tp: int = 1, trust_remote_code: bool = False,
              allow_pickle: bool = False) -> Estimate:
    from compress.models import arch_for
    from compress.pipeline import is_layerwise
    from compress.runtime.checkpoint import Checkpoint

    source = Checkpoint.open(model_spec, allow_pickle)
    config = source.config(trust_remote_code)
    arch = arch_for(config)
    model = meta_model(config, arch)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    streamed = is_layerwise(recipe) and source.kind == "dir"
    for index, cfg in enumerate(recipe.passes):
        for line in cfg.describe(model, arch):
            console.print(f"pass {index}: {line}", highlight=False)
    result = estimate(model, arch, recipe, dtype_bytes, streamed)
    mode = "layers streamed from disk" if streamed else "model held in memory"
    console.print(f"estimated output size: {result.output_bytes / 1e6:,.1f} MB", highlight=False)
    console.print(f"estimated peak memory: {result.peak_bytes / 1e6:,.1f} MB ({mode})",
                  highlight=False)
    console.print(f"estimated time: {result.seconds:,.0f} s (rough: from this machine's matmul "
                  "speed; real runs add overheads)", highlight=False)
    check_disk(out, result.output_bytes, partial_bytes(out))
    console.print("free disk space: enough", highlight=False)
    for warning, count in summarize(vllm_warnings(model, arch, recipe, tp)).items():
        times = f" ({count} layers)" if count > 1 else ""
        console.print(f"[yellow]vllm (tp={tp}):[/] {warning}{times}", highlight=False)
    return result
