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
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.errors import UsageError
from compress.formats.artifact import STRUCTURE_LOADERS, structure
from compress.models import Arch, arch_for, decoder_layers
from compress.passes.base import Context, PassConfig, PassReport, register

# Passes that must run after pruning: they store per-module data (packed weights, masks) for
# the shapes they saw, and pruning after them would have to re-slice that.
AFTER = ("quantize", "sparsify")


class PruneHeadsConfig(PassConfig):
    """Remove attention heads. Give exactly one target: fraction, per_layer or uniform.

    fraction   share of all removable units (KV groups, or query heads) removed model-wide,
               lowest scores first
    per_layer  {layer index: count}; uniform: the same count in every (selected) layer.
               count = KV groups removed (unit kv_group) or query heads removed, a multiple of
               the layer's KV heads (unit query)
    """

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

    def order_error(self, index: int, passes: list[PassConfig]) -> str | None:
        before = [p.kind for p in passes[:index] if p.kind in AFTER]
        if before:
            return (f"prune_heads must come before {before[0]}: move it up so the smaller "
                    "model is what gets quantized or sparsified")
        return None


# ---------------------------------------------------------------------------------------------
# Geometry: where each head's rows and columns are

@dataclass(frozen=True)
class Heads:
    """Head counts of one attention block. Query head h reads KV head h // group."""

    query: int
    kv: int
    dim: int

    @property
    def group(self) -> int:
        return self.query // self.kv


def attention_module(layer: nn.Module, arch: Arch) -> nn.Module:
    """The module holding the head-count attributes (parent of q: self_attn, attention.self)."""
    return layer.get_submodule(arch.q.rpartition(".")[0])


def head_dim_of(attn: nn.Module) -> int:
    for name in ("head_dim", "head_size", "attention_head_size"):
        if isinstance(getattr(attn, name, None), int):
            return getattr(attn, name)
    raise UsageError(f"prune_heads: cannot find the head size of {type(attn).__name__}")


def out_features(module: nn.Module, conv1d: bool) -> int:
    """Output size of a Linear, QuantizedLinear (no .weight) or GPT-2 Conv1D."""
    return module.nf if conv1d else module.out_features


def heads_of(layer: nn.Module, arch: Arch) -> Heads:
    """Current head counts, read from the projection shapes (they are the truth after pruning)."""
    dim = head_dim_of(attention_module(layer, arch))
    q = out_features(layer.get_submodule(arch.q), arch.conv1d)
    if arch.fused_qkv:
        return Heads(q // (3 * dim), q // (3 * dim), dim)
    return Heads(q // dim, out_features(layer.get_submodule(arch.k), arch.conv1d) // dim, dim)


def head_index(heads: list[int], dim: int, stride: int = 1, offset: int = 0) -> torch.Tensor:
    """Row indices of `heads` in a projection laid out as [head][dim] (stride heads apart)."""
    return torch.tensor([offset + h * stride * dim + i for h in heads for i in range(dim)],
                        dtype=torch.long)


def qkv_rows(arch: Arch, shape: Heads, q_keep: list[int], kv_keep: list[int]
             ) -> dict[str, torch.Tensor]:
    """Output rows to keep in each input projection (q/k/v, or the fused one)."""
    d = shape.dim
    if not arch.fused_qkv:
        return {arch.q: head_index(q_keep, d), arch.k: head_index(kv_keep, d),
                arch.v: head_index(kv_keep, d)}
    if arch.qkv_per_head:  # NeoX: [head][q, k, v][dim]
        return {arch.q: head_index(q_keep, 3 * d)}
    width = shape.query * d  # GPT-2: [q heads][k heads][v heads], no GQA
    return {arch.q: torch.cat([head_index(q_keep, d, offset=part * width) for part in range(3)])}


def slice_projection(module: nn.Module, rows: torch.Tensor | None = None,
                     cols: torch.Tensor | None = None, conv1d: bool = False) -> nn.Module:
    """A new Linear (or GPT-2 Conv1D, weight [in, out]) keeping output `rows` and input `cols`
    of `module`. The bias follows the rows."""
    if type(module) is not nn.Linear and not conv1d:
        raise UsageError(f"prune_heads: cannot slice a {type(module).__name__}; run prune_heads "
                         "before passes that replace linear layers")
    weight = module.weight.data.T if conv1d else module.weight.data      # [out, in]
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = getattr(module, "bias", None)
    if bias is not None and rows is not None:
        bias = bias.data[rows]
    out_dim, in_dim = weight.shape
    if conv1d:
        new = type(module)(out_dim, in_dim)  # Conv1D(nf=out, nx=in)
        new.weight.data = weight.T.contiguous().clone()
    else:
        new = nn.Linear(in_dim, out_dim, bias=bias is not None, dtype=weight.dtype,
                        device=weight.device)
        new.weight.data = weight.contiguous().clone()
    if bias is not None:
        new.bias.data = bias.clone()
    return new.requires_grad_(False)


# Head-count attributes the transformers attention modules read (whichever a family has).
COUNT_ATTRS = {
    "num_heads": lambda s: s.query, "num_attention_heads": lambda s: s.query,
    "num_key_value_heads": lambda s: s.kv, "num_key_value_groups": lambda s: s.group,
    "all_head_size": lambda s: s.query * s.dim, "split_size": lambda s: s.query * s.dim,
}


def set_head_counts(attn: nn.Module, shape: Heads) -> None:
    for name, value in COUNT_ATTRS.items():
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value(shape))


def check_keep(shape: Heads, q_keep: list[int], kv_keep: list[int], where: str) -> None:
    """GQA validity: kept query heads read only kept KV heads, the same number per KV head."""
    if not q_keep or not kv_keep:
        raise UsageError(f"prune_heads: {where} would lose every attention head; keep at least "
                         "one KV group (lower its count)")
    per_group = {g: [h for h in q_keep if h // shape.group == g] for g in kv_keep}
    sizes = {len(v) for v in per_group.values()}
    if any(h // shape.group not in per_group for h in q_keep) or len(sizes) != 1 or 0 in sizes:
        raise UsageError(f"prune_heads: {where}: kept query heads {q_keep} do not form equal "
                         f"groups over kept KV heads {kv_keep}; remove whole KV groups or the "
                         "same number of query heads from every group")


def prune_layer(layer: nn.Module, arch: Arch, q_keep: list[int], kv_keep: list[int]) -> Heads:
    """Physically remove heads from one block (q_keep/kv_keep: current indices, sorted)."""
    shape = heads_of(layer, arch)
    check_keep(shape, q_keep, kv_keep, "layer")
    if arch.fused_qkv and len(kv_keep) != len(q_keep):
        raise UsageError("prune_heads: fused qkv projections have one KV head per query head")
    for name, rows in qkv_rows(arch, shape, q_keep, kv_keep).items():
        _replace(layer, name, slice_projection(layer.get_submodule(name), rows=rows,
                                               conv1d=arch.conv1d))
    _replace(layer, arch.o, slice_projection(layer.get_submodule(arch.o),
                                             cols=head_index(q_keep, shape.dim),
                                             conv1d=arch.conv1d))
    new = Heads(len(q_keep), len(kv_keep), shape.dim)
    set_head_counts(attention_module(layer, arch), new)
    return new


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


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
    stats = {"gram": 0, "n": 0}

    def gather(module, x, y):
        x = x.reshape(-1, x.shape[-1]).double()
        stats["gram"] = stats["gram"] + x.T @ x
        stats["n"] += x.shape[0]

    base = step.run({arch.o: gather}, keep_outputs=True)
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


def rebuild_heads(model: nn.Module, layout: dict) -> None:
    """STRUCTURE_LOADERS hook: resize a freshly built model's attention to the recorded counts
    (weights are loaded afterwards, so which rows survive the resize does not matter)."""
    arch = arch_for(model.config)
    layers = decoder_layers(model, arch)
    for index, entry in layout.items():
        layer = layers[int(index)]
        shape = heads_of(layer, arch)
        want = Heads(len(entry["query"]), len(entry["kv"]), shape.dim)
        if (shape.query, shape.kv) == (want.query, want.kv):
            continue  # the config already says so (uniform layout)
        kv_keep = list(range(want.kv))
        q_keep = [g * shape.group + j for g in kv_keep for j in range(want.group)]
        prune_layer(layer, arch, q_keep, kv_keep)


STRUCTURE_LOADERS["attention_heads"] = rebuild_heads


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
    if arch.alibi:
        raise UsageError(f"prune_heads: {arch.name} uses ALiBi, whose per-head slopes depend on "
                         "the head's index; pruning its heads is not supported")
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
