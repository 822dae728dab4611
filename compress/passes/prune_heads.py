"""prune_heads: score attention heads on calibration data, remove the weakest, shrink q/k/v/o.

Grouped-query attention stays valid: the pass removes whole KV groups (a KV head with the query
heads that read it, `unit: kv_group`) or query heads evenly within every group (`unit: query`).
The model gets physically smaller (fewer rows in q/k/v, fewer columns in o), so parameters,
attention FLOPs and KV-cache bytes all drop. Per-layer head counts are recorded in
structure(model)["attention_heads"] and rebuilt by compress.load; a uniform layout changes only
config.num_attention_heads / num_key_value_heads, so plain transformers loads it too.

Scorers (each layer is scored on the inputs the shared Calibrator gives it):
  output_norm  mean squared norm of a unit's contribution through the output projection,
               ||x_C W_C^T||^2, from the Gram matrix of o's input (one forward per layer)
  ablation     mean squared change of the whole layer's output when the unit's contribution
               is removed (attention, residual, norms and MLP included; one forward per unit)
  random       seeded random scores: the control
Both data scorers are divided by the mean squared norm of the layer's output, so a global
`fraction` compares layers on one scale (the residual stream grows with depth).
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.errors import UsageError
from compress.models import Arch, decoder_layers
from compress.passes.base import Context, PassConfig, PassReport, register
from compress.runtime.artifact import structure
from compress.runtime.heads import (  # noqa: F401  (re-exported for the pass's callers)
    Heads,
    attention_module,
    check_keep,
    head_dim_of,
    head_index,
    heads_of,
    out_features,
    prune_layer,
    qkv_rows,
    rebuild_heads,
    set_head_counts,
    slice_projection,
)


class PruneHeadsConfig(PassConfig):
    """Remove attention heads. Give exactly one target: fraction, per_layer or uniform.

    fraction   share of all removable units (KV groups, or query heads) removed model-wide,
               lowest scores first
    per_layer  {layer index: count}; uniform: the same count in every (selected) layer.
               count = KV groups removed (unit kv_group) or query heads removed, a multiple of
               the layer's KV heads (unit query)
    """

    needs_family: ClassVar[bool] = True   # the attention/MLP layout of the Arch table
    # its scores also sum the layer's outputs over the samples, outside LayerStep.gather
    data_parallel: ClassVar[bool] = False

    @classmethod
    def family_problem(cls, arch: Arch) -> str | None:
        if arch.alibi:
            return (f"prune_heads: {arch.name} uses ALiBi, whose per-head slopes depend on "
                    "the head's index; pruning its heads is not supported")
        return None

    kind: Literal["prune_heads"] = Field("prune_heads", alias="pass")
    scorer: Literal["output_norm", "ablation", "random"] = "output_norm"
    unit: Literal["kv_group", "query"] = "kv_group"
    fraction: float | None = None
    per_layer: dict[int, int] | None = None
    uniform: int | None = Field(None, ge=1)
    max_per_layer: int | None = Field(None, ge=1)   # cap on units removed in one layer (fraction)
    layers: list[int] | None = None                 # only these layers may lose heads
    seed: int = 0                                   # for scorer: random
    context_length: int = Field(2048, ge=1)         # for the attention-FLOPs figure in the report

    @model_validator(mode="after")
    def _check_target(self) -> PruneHeadsConfig:
        given = [n for n in ("fraction", "per_layer", "uniform") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one target: fraction, per_layer or uniform "
                             f"(got {', '.join(given) or 'none'})")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ValueError(f"fraction must lie strictly between 0 and 1, got {self.fraction}")
        if self.per_layer is not None and any(c < 0 for c in self.per_layer.values()):
            raise ValueError("per_layer counts must be >= 0")
        if self.max_per_layer is not None and self.fraction is None:
            raise ValueError("max_per_layer applies to a fraction target only")
        return self

    # These store per-module data (packed weights, masks) for the shapes they saw; pruning
    # after them would have to re-slice it.
    comes_before: ClassVar[tuple[str, ...]] = ("quantize", "sparsify")
    order_rule: ClassVar[str] = ("must come before {later}: move it up so the smaller model is "
                                 "what gets quantized or sparsified")


# ---------------------------------------------------------------------------------------------
# Geometry: where each head's rows and columns are


# ---------------------------------------------------------------------------------------------
# Units and scores

def units_of(shape: Heads, unit: str) -> list[tuple[list[int], list[int]]]:
    """Removable units as (query heads, kv heads): one per KV group, or one per query head."""
    if unit == "kv_group":
        return [(list(range(g * shape.group, (g + 1) * shape.group)), [g])
                for g in range(shape.kv)]
    return [([h], []) for h in range(shape.query)]


def contribution(x: torch.Tensor, o_weight: torch.Tensor, heads: list[int], dim: int
                 ) -> torch.Tensor:
    """What `heads` add to the output projection: x_C W_C^T. x: [..., Hq*d], o_weight [D, Hq*d]."""
    cols = head_index(heads, dim)
    return x[..., cols] @ o_weight[:, cols].T


def gram_scores(gram: torch.Tensor, o_weight: torch.Tensor, units: list[list[int]], dim: int
                ) -> torch.Tensor:
    """sum_tokens ||x_C W_C^T||^2 = tr(W_C G_CC W_C^T) per unit, from G = sum x^T x [Hq*d]^2."""
    scores = []
    for heads in units:
        cols = head_index(heads, dim)
        w = o_weight[:, cols].double()
        scores.append(((w @ gram[cols][:, cols].double()) * w).sum())
    return torch.stack(scores).float()


def o_weight_of(layer: nn.Module, arch: Arch) -> torch.Tensor:
    w = layer.get_submodule(arch.o).weight.data
    return (w.T if arch.conv1d else w).float()  # [D, Hq*d]


def score_layer(step, arch: Arch, scorer: str, unit: str) -> torch.Tensor:
    """Scores of every unit of step.layer, relative to the layer's mean squared output."""
    shape = heads_of(step.layer, arch)
    units = [q for q, _ in units_of(shape, unit)]
    w_o = o_weight_of(step.layer, arch)
    gathered, base = step.gather([arch.o], gram=True, dtype=torch.float64, keep_outputs=True)
    stats = {"gram": gathered[arch.o].gram, "n": gathered[arch.o].count}
    scale = sum(b.double().pow(2).sum() for b in base) / sum(b.numel() for b in base)
    if scorer == "output_norm":
        return gram_scores(stats["gram"], w_o, units, shape.dim) / stats["n"] / w_o.shape[0] / scale
    scores = []
    for heads in units:
        def ablate(module, x, y, heads=heads):
            return y - contribution(x, w_o.to(x.dtype), heads, shape.dim)

        out = step.run({arch.o: ablate}, keep_outputs=True)
        err = sum((o - b).double().pow(2).sum() for o, b in zip(out, base))
        scores.append(err / sum(b.numel() for b in base) / scale)
    return torch.stack(scores).float()


def random_scores(count: int, seed: int, layer: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.rand(count, generator=gen)


# ---------------------------------------------------------------------------------------------
# Choosing what to remove

def removal_steps(shape: Heads, unit: str, scores: torch.Tensor) -> list[tuple[float, list[int]]]:
    """Ordered removals for one layer, cheapest first: (cost, query heads removed).

    kv_group: one KV group per step. query: each step removes the weakest remaining query
    head of every group (so groups stay equal); its cost is the sum of their scores. The last
    group / last head per group is never offered, so a layer keeps at least one head."""
    if unit == "kv_group":
        order = scores.argsort().tolist()[:shape.kv - 1]
        return [(float(scores[g]), units_of(shape, unit)[g][0]) for g in order]
    per_group = [sorted(range(g * shape.group, (g + 1) * shape.group),
                        key=lambda h: float(scores[h]))
                 for g in range(shape.kv)]
    return [(float(sum(scores[grp[r]] for grp in per_group)), [grp[r] for grp in per_group])
            for r in range(shape.group - 1)]


def select_global(steps: dict[int, list[tuple[float, list[int]]]], budget: int,
                  cap: int | None = None) -> dict[int, int]:
    """How many steps each layer takes: the `budget` cheapest steps model-wide, each layer's
    taken in its own order, at most `cap` per layer. Returns {layer: count}."""
    offered = sorted((cost, rank, layer) for layer, items in steps.items()
                     for rank, (cost, _) in enumerate(items[:cap]))
    # Costs within a layer ascend, so the cheapest `budget` always form a prefix per layer.
    taken: dict[int, int] = {}
    for _, _, layer in offered[:budget]:
        taken[layer] = taken.get(layer, 0) + 1
    return taken


def keep_after(shape: Heads, removed_q: list[int]) -> tuple[list[int], list[int]]:
    """Kept query heads and KV heads once `removed_q` are gone (a KV head goes with its group)."""
    q_keep = [h for h in range(shape.query) if h not in set(removed_q)]
    kv_keep = sorted({h // shape.group for h in q_keep})
    return q_keep, kv_keep


def count_to_steps(count: int, shape: Heads, unit: str, layer: int) -> int:
    """A per-layer count (KV groups, or query heads) as a number of removal steps; refuses
    counts that empty the layer or break the equal-groups rule."""
    if unit == "kv_group":
        if count >= shape.kv:
            raise UsageError(f"prune_heads: layer {layer} has {shape.kv} KV groups; removing "
                             f"{count} would remove every head (at most {shape.kv - 1})")
        return count
    if count % shape.kv:
        raise UsageError(f"prune_heads: layer {layer}: {count} query heads cannot be removed "
                         f"evenly from {shape.kv} KV groups; use a multiple of {shape.kv}")
    if count >= shape.query:
        raise UsageError(f"prune_heads: layer {layer} has {shape.query} query heads; removing "
                         f"{count} would remove every head (at most {shape.query - shape.kv})")
    return count // shape.kv


# ---------------------------------------------------------------------------------------------
# Structure: record and rebuild per-layer head counts

def record_layout(model: nn.Module, index: int, original: Heads, q_keep: list[int],
                  kv_keep: list[int]) -> None:
    """structure["attention_heads"][layer] = kept heads as ORIGINAL indices (composes over runs)."""
    layout = structure(model).setdefault("attention_heads", {})
    previous = layout.get(str(index))
    if previous:  # indices given relative to an already pruned layer
        q_keep = [previous["query"][h] for h in q_keep]
        kv_keep = [previous["kv"][h] for h in kv_keep]
    layout[str(index)] = {"query": q_keep, "kv": kv_keep,
                          "original": previous["original"] if previous else
                          {"query": original.query, "kv": original.kv}}


def set_uniform_config(model: nn.Module, arch: Arch, shape: Heads) -> bool:
    """Write uniform head counts into the config when plain transformers then builds exactly
    our shapes (families that read config.head_dim); returns whether it did."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.num_attention_heads, config.num_key_value_heads = shape.query, shape.kv
    if getattr(config, "head_dim", None) is None:
        return False
    try:  # the config must also pass its own validation when read back
        config = type(config).from_dict(config.to_dict())
    except ValueError:  # e.g. hidden_size not a multiple of the new head count
        return False
    auto = AutoModel if arch.encoder else AutoModelForCausalLM
    with torch.device("meta"):
        fresh = auto.from_config(config)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    if any(ours.get(k) != v.shape for k, v in fresh.state_dict().items()):
        return False
    model.config.num_attention_heads, model.config.num_key_value_heads = shape.query, shape.kv
    return True


# ---------------------------------------------------------------------------------------------
# Cost figures

def projection_params(layer: nn.Module, arch: Arch) -> int:
    """Parameters (weights and biases) of a block's q/k/v/o projections."""
    names = [arch.q, arch.o] + ([] if arch.fused_qkv else [arch.k, arch.v])
    return sum(p.numel() for name in names for p in layer.get_submodule(name).parameters())


def attention_flops(shape: Heads, hidden: int, context: int) -> int:
    """Multiply-adds x2 per token: projections, plus QK^T and AV over `context` keys."""
    projections = 2 * hidden * (shape.query + 2 * shape.kv) * shape.dim \
        + 2 * shape.query * shape.dim * hidden
    return projections + 4 * shape.query * shape.dim * context


def kv_bytes(shape: Heads, element_bytes: int) -> int:
    return 2 * shape.kv * shape.dim * element_bytes


# ---------------------------------------------------------------------------------------------
# The pass

@register(PruneHeadsConfig)
def prune_heads(ctx: Context, cfg: PruneHeadsConfig) -> PassReport:
    arch = ctx.arch
    problem = cfg.family_problem(arch)
    if problem:
        raise UsageError(problem)
    layers = decoder_layers(ctx.model, arch)
    before = {i: heads_of(layer, arch) for i, layer in enumerate(layers)}
    params = sum(projection_params(layer, arch) for layer in layers)
    if cfg.unit == "query" and all(s.group == 1 for s in before.values()):
        raise UsageError("prune_heads: unit query removes query heads within KV groups, but "
                         "this model has one query head per KV head: use unit: kv_group")
    eligible = _eligible(cfg, len(layers))
    fixed = _fixed_steps(cfg, before, eligible)       # None for a global fraction
    scores: dict[int, torch.Tensor] = {}
    keep: dict[int, tuple[list[int], list[int]]] = {}

    def plan(i: int, count: int) -> None:
        removed = [h for _, heads in removal_steps(before[i], cfg.unit, scores[i])[:count]
                   for h in heads]
        keep[i] = keep_after(before[i], removed)

    if cfg.scorer == "random":
        for i in eligible:
            scores[i] = random_scores(len(units_of(before[i], cfg.unit)), cfg.seed, i)
    else:
        for step in ctx.calibrator():
            if step.index not in eligible:
                continue
            scores[step.index] = score_layer(step, arch, cfg.scorer, cfg.unit)
            if fixed is not None and fixed.get(step.index):
                # Prune now: the Calibrator re-runs the smaller layer, so later layers are
                # scored on the inputs they will really see.
                plan(step.index, fixed[step.index])
                prune_layer(step.layer, arch, *keep[step.index])
    counts = fixed if fixed is not None else _global_counts(cfg, before, scores)
    for i, count in counts.items():
        if count and i not in keep:
            plan(i, count)
            prune_layer(layers[i], arch, *keep[i])
    for i, (q_keep, kv_keep) in keep.items():
        record_layout(ctx.model, i, before[i], q_keep, kv_keep)
    return _report(ctx, cfg, arch, before, keep, scores, params)


def _eligible(cfg: PruneHeadsConfig, n_layers: int) -> list[int]:
    chosen = list(range(n_layers)) if cfg.layers is None else sorted(set(cfg.layers))
    wrong = [i for i in chosen + list(cfg.per_layer or {}) if not 0 <= i < n_layers]
    if wrong:
        raise UsageError(f"prune_heads: layer {wrong[0]} does not exist (the model has "
                         f"{n_layers} layers, 0..{n_layers - 1})")
    if cfg.per_layer is not None:
        chosen = [i for i in chosen if cfg.per_layer.get(i)]
    return chosen


def _fixed_steps(cfg: PruneHeadsConfig, before: dict[int, Heads], eligible: list[int]
                 ) -> dict[int, int] | None:
    """Removal steps per layer for per_layer / uniform targets, validated before any change."""
    if cfg.fraction is not None:
        return None
    wanted = cfg.per_layer if cfg.per_layer is not None else {i: cfg.uniform for i in eligible}
    return {i: count_to_steps(wanted[i], before[i], cfg.unit, i) for i in eligible}


def _global_counts(cfg: PruneHeadsConfig, before: dict[int, Heads],
                   scores: dict[int, torch.Tensor]) -> dict[int, int]:
    steps = {i: removal_steps(before[i], cfg.unit, s) for i, s in scores.items()}
    total = sum(len(units_of(before[i], cfg.unit)) for i in scores)
    per_step = {i: 1 if cfg.unit == "kv_group" else before[i].kv for i in scores}
    # budget in removal steps: fraction of the units (KV groups or query heads) of the
    # eligible layers; a query step removes one head per group.
    budget = round(cfg.fraction * total / max(per_step.values()))
    if budget < 1:
        raise UsageError(f"prune_heads: fraction {cfg.fraction} of {total} units removes "
                         "nothing; raise it")
    available = sum(len(s[:cfg.max_per_layer]) for s in steps.values())
    if budget > available:
        raise UsageError(f"prune_heads: fraction {cfg.fraction} needs {budget} removals but "
                         f"only {available} leave every layer a head; lower it")
    return select_global(steps, budget, cfg.max_per_layer)


def _report(ctx: Context, cfg: PruneHeadsConfig, arch: Arch, before: dict[int, Heads],
            keep: dict[int, tuple[list[int], list[int]]],
            scores: dict[int, torch.Tensor], params_before: int) -> PassReport:
    layers = decoder_layers(ctx.model, arch)
    after = {i: heads_of(layer, arch) for i, layer in enumerate(layers)}
    hidden = o_weight_of(layers[0], arch).shape[0]
    element = next(ctx.model.parameters()).element_size()
    shapes = set(after.values())
    uniform_config = bool(keep) and len(shapes) == 1 and \
        set_uniform_config(ctx.model, arch, shapes.pop())

    def total(fn, which):
        return sum(fn(s) for s in which.values())

    def saved(fn):
        return total(fn, before) - total(fn, after)

    summary = {
        "scorer": cfg.scorer, "unit": cfg.unit,
        "query_heads": {"before": total(lambda s: s.query, before),
                        "after": total(lambda s: s.query, after)},
        "kv_heads": {"before": total(lambda s: s.kv, before),
                     "after": total(lambda s: s.kv, after)},
        "layers_changed": sorted(keep),
        "parameters_saved": params_before - sum(projection_params(x, arch) for x in layers),
        "context_length": cfg.context_length,
        "attention_flops_per_token_saved":
            saved(lambda s: attention_flops(s, hidden, cfg.context_length)),
        "kv_cache_bytes_per_token_saved":
            0 if arch.encoder else saved(lambda s: kv_bytes(s, element)),
        "uniform_config": uniform_config,
    }
    modules = {}
    for i in sorted(set(keep) | set(scores)):
        name = f"{arch.layers}.{i}"
        modules[name] = {"query_removed": before[i].query - after[i].query,
                         "kv_removed": before[i].kv - after[i].kv,
                         "query_kept": keep[i][0] if i in keep else list(range(before[i].query)),
                         "scores": [round(float(s), 6) for s in scores.get(i, [])]}
    return PassReport("prune_heads", summary=summary, modules=modules)
