"""The calibrated side of the quantize pass: AWQ scaling and GPTQ, layer by layer.

For each decoder layer (compress.calib.Calibrator): gather the input statistics of every group
of projections that read one input (one layer run), optionally search and fold AWQ scales,
quantize every targeted linear of the layer (GPTQ or round-to-nearest per module), swap in
QuantizedLinear; the calibrator then re-runs the quantized layer, so layer i+1 is calibrated on
the outputs of the already-quantized layers (sequential GPTQ).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from compress import distributed
from compress.calib import check_finite
from compress.errors import CompressError
from compress.formats import QuantizedWeight, codec
from compress.models import layers_path
from compress.passes import awq
from compress.passes.base import Context, PassReport
from compress.passes.gptq import gptq_quantize
from compress.passes.quantize import (
    ModulePlan,
    QuantizeConfig,
    _record,
    quantize_rtn,
    ready,
    replace_with_quantized,
)


def quantize_calibrated(ctx: Context, cfg: QuantizeConfig, plans: dict[str, ModulePlan],
                        report: PassReport) -> None:
    fallbacks: list[str] = []
    few_tokens: dict[str, int] = {}     # linear name -> calibration tokens it saw (too few)
    awq_notes: dict[str, dict] = {}     # linear name -> its mapping's alpha and errors
    seconds = dict.fromkeys(("statistics", "awq", "solve"), 0.0)  # the rest: layer runs, I/O
    peaks: dict[str, float] = {}        # stage -> peak GPU GiB allocated by its end (CUDA only)
    for step in ctx.calibrator():
        prefix = step.name + "."
        local = {name[len(prefix):]: ready(ctx.model, name, plan)
                 for name, plan in plans.items() if name.startswith(prefix)}
        if not local:
            continue
        groups, found = input_groups(ctx, step, list(local))
        with stage(seconds, "statistics", step.layer, peaks):
            stats, _ = step.gather([g[0] for g in groups], gram=True, mean_abs=cfg.awq)
        for g in [g for g in groups if stats[g[0]].count < cfg.min_tokens]:
            # an expert the router sent (almost) no calibration token: no usable Hessian
            groups.remove(g)
            for n in [n for n in g if n in local]:
                few_tokens[prefix + n] = stats[g[0]].count
                quantize_rtn(ctx, prefix + n, replace(local[n], method="rtn"), report,
                             note=f"{stats[g[0]].count} calibration tokens (< min_tokens "
                                  f"{cfg.min_tokens}): round-to-nearest")
        hessians = {g: stats[g[0]].take_hessian() for g in groups}
        for g in hessians:
            check_finite(f"{prefix}{g[0]}", hessians[g], "Hessian of the input")
        if cfg.awq:
            with stage(seconds, "awq", step.layer, peaks):
                awq_notes.update(_apply_awq(ctx, cfg, step, local, stats, hessians, found))
        with stage(seconds, "solve", step.layer, peaks):
            fallbacks += _solve_layer(ctx, cfg, step, prefix, hessians, local, report)
        # Nothing of this layer's statistics may outlive it: names still bound to its
        # Hessians (a loop variable H, the last solve's closure over H, this dict) kept 0.8-1
        # GiB of an 8B layer's float32 matrices alive through the next layer's statistics and
        # solves (evaluate/calib_memory_trace.py on the H200, 2026-12-03).
        del hessians, stats
        grouped = {n for g in groups for n in g} | {n[len(prefix):] for n in few_tokens}
        for n in [n for n in local if n not in grouped]:  # not in any Arch input group
            quantize_rtn(ctx, prefix + n, replace(local[n], method="rtn"), report,
                         note="no input group in the Arch table: round-to-nearest")
    _quantize_rest(ctx, plans, report)
    report.summary.update(fallback_count=len(fallbacks), fallbacks=fallbacks,
                          few_tokens_rtn=few_tokens,
                          seconds={k: round(v, 2) for k, v in seconds.items()})
    if peaks:
        report.summary["peak_gpu_gib_after"] = peaks
    if cfg.awq:
        for name, note in awq_notes.items():
            report.modules[name].update(note)
        mappings = {n["awq_prev"]: n for n in awq_notes.values()}
        report.summary["awq"] = {
            "mappings": len(mappings),
            "not_foldable": awq.mappings(ctx.arch, ctx.model.config)[1],
            "mean_alpha": sum(n["awq_alpha"] for n in mappings.values()) / max(len(mappings), 1),
            # summed over mappings: output error of plain quantization vs with the scales
            "output_error_plain": sum(n["awq_error_plain"] for n in mappings.values()),
            "output_error_scaled": sum(n["awq_error_scaled"] for n in mappings.values())}


@contextmanager
def stage(seconds: dict[str, float], name: str, layer: torch.nn.Module,
          peaks: dict[str, float] | None = None):
    """Add the wall time of the block to seconds[name]; on a GPU the queued work is waited
    for at both ends (a few syncs per layer), so each stage is charged its own kernels.
    peaks[name]: the process's peak GPU memory (GiB) at the end of the stage, the highest over
    layers; the stage after which it first reaches the run's peak is the one that set it."""
    param = next(layer.parameters(), None)
    on_gpu = param is not None and param.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda *_: None)
    device = param.device if on_gpu else None
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        seconds[name] += time.perf_counter() - start
        if on_gpu and peaks is not None:
            peaks[name] = max(peaks.get(name, 0.0),
                              round(torch.cuda.max_memory_allocated(device) / 2**30, 3))


def _quantize_rest(ctx: Context, plans: dict[str, ModulePlan], report: PassReport) -> None:
    """Targeted linears outside the decoder layers (an lm_head that is not ignored) have no
    calibrated statistics: round-to-nearest, noted. (Layer projections outside the Arch's
    groups are quantized with their layer.)"""
    inside = layers_path(ctx.model, ctx.arch) + "."
    for name, plan in plans.items():
        if not name.startswith(inside):
            quantize_rtn(ctx, name, replace(ready(ctx.model, name, plan), method="rtn"), report,
                         note="not a decoder-layer projection: round-to-nearest")


def input_groups(ctx: Context, step, names: list[str]):
    """The input groups of a layer's targeted linears, and the AWQ mappings: from the Arch
    table for a known family; for any other, found by running the layer (LayerStep.input_groups)
    with one mapping per group whose input a norm produces that folds 1/s exactly."""
    if ctx.arch.known:
        groups = [g for g in ctx.arch.linear_groups() if any(n in names for n in g)]
        return groups, awq.mappings(ctx.arch, ctx.model.config)[0]
    groups, producers = step.input_groups(names)
    found = [awq.Mapping(prev, g, g) for g, prev in producers.items()
             if awq.folds_exactly(step.layer.get_submodule(prev),
                                  step.layer.get_submodule(g[0]).in_features)]
    return groups, found


def _apply_awq(ctx, cfg, step, local, stats, hessians, found) -> dict[str, dict]:
    """Search and fold the scales of every mapping whose linears are all targeted.
    Updates `hessians` in place: the scaled input has H' = H / (s s^T). Returns notes per linear."""
    notes = {}
    for mapping in found:
        if not all(n in local for n in mapping.linears) or mapping.group not in hessians:
            continue
        mean_abs = stats[mapping.group[0]].mean_abs
        G = hessians[mapping.group] / 2
        expand = (lambda s: s)
        if mapping.heads is not None:
            repeat, head_dim = mapping.heads
            v_out = step.layer.get_submodule(mapping.prev).weight.shape[0]
            if mean_abs.numel() != v_out * repeat:
                continue   # head shapes do not allow folding into v
            mean_abs = awq.gqa_reduce(mean_abs, repeat, head_dim)
            expand = awq.gqa_expand(repeat, head_dim)
        modules = []
        for name in mapping.linears:
            fmt = local[name].fmt
            modules.append((step.layer.get_submodule(name).weight.data.float(),
                            lambda w, fmt=fmt: codec(fmt).quantize(w, fmt).dequantize()))
        s, alpha, before, after = awq.search_scale(mean_abs, G, modules, cfg.awq_grid, expand)
        check_finite(f"{step.name}.{mapping.prev}", s, "AWQ scale")
        si = expand(s)
        awq.divide_output(step.layer.get_submodule(mapping.prev), s)
        for name in mapping.linears:
            awq.scale_input_columns(step.layer.get_submodule(name), si)
        hessians[mapping.group] = hessians[mapping.group] / (si[:, None] * si[None, :])
        for name in mapping.linears:
            notes[f"{step.name}.{name}"] = {
                "awq_prev": f"{step.name}.{mapping.prev}", "awq_alpha": alpha,
                "awq_error_plain": before, "awq_error_scaled": after}
    return notes


@dataclass
class Solve:
    """One quantization of a layer: `members` stacked into one matrix, computed by run()."""

    members: list[str]
    run: Callable[[], tuple[QuantizedWeight, dict[str, Any]]]
    cost: float          # relative time, to spread solves over ranks: GPTQ's sequential columns


def _solve_layer(ctx, cfg, step, prefix, hessians, local, report) -> list[str]:
    """Quantize the layer's targeted linears from their groups' Hessians; returns the names
    that fell back to round-to-nearest."""
    fallbacks = []
    for solve, (qw, info) in _solved(ctx, cfg, step, prefix, hessians, local):
        _store(step, prefix, solve, qw, info, local, report)
        if "fallback" in info:
            fallbacks.extend(prefix + n for n in solve.members)
        del solve, qw, info          # nothing of a solve outlives it (its closure holds H)
    return fallbacks


def _solved(ctx, cfg, step, prefix, hessians, local):
    """(solve, result) pairs of the layer. Several ranks: each solve runs on one of them and
    every rank gets every result. One rank: group by group, each result as it comes, each
    Hessian dropped (popped from `hessians`) once its group is solved, so that on a GPU the
    Hessians of q/k/v, o and gate/up (0.19 GiB of an 8B layer) and the codes of earlier
    solves are not alive while down_proj's 0.77 GiB H is inverted."""
    if distributed.active():
        solves = [solve for group, H in hessians.items()
                  for solve in _group_solves(ctx, cfg, step, prefix, group, H, local)]
        yield from zip(solves, distributed.spread([s.run for s in solves],
                                                  [s.cost for s in solves]))
        return
    while hessians:
        group = next(iter(hessians))
        # the loop variable lets go of the last solve (and its H) before the next group runs
        for solve in _group_solves(ctx, cfg, step, prefix, group, hessians.pop(group), local):
            yield solve, solve.run()


def _group_solves(ctx, cfg, step, prefix, group, H, local) -> list[Solve]:
    """The solves that quantize the targeted linears of one input group. GPTQ modules with the
    same format and no sparsity mask are stacked into one matrix (their rows are independent
    given H). An NVFP4 group can be stacked too: its members share one global scale anyway
    (_fused_global_scale), so the stacked solve gives the same codes in fewer, wider column
    steps (q/k/v: 576 steps instead of 3 x 576 on SmolLM2)."""
    names = [n for n in group if n in local]
    batches: dict[tuple, list[str]] = {}
    for n in names:
        plan = local[n]
        stackable = plan.method == "gptq" and plan.mask is None
        key = ("stack", plan.fmt) if stackable else ("one", n)
        batches.setdefault(key, []).append(n)
    # NVFP4 global scales of the fused group, from its weights before any member is replaced
    fused_gs = {n: _fused_global_scale(step, group, local, local[n]) for n in names}

    # H is this group's alone (taken from its statistics, or AWQ's rescaled copy): a group
    # solved once lets GPTQ overwrite it instead of copying it (GPU memory, issue 15)
    consume = len(batches) == 1

    def run(members: list[str]) -> tuple[QuantizedWeight, dict[str, Any]]:
        plan = local[members[0]]
        weights = [step.layer.get_submodule(n).weight.data for n in members]
        W = weights[0] if len(weights) == 1 else torch.cat(weights)   # no copy of one
        if plan.method == "gptq":
            return _gptq_or_fallback(ctx, cfg, prefix, members, W, H, plan, fused_gs[members[0]],
                                     consume_h=consume)
        return codec(plan.fmt).quantize(W, plan.fmt), {}

    return [Solve(members, lambda members=members: run(members),
                  H.shape[0] if local[members[0]].method == "gptq" else 0)
            for members in batches.values()]


def _store(step, prefix, solve: Solve, qw: QuantizedWeight, info: dict, local, report) -> None:
    """Swap the solve's linears for their rows of qw."""
    start = 0
    for n in solve.members:
        linear = step.layer.get_submodule(n)
        rows = slice(start, start + linear.weight.shape[0])
        start = rows.stop
        q = QuantizedWeight(qw.fmt, qw.codes[rows], qw.scale[rows],
                            None if qw.zero is None else qw.zero[rows], qw.global_scale)
        if q.global_scale is not None:
            check_finite(prefix + n, q.global_scale, "global scale")
        stats = replace_with_quantized(step.layer, n, linear, q)
        _record(report, prefix + n, local[n], stats, **info)


def _fused_global_scale(step, group, local, plan):
    """NVFP4: one global scale for every targeted NVFP4 member of a group that serving
    runtimes fuse into one matrix (q/k/v, gate/up): vLLM keeps one per fused matrix, so
    separate scales would not survive loading. None for other formats."""
    if not plan.fmt.row.tensor_scale:
        return None
    members = [n for n in group if n in local and local[n].fmt == plan.fmt]
    W = torch.cat([step.layer.get_submodule(n).weight.data for n in members])
    return codec(plan.fmt).tensor_scale(W, plan.fmt)


def _gptq_or_fallback(ctx, cfg, prefix, members, W, H, plan, global_scale=None,
                      consume_h: bool = False):
    """GPTQ, or round-to-nearest when it fails (info then says so under "fallback")."""
    label = ", ".join(prefix + n for n in members)
    mask = plan.mask
    try:
        qw, info = gptq_quantize(W, H, plan.fmt, cfg.block_size, cfg.damp, cfg.act_order,
                                 mask, name=label, static_groups=cfg.static_groups,
                                 scale_search=cfg.scale_search, global_scale=global_scale,
                                 consume_h=consume_h)
        return qw, {"damp": info.damp, "act_order": info.act_order}
    except CompressError as exc:
        if ctx.strict:
            raise CompressError(f"GPTQ failed for {label} ({exc}); --strict forbids the "
                                "round-to-nearest fallback") from None
        if global_scale is not None:
            return codec(plan.fmt).quantize(W, plan.fmt, global_scale), {"fallback": f"rtn: {exc}"}
        return codec(plan.fmt).quantize(W, plan.fmt), {"fallback": f"rtn: {exc}"}
