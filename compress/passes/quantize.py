"""quantize: 4-bit (and 8-bit) weight-only quantization of the decoder's linear layers.

Round-to-nearest is the baseline method. Every quantized Linear becomes a QuantizedLinear that
keeps the packed weight, so what the pass measured is what gets saved and run.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from compress.calib import check_finite
from compress.errors import UsageError
from compress.formats import FORMATS, FormatName, WeightFormat, codec
from compress.models import layers_path
from compress.passes.base import Context, PassConfig, PassReport, register
from compress.runtime.modules import QuantizedLinear, set_module


class QuantizeOverride(BaseModel):
    """Different settings for the modules matched by `targets` (first matching override wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str] = Field(min_length=1)
    format: FormatName | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    method: Literal["rtn", "gptq"] | None = None


class QuantizeConfig(PassConfig):
    """Weight-only quantization. Patterns are fnmatch globs or "re:<regex>" on module names.

    method: rtn (round-to-nearest, no calibration) or gptq (calibrated, layer by layer).
    awq: search activation-aware input scales first and fold them into the norms / linears
    before (then RTN or GPTQ). overrides: per-module format / group_size / symmetric / method.
    """

    layerwise: ClassVar[bool] = True

    kind: Literal["quantize"] = Field("quantize", alias="pass")
    format: FormatName = "int4"
    group_size: int | None = 128
    symmetric: bool = True
    method: Literal["rtn", "gptq"] = "rtn"
    awq: bool = False
    targets: list[str] = ["*"]
    ignore: list[str] = ["lm_head"]
    overrides: list[QuantizeOverride] = []
    # GPTQ settings: columns per lazy-update block, damping (fraction of mean diag H, escalated
    # x10 when the Cholesky factorization fails), activation order with static groups.
    # Defaults chosen by measurement (evaluate/RESULTS.md, issue 17): act_order with static
    # groups and the MSE clip search cut the held-out layer output error by 20% (INT4 g64) and
    # 16% (NVFP4) against the paper's min-max scales taken at each group's start.
    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0)
    act_order: bool = True
    # static_groups: fix every group's scale from the original weights before the column loop
    # (as llm-compressor does) instead of from the updated weights when the loop reaches the
    # group; act_order implies it. scale_search: "minmax" or "mse" (a diag(H)-weighted search
    # over clipping ratios per group, compress/passes/qparams.py).
    static_groups: bool = False
    scale_search: Literal["minmax", "mse"] = "mse"
    # GPTQ: a group of linears whose input saw fewer calibration tokens than this (an MoE
    # expert the router rarely picks) is rounded to nearest instead (reported).
    min_tokens: int = Field(32, ge=1)
    # AWQ: grid points for alpha in [0, 1).
    awq_grid: int = Field(20, ge=1)
    # A layer whose input size the group size does not divide: fail, or fall back to one scale
    # per output channel for that layer (reported).
    indivisible: Literal["error", "per_channel"] = "error"

    @model_validator(mode="after")
    def _check_format(self) -> "QuantizeConfig":
        _valid_format(self, "")  # raises ValueError with the reason, reported at parse time
        for index, override in enumerate(self.overrides):
            _valid_format(self.for_override(override), f"overrides[{index}]: ")
        return self

    def weight_format(self, group_size: int | None | Literal["default"] = "default") -> WeightFormat:
        row = FORMATS[self.format]
        if row.group_size:  # fixed by the format
            return WeightFormat(type=row.codec, bits=row.bits, group_size=row.group_size)
        return WeightFormat(type=row.codec, bits=row.bits, symmetric=self.symmetric,
                            group_size=self.group_size if group_size == "default" else group_size)

    def for_override(self, override: QuantizeOverride) -> "QuantizeConfig":
        """This config with the override's given fields in place (and no overrides)."""
        given = {k: getattr(override, k) for k in override.model_fields_set if k != "targets"}
        return self.model_copy(update={**given, "overrides": []})

    def for_module(self, name: str) -> "QuantizeConfig":
        """The settings that apply to module `name`."""
        for override in self.overrides:
            if matches(name, override.targets):
                return self.for_override(override)
        return self

    @property
    def calibrated(self) -> bool:
        return self.awq or self.method == "gptq" or any(o.method == "gptq"
                                                        for o in self.overrides)

    def needs_calibration(self) -> bool:
        return self.calibrated

    def describe(self, model: nn.Module, arch) -> list[str]:
        from collections import Counter

        counts = Counter(f"{p.fmt.name} ({p.method})" for p in plan_modules(model, arch,
                                                                            self).values())
        return [f"quantize{' with AWQ scaling' if self.awq else ''}: "
                + ", ".join(f"{n} modules -> {f}" for f, n in counts.items())]

    def output_bits(self, model: nn.Module, arch) -> dict[str, float]:
        return {name: plan.fmt.bits_per_weight(model.get_submodule(name).in_features)
                for name, plan in plan_modules(model, arch, self).items()}


def _valid_format(cfg: QuantizeConfig, where: str) -> None:
    """cfg's weight format, or a one-line ValueError saying why it is not valid."""
    try:
        cfg.weight_format()
    except ValidationError as exc:
        raise ValueError(where + exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


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


def is_router(name: str) -> bool:
    """An MoE router (mlp.gate, router, shared_expert_gate): it picks experts from small logit
    differences, so it stays in 16 bits whatever the targets say."""
    last = name.rsplit(".", 1)[-1]
    return last in ("gate", "router") or last.endswith("_gate")


def target_linears(model: nn.Module, targets: list[str], ignore: list[str]) -> dict[str, nn.Linear]:
    """The nn.Linear modules a pass acts on, by name (never a router)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and matches(name, targets) and not matches(name, ignore)
            and not is_router(name)}


def format_for(name: str, weight: torch.Tensor, cfg: QuantizeConfig) -> tuple[WeightFormat, str]:
    """The format of one layer, and a note when it differs from the recipe's."""
    fmt = cfg.weight_format()
    in_features = weight.shape[1]
    if fmt.group_size and in_features % fmt.group_size:
        if cfg.indivisible == "per_channel" and not fmt.row.group_size:  # recipe-chosen groups
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


@dataclass
class ModulePlan:
    """How one module is quantized."""

    fmt: WeightFormat
    method: str                      # "rtn" | "gptq"
    note: str = ""
    mask: torch.Tensor | None = None  # bool [O, I]: kept weights of a sparse module


def plan_modules(model: nn.Module, arch, cfg: QuantizeConfig) -> dict[str, ModulePlan]:
    """Every targeted module with its format and method, from names and shapes only (the
    layers may still be on disk). Checks the recipe's patterns first: an ignore pattern that
    matches nothing is a warning; a selection or override that gives the members of a fused
    group (q/k/v, gate/up: one matrix in serving runtimes) different formats is an error."""
    from compress.progress import console

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pattern in cfg.ignore:
        if not any(matches(name, [pattern]) for name in linears):
            console.print(f"[yellow]warning:[/] quantize: ignore pattern {pattern!r} matches "
                          "no module", highlight=False)
    plans = {}
    for name, linear in linears.items():
        if matches(name, cfg.targets) and not matches(name, cfg.ignore) and not is_router(name):
            module_cfg = cfg.for_module(name)
            fmt, note = format_for(name, linear.weight, module_cfg)
            plans[name] = ModulePlan(fmt, module_cfg.method, note)
    prefix = layers_path(model, arch)
    for index in range(len(model.get_submodule(prefix))):
        for group in arch.fused_groups():
            names = [f"{prefix}.{index}.{member}" for member in group]
            if not arch.known and not all(n in linears for n in names):
                continue  # the usual names are a guess for a family without a table row
            formats = {plans[n].fmt.name if n in plans else "unquantized" for n in names}
            if len(formats) > 1:
                raise UsageError(f"quantize: {', '.join(names)} form one fused matrix in "
                                 f"serving runtimes but would get different formats "
                                 f"({', '.join(sorted(formats))}); target or ignore them "
                                 "together")
    return plans


def ready(model: nn.Module, name: str, plan: ModulePlan) -> ModulePlan:
    """The plan of a module whose weights are now in memory: checked finite, with the mask of
    a module the sparsify pass marked (its zeros must stay zeros)."""
    from compress.runtime.artifact import structure

    weight = model.get_submodule(name).weight.data
    check_finite(name, weight)
    if name in structure(model).get("sparsity", {}):
        return replace(plan, mask=weight != 0)
    return plan


def _record(report: PassReport, name: str, plan: ModulePlan, stats: dict, **extra) -> None:
    report.modules[name] = {"format": plan.fmt.name, "method": plan.method, **stats, **extra,
                            **({"note": plan.note} if plan.note else {})}


@register(QuantizeConfig)
def quantize(ctx: Context, cfg: QuantizeConfig) -> PassReport:
    report = PassReport("quantize", summary={"format": cfg.format, "method": cfg.method,
                                             "awq": cfg.awq})
    plans = plan_modules(ctx.model, ctx.arch, cfg)  # checks before any change
    if not plans and ctx.first_layer() == 0:  # (a resumed run may have nothing left to do)
        raise UsageError(f"quantize: no Linear layer matches targets {cfg.targets} "
                         f"minus ignore {cfg.ignore}")
    if cfg.calibrated:
        from compress.passes.calibrated import quantize_calibrated

        quantize_calibrated(ctx, cfg, plans, report)
    else:
        for _, layer_name, layer in ctx.layers():
            names = [n for n in plans if n.startswith(layer_name + ".")]
            shared = fused_global_scales(layer, layer_name, names, plans, ctx.arch)
            for name in names:
                quantize_rtn(ctx, name, ready(ctx.model, name, plans[name]), report,
                             global_scale=shared.get(name))
        inside = layers_path(ctx.model, ctx.arch) + "."
        for name in [n for n in plans if not n.startswith(inside)]:  # an lm_head asked for
            quantize_rtn(ctx, name, ready(ctx.model, name, plans[name]), report)
    errors = [m["rel_error"] for m in report.modules.values()]
    report.summary.update(modules=len(errors), mean_rel_error=sum(errors) / max(len(errors), 1))
    note_unsplit_experts(ctx.model, report)
    return report


def note_unsplit_experts(model, report: PassReport) -> None:
    """3D expert weights of a layout compress cannot split (compress.runtime.moe.fused_layout
    knows Mixtral/Qwen-style, Llama 4-style and gpt-oss-style experts) are not Linears, so no
    pass touches them: say so, never silently."""
    from compress.progress import console
    from compress.runtime.moe import unsplit_experts

    left = unsplit_experts(model)
    if left:
        kinds = sorted(set(left.values()))
        report.summary["experts_left_16bit"] = len(left)
        console.print(f"[yellow]warning:[/] {report.name}: {len(left)} fused expert modules "
                      f"({', '.join(kinds)}) have a layout compress cannot split into "
                      "per-expert Linears (biases or interleaved gate/up); their weights stay "
                      "in 16 bits", highlight=False)


def fused_global_scales(layer: nn.Module, layer_name: str, names: list[str],
                        plans: dict[str, ModulePlan], arch) -> dict[str, torch.Tensor]:
    """NVFP4 (a format with a per-tensor scale): one global scale for the members of each
    group that serving runtimes fuse into one matrix (q/k/v, gate/up), from their concatenated
    weights; vLLM keeps one scale per fused matrix, so separate ones would not survive loading
    (and llm-compressor shares them too). name -> scale; modules in no such group are absent."""
    shared = {}
    for group in arch.fused_groups():
        members = [f"{layer_name}.{m}" for m in group if f"{layer_name}.{m}" in names]
        members = [n for n in members if plans[n].fmt.row.tensor_scale]
        if len(members) < 2:
            continue
        fmt = plans[members[0]].fmt       # plan_modules made fused members share a format
        weight = torch.cat([layer.get_submodule(n[len(layer_name) + 1:]).weight.data
                            for n in members])
        scale = codec(fmt).tensor_scale(weight, fmt)
        # a tensor of its own per module: the saver drops tensors that share storage
        shared.update({n: scale.clone() for n in members})
    return shared


def quantize_rtn(ctx: Context, name: str, plan: ModulePlan, report: PassReport,
                 global_scale: torch.Tensor | None = None, **extra) -> None:
    linear = ctx.model.get_submodule(name)
    q = codec(plan.fmt).quantize(linear.weight.data, plan.fmt, global_scale)
    _record(report, name, plan, replace_with_quantized(ctx.model, name, linear, q), **extra)
