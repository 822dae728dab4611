"""quantize: 4-bit (and 8-bit) weight-only quantization of the decoder's linear layers.

Round-to-nearest is the baseline method. Every quantized Linear becomes a QuantizedLinear that
keeps the packed weight, so what the pass measured is what gets saved and run.
"""

from __future__ import annotations

import fnmatch
import re
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.calib import check_finite
from compress.errors import UsageError
from compress.formats import WeightFormat, codec
from compress.models import layers_path
from compress.modules import QuantizedLinear, set_module
from compress.passes.base import Context, PassConfig, PassReport, register

FORMATS = {
    "int4": dict(type="int", bits=4),
    "int8": dict(type="int", bits=8),
    "nvfp4": dict(type="nvfp4", group_size=16),
    "mxfp4": dict(type="mxfp4", group_size=32),
}


class QuantizeConfig(PassConfig):
    """Weight-only quantization. Patterns are fnmatch globs or "re:<regex>" on module names."""

    layerwise: ClassVar[bool] = True

    kind: Literal["quantize"] = Field("quantize", alias="pass")
    format: Literal["int4", "int8", "nvfp4", "mxfp4"] = "int4"
    group_size: int | None = 128
    symmetric: bool = True
    method: Literal["rtn"] = "rtn"
    targets: list[str] = ["*"]
    ignore: list[str] = ["lm_head"]
    # A layer whose input size the group size does not divide: fail, or fall back to one scale
    # per output channel for that layer (reported).
    indivisible: Literal["error", "per_channel"] = "error"

    @model_validator(mode="after")
    def _check_format(self) -> "QuantizeConfig":
        self.weight_format()  # raises ValueError with the reason, reported at parse time
        return self

    def describe(self, model: nn.Module, arch) -> list[str]:
        from collections import Counter

        counts = Counter(fmt.name for fmt in planned_formats(model, arch, self).values())
        return [f"quantize ({self.method}): " + ", ".join(f"{n} modules -> {f}"
                                                          for f, n in counts.items())]

    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    def output_bits(self, model: nn.Module, arch) -> dict[str, float]:
        return {name: fmt.bits_per_weight(model.get_submodule(name).in_features)
                for name, fmt in planned_formats(model, arch, self).items()}

    def weight_format(self, group_size: int | None | Literal["default"] = "default") -> WeightFormat:
        spec = dict(FORMATS[self.format])
        if self.format.startswith("int"):
            spec["group_size"] = self.group_size if group_size == "default" else group_size
            spec["symmetric"] = self.symmetric
        return WeightFormat(**spec)


def matches(name: str, patterns: list[str]) -> bool:
    """fnmatch glob on the full name or its last part; "re:" prefix for a regular expression."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1],
                                                                        pattern):
            return True
    return False


def target_linears(model: nn.Module, targets: list[str], ignore: list[str]) -> dict[str, nn.Linear]:
    """The nn.Linear modules a pass acts on, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and matches(name, targets) and not matches(name, ignore)}


def planned_formats(model: nn.Module, arch, cfg: "QuantizeConfig") -> dict[str, WeightFormat]:
    """The format every targeted Linear will get (names and shapes only: works on meta), after
    checking the recipe's patterns: an ignore pattern that matches nothing is a warning, and a
    selection that splits a fused group (q/k/v, gate/up: one matrix in vLLM) is an error."""
    from compress.progress import console

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pattern in cfg.ignore:
        if not any(matches(name, [pattern]) for name in linears):
            console.print(f"[yellow]warning:[/] quantize: ignore pattern {pattern!r} matches "
                          "no module", highlight=False)
    chosen = {n: format_for(n, m.weight, cfg)[0] for n, m in linears.items()
              if matches(n, cfg.targets) and not matches(n, cfg.ignore)}
    prefix = layers_path(model, arch)
    for index in range(len(model.get_submodule(prefix))):
        for group in arch.fused_groups():
            names = [f"{prefix}.{index}.{member}" for member in group]
            formats = {chosen.get(name) for name in names}
            if len(formats) > 1:
                raise UsageError(f"quantize: {', '.join(names)} form one fused matrix in "
                                 "serving runtimes but would get different formats "
                                 f"({', '.join(str(f.name) if f else 'unquantized' for f in formats)}); "
                                 "target or ignore them together")
    return chosen


def format_for(name: str, weight: torch.Tensor, cfg: QuantizeConfig) -> tuple[WeightFormat, str]:
    """The format of one layer, and a note when it differs from the recipe's."""
    fmt = cfg.weight_format()
    in_features = weight.shape[1]
    if fmt.group_size and in_features % fmt.group_size:
        if cfg.indivisible == "per_channel" and fmt.type == "int":
            return cfg.weight_format(group_size=None), "per-channel (group size does not divide)"
        raise UsageError(f"{name}: input size {in_features} is not divisible by group_size "
                         f"{fmt.group_size}; choose a group size that divides it, ignore the "
                         "layer, or set indivisible: per_channel")
    return fmt, ""


def quantize_error(w: torch.Tensor, w_q: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error and SQNR in dB of a quantized weight."""
    noise = (w - w_q).float().pow(2).sum()
    signal = w.float().pow(2).sum()
    return {"rel_error": float((noise / signal).sqrt()),
            "sqnr_db": float(10 * torch.log10(signal / noise.clamp_min(1e-30)))}


def replace_with_quantized(model: nn.Module, name: str, linear: nn.Linear, q) -> dict:
    """Swap `linear` for a QuantizedLinear holding q; returns its error statistics."""
    check_finite(name, q.scale, "quantization scale")
    module = QuantizedLinear.from_quantized(q, linear.bias, scale_dtype=linear.weight.dtype)
    set_module(model, name, module.to(linear.weight.device))
    return quantize_error(linear.weight.data, module.dequantized_weight())


def quantize_rtn(ctx: Context, cfg: QuantizeConfig, name: str, linear: nn.Linear) -> dict:
    check_finite(name, linear.weight)
    fmt, note = format_for(name, linear.weight, cfg)
    q = codec(fmt).quantize(linear.weight.data, fmt)
    stats = replace_with_quantized(ctx.model, name, linear, q)
    return {"format": fmt.name, **stats, **({"note": note} if note else {})}


@register(QuantizeConfig)
def quantize(ctx: Context, cfg: QuantizeConfig) -> PassReport:
    report = PassReport("quantize", summary={"format": cfg.format, "method": cfg.method})
    plan = planned_formats(ctx.model, ctx.arch, cfg)  # pattern checks before any change
    if not plan and ctx.first_layer() == 0:  # a resumed run may have nothing left to do
        raise UsageError(f"quantize: no Linear layer matches targets {cfg.targets} "
                         f"minus ignore {cfg.ignore}")
    for _, layer_name, layer in ctx.layers():
        for name in [n for n in plan if n.startswith(layer_name + ".")]:
            report.modules[name] = quantize_rtn(ctx, cfg, name, ctx.model.get_submodule(name))
    inside = layers_path(ctx.model, ctx.arch) + "."
    for name in [n for n in plan if not n.startswith(inside)]:  # e.g. an lm_head asked for
        report.modules[name] = quantize_rtn(ctx, cfg, name, ctx.model.get_submodule(name))
    errors = [m["rel_error"] for m in report.modules.values()]
    report.summary.update(modules=len(errors),
                          mean_rel_error=sum(errors) / max(len(errors), 1))
    return report
