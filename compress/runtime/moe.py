"""Mixture-of-experts experts as one Linear per projection per expert.

Recent transformers store the experts of a sparse MoE block fused, as 3D parameters
(`experts.gate_up_proj [E, 2F, D]`, `experts.down_proj [E, D, F]`) with a forward
`experts(hidden [T, D], top_k_index [T, k], top_k_weights [T, k]) -> [T, D]`. `ExpertMLPs` holds
the same weights as `experts.N.{gate,up,down}_proj` Linear modules (the per-expert names of the
original checkpoints, which the compressed-tensors MoE layout of vLLM reads) and computes the same
function, so every pass sees plain Linears: quantize/sparsify target them, GPTQ's input hooks on
expert N see exactly the tokens routed to N. The artifact stores the per-expert tensors and
records the unfused blocks in structure["experts"]; the loader unfuses a fresh model the same way
before reading them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from compress.errors import CompressError

Layout = Literal["gate_up", "gate_up_t"]   # [E, 2F, D] and [E, D, 2F] (Llama 4 style)


DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)). `names`: what the family's checkpoints call
    gate, up and down (Mixtral: w1, w3, w2), so the artifact's tensor names are theirs."""

    def __init__(self, hidden: int, inner: int, act_fn: nn.Module, names=DEFAULT_NAMES,
                 dtype=None, device=None):
        super().__init__()
        self.names = tuple(names)
        for name, (i, o) in zip(self.names, [(hidden, inner), (hidden, inner), (inner, hidden)]):
            setattr(self, name, nn.Linear(i, o, bias=False, dtype=dtype, device=device))
        self.act_fn = act_fn

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(gate, up, down), whatever their names."""
        return tuple(getattr(self, name) for name in self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        return down(self.act_fn(gate(x)) * up(x))


class ExpertMLPs(nn.ModuleList):
    """The experts of one MoE block, called like transformers' fused experts module."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden [T, D], top_k_index [T, k] (values >= E: masked out), top_k_weights [T, k]
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = expert(hidden[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def fused_layout(module: nn.Module, hidden: int) -> Layout | None:
    """The layout of a fused experts module (3D gate_up_proj and down_proj, nothing else),
    or None when `module` is not one."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or params["gate_up_proj"].dim() != 3:
        return None
    gate_up, down = params["gate_up_proj"].shape, params["down_proj"].shape
    if gate_up[2] == hidden and down[1] == hidden and gate_up[1] == 2 * down[2]:
        return "gate_up"
    if gate_up[1] == hidden and down[2] == hidden and gate_up[2] == 2 * down[1]:
        return "gate_up_t"
    return None


def checkpoint_names(model_type: str) -> tuple[str, str, str]:
    """What the family's checkpoints call each expert's gate, up and down projections, read
    from transformers' own checkpoint conversion table (the per-expert tensors it fuses on
    load); gate_proj, up_proj, down_proj when it has none."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        conversions = get_checkpoint_conversion_mapping(model_type) or []
    except ImportError:   # a transformers without the table
        return DEFAULT_NAMES
    found = {}
    for conversion in conversions:
        targets = getattr(conversion, "target_patterns", None) or []
        sources = getattr(conversion, "source_patterns", None) or []
        leaf = [p.split("*.", 1)[-1].removesuffix(".weight") for p in sources if "*." in p]
        if any(t.endswith("experts.gate_up_proj") for t in targets) and len(leaf) == 2:
            found["gate"], found["up"] = leaf
        if any(t.endswith("experts.down_proj") for t in targets) and len(leaf) == 1:
            found["down"] = leaf[0]
    if len(found) != 3:
        return DEFAULT_NAMES
    return found["gate"], found["up"], found["down"]


def unfused(module: nn.Module, layout: Layout, names=DEFAULT_NAMES) -> ExpertMLPs:
    """ExpertMLPs holding the weights of a fused experts module (gate rows first, then up)."""
    gate_up, down = module.gate_up_proj.data, module.down_proj.data
    if layout == "gate_up_t":
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    experts, inner2, hidden = gate_up.shape
    inner = inner2 // 2
    act = module.act_fn
    result = ExpertMLPs([ExpertMLP(hidden, inner, act, names, gate_up.dtype, gate_up.device)
                         for _ in range(experts)])
    if gate_up.device.type != "meta":
        for e, expert in enumerate(result):
            gate, up, down_proj = expert.projections()
            gate.weight.data.copy_(gate_up[e, :inner])
            up.weight.data.copy_(gate_up[e, inner:])
            down_proj.weight.data.copy_(down[e])
    return result


def same_function(fused: nn.Module, experts: ExpertMLPs, hidden: int, top_k: int = 2) -> bool:
    """Whether the unfused experts compute what the fused module does, on random tokens and
    routing (catches layouts this module does not know: interleaved gate/up, clamped
    activations, biases)."""
    gen = torch.Generator().manual_seed(0)
    weight = fused.gate_up_proj
    x = torch.randn(16, hidden, generator=gen).to(weight.device, weight.dtype)
    index = torch.stack([torch.randperm(len(experts), generator=gen)[:top_k]
                         for _ in range(16)]).to(weight.device)
    weights = torch.rand(16, top_k, generator=gen).to(weight.device, weight.dtype)
    with torch.no_grad():
        want, got = fused(x, index, weights), experts(x, index, weights)
    return bool(torch.allclose(want, got, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6))


def fused_experts(model: nn.Module) -> dict[str, Layout]:
    """Every fused experts module of the model, by name, with its layout."""
    hidden = model.config.get_text_config().hidden_size
    found = {}
    for name, module in model.named_modules():
        layout = fused_layout(module, hidden)
        if layout is not None:
            found[name] = layout
    return found


def unsplit_experts(model: nn.Module) -> dict[str, str]:
    """Modules holding 3D expert weights this module cannot split into Linears (a layout with
    biases or interleaved gate/up, such as gpt-oss's): {module name: class name}. Passes that
    target Linears leave them in 16 bits, and say so."""
    hidden = model.config.get_text_config().hidden_size
    return {name: type(module).__name__ for name, module in model.named_modules()
            if any(p.dim() == 3 for p in module.parameters(recurse=False))
            and fused_layout(module, hidden) is None}


def unfuse_experts(model: nn.Module, check: bool = True) -> dict[str, dict]:
    """Replace every fused experts module by ExpertMLPs (same weights, same function; checked
    on random input unless the weights are on the meta device). Returns what it unfused:
    {module name: {"layout": ..., "names": [gate, up, down]}} (structure["experts"])."""
    from compress.runtime.modules import get_module, set_module

    names = checkpoint_names(model.config.model_type)
    found = {}
    for name, layout in fused_experts(model).items():
        fused = get_module(model, name)
        experts = unfused(fused, layout, names)
        found[name] = {"layout": layout, "names": list(names)}
        if check and fused.gate_up_proj.device.type != "meta" and not same_function(
                fused, experts, fused.gate_up_proj.shape[2 if layout == "gate_up" else 1]):
            raise CompressError(f"{name}: the fused experts of {type(fused).__name__} do not "
                                "compute act(gate) * up -> down with gate rows first; "
                                "compress cannot split them into per-expert Linears")
        set_module(model, name, experts)
    return found


def load_experts(model: nn.Module, record: dict[str, dict]) -> None:
    """structure["experts"] loader: unfuse the same blocks of a freshly built model."""
    from compress.runtime.modules import get_module, set_module

    for name, entry in record.items():
        set_module(model, name, unfused(get_module(model, name), entry["layout"],
                                        entry["names"]))
