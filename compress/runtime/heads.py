"""Attention with fewer heads: slicing projections to kept heads (GQA-aware) and resizing a
freshly built model to an artifact's recorded head counts. The pass that scores and chooses
heads is compress/passes/prune_heads.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import UsageError
from compress.models import Arch, arch_for, decoder_layers


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


def rebuild_heads(model: nn.Module, layout: dict) -> None:
    """The "attention_heads" structure loader: resize a freshly built model's attention to the recorded counts
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


