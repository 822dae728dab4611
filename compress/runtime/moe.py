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

# [E, 2F, D]; [E, D, 2F] (Llama 4 style); gpt-oss: [E, D, 2F] with gate and up columns
# interleaved, biases on both projections and a clamped SwiGLU (ClampedSwiGLU)
Layout = Literal["gate_up", "gate_up_t", "gpt_oss"]


DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), or down(glu(gate(x), up(x))) for a gated unit
    that is not act(gate) * up (gpt-oss). `names`: what the family's checkpoints call gate, up
    and down (Mixtral: w1, w3, w2), so the artifact's tensor names are theirs."""

    def __init__(self, hidden: int, inner: int, act_fn: nn.Module, names=DEFAULT_NAMES,
                 dtype=None, device=None, bias: bool = False, glu: nn.Module | None = None):
        super().__init__()
        self.names = tuple(names)
        for name, (i, o) in zip(self.names, [(hidden, inner), (hidden, inner), (inner, hidden)]):
            setattr(self, name, nn.Linear(i, o, bias=bias, dtype=dtype, device=device))
        self.act_fn = act_fn
        self.glu = glu

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(gate, up, down), whatever their names."""
        return tuple(getattr(self, name) for name in self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        if self.glu is not None:
            return down(self.glu(gate(x), up(x)))
        return down(self.act_fn(gate(x)) * up(x))


class ClampedSwiGLU(nn.Module):
    """gpt-oss's gated unit: (clamp(up, +-limit) + 1) * g * sigmoid(alpha * g), g = gate
    clamped from above at limit (transformers' GptOssExperts._apply_gate)."""

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class ExpertMLPs(nn.ModuleList):
    """The experts of one MoE block, called like transformers' fused experts module.

    When every expert's projections are compressed (QuantizedLinear in INT4/INT8/NVFP4/MXFP4)
    and the kernels can run, decode-sized calls take the grouped path (StackedExperts, below:
    two launches of compress/kernels/moe.py, no host sync, CUDA-graph capturable); the rest
    take the per-expert loop. The grouped path does not call the projections, so their module
    hooks do not run there (passes hook nn.Linear experts, which never take it)."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden [T, D], top_k_index [T, k] (values >= E: masked out), top_k_weights [T, k]
        from compress.runtime.modules import _record, kernel_unavailable

        # Prefill-sized calls keep the loop: each row of the grouped launch decodes its expert's
        # weights again (one M = 1 GEMV per routed row), so its work grows with the rows, while
        # the loop decodes each routed expert once for all its tokens (tensor-core tiles,
        # dequantize + cuBLAS at large M) and its E host syncs matter little next to that.
        if 0 < top_k_index.numel() <= GROUPED_MAX_ROWS and kernel_unavailable(hidden) is None:
            stacked = self.stacked()
            if stacked.reason is None:
                _record(self, f"triton/moe-{stacked.family}/grouped")
                return stacked(hidden, top_k_index, top_k_weights)
        _record(self, "per-expert loop")
        return self.per_expert_forward(hidden, top_k_index, top_k_weights)

    def per_expert_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
        """The loop over experts: tokens routed to expert e through its own modules."""
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = expert(hidden[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def stacked(self) -> StackedExperts:
        """The experts' tensors stacked for the grouped path, built on first use and again
        when the experts changed (see StackedExperts.current)."""
        stacked = getattr(self, "_stacked", None)
        if stacked is None or not stacked.current(self):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise CompressError("MoE experts are stacked on their first decode call: run "
                                    "one eager forward before capturing a CUDA graph")
            self._stacked = stacked = StackedExperts(self)
        return stacked

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() move or cast each expert's buffers one by one: the views into
        # the stacked tensors become separate tensors, so drop the stack (rebuilt on next use)
        self._stacked = None
        return super()._apply(fn, *args, **kwargs)


# The grouped path serves calls with up to this many routed rows (tokens x top_k): batch-1
# decode (top_k rows) up to batch 16 at top-8. Above it, the per-expert loop (see forward).
GROUPED_MAX_ROWS = 128
STACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale")


def groupable(experts: ExpertMLPs) -> str | None:
    """Why the grouped kernel cannot run these experts, or None when it can: every projection a
    plain QuantizedLinear without bias, one format and shape per role (gate and up alike)."""
    from compress.runtime.modules import QuantizedLinear

    def layout(p: nn.Module) -> tuple:
        return p.fmt, [(name, t.dtype, t.shape, t.device) for name, t in p._buffers.items()
                       if name in STACKED]

    projections = [expert.projections() for expert in experts]
    if not all(type(p) is QuantizedLinear and p.bias is None
               for group in projections for p in group):
        return "not every projection is a QuantizedLinear without bias"
    first_gate, _, first_down = projections[0]
    gate_layout, down_layout = layout(first_gate), layout(first_down)
    if not all(layout(gate) == layout(up) == gate_layout and layout(down) == down_layout
               for gate, up, down in projections):
        return "the experts differ in format, shape, dtype or device"
    if any(name == "weight_global_scale" and tuple(shape) != (1,)
           for name, _, shape, _ in gate_layout[1] + down_layout[1]):
        return "NVFP4 global scales are not [1] each"
    inner, per = first_gate.out_features, 32 // first_gate.fmt.bits
    if first_gate.fmt.row.kernel == "int" and not first_gate.fmt.symmetric and inner % per:
        return f"zero points of gate and up rows ({inner}) do not stack: not a multiple of {per}"
    return None


class StackedExperts:
    """Every expert's packed tensors stacked per role: gate and up as one [E, 2F, ...] weight
    (one launch), down as [E, D, ...]. Each expert's own buffers are then rebound to views into
    the stacks, so the memory held stays the compressed size and the modules, their
    state_dict and the artifact are unchanged. reason: why the experts cannot be stacked (then
    nothing is), None when they are."""

    def __init__(self, experts: ExpertMLPs):
        self.key = self._key(experts)
        self.reason = groupable(experts)
        if self.reason is not None:
            return
        projections = [expert.projections() for expert in experts]
        self.inner = projections[0][0].out_features
        self.act_fn = experts[0].act_fn
        self.family = projections[0][0].fmt.name
        # plain tensors even when first called under inference_mode (load_state_dict must still
        # be able to copy into the experts' buffers afterwards)
        with torch.inference_mode(False), torch.no_grad():
            self.gate_up = self._stack([(gate, up) for gate, up, _ in projections])
            self.down = self._stack([(down,) for _, _, down in projections])
        self.key = self._key(experts)   # the rebound buffers

    @staticmethod
    def _key(experts: ExpertMLPs) -> tuple:
        """What current() compares: the first and last experts' projections and tensors."""
        return tuple(x for i in (0, -1) for p in experts[i].projections()
                     for x in (p, *p._buffers.values()))

    def current(self, experts: ExpertMLPs) -> bool:
        """Whether the stacks still hold the experts' tensors. Checked on the first and last
        experts only (a cheap test at every call): moving or casting the block drops the stacks
        (ExpertMLPs._apply); passes replace the projections of all experts together."""
        key = self._key(experts)
        return len(key) == len(self.key) and all(a is b for a, b in zip(key, self.key))

    @staticmethod
    def _stack(groups: list[tuple[nn.Module, ...]]) -> dict:
        """groups[e]: expert e's modules whose rows its stacked weight concatenates. Returns
        grouped_matmul's keyword arguments; the modules' buffers become views of the stacks."""
        fmt = groups[0][0].fmt
        args = {"fmt": "int" if fmt.row.kernel == "int" else fmt.type, "bits": fmt.bits}
        for name in STACKED:
            if name not in groups[0][0]._buffers:
                continue
            # [E, sum of rows, ...]; NVFP4's global scales [1] each -> [E, segments]
            stack = torch.stack([torch.cat([m._buffers[name] for m in group])
                                 for group in groups])
            for e, group in enumerate(groups):
                start = 0
                for m in group:
                    rows = m._buffers[name].shape[0]
                    setattr(m, name, stack[e, start:start + rows])
                    start += rows
            args[name] = stack
        return {"packed": args.pop("weight_packed"), "scale": args.pop("weight_scale"),
                "zero": args.pop("weight_zero_point", None),
                "global_scale": args.pop("weight_global_scale", None), **args}

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        from compress.kernels.moe import grouped_matmul

        tokens, k = top_k_index.shape
        ids = top_k_index.reshape(-1)                     # [T*k], row t*k + s: token t, slot s
        gate_up = grouped_matmul(hidden, ids, rows_per_x=k, **self.gate_up)   # [T*k, 2F]
        h = self.act_fn(gate_up[:, :self.inner]) * gate_up[:, self.inner:]   # [T*k, F]
        y = grouped_matmul(h, ids, **self.down)           # [T*k, D]; masked slots: 0
        return (y.view(tokens, k, -1) * top_k_weights[..., None]).sum(1).to(hidden.dtype)


def fused_layout(module: nn.Module, hidden: int) -> Layout | None:
    """The layout of a fused experts module (3D gate_up_proj and down_proj, nothing else; or
    gpt-oss's, with biases and the clamped SwiGLU's alpha and limit), or None when `module` is
    not one."""
    params = dict(module.named_parameters(recurse=False))
    if "gate_up_proj" not in params or params["gate_up_proj"].dim() != 3:
        return None
    gate_up, down = params["gate_up_proj"].shape, params["down_proj"].shape
    if set(params) == {"gate_up_proj", "down_proj"}:
        if gate_up[2] == hidden and down[1] == hidden and gate_up[1] == 2 * down[2]:
            return "gate_up"
        if gate_up[1] == hidden and down[2] == hidden and gate_up[2] == 2 * down[1]:
            return "gate_up_t"
    if (set(params) == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
            and hasattr(module, "alpha") and hasattr(module, "limit")
            and gate_up[1] == hidden and down[2] == hidden and gate_up[2] == 2 * down[1]):
        return "gpt_oss"
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


def split_fused(gate_up: torch.Tensor, down: torch.Tensor, layout: Layout
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each expert's (gate [F, D], up [F, D], down [D, F]) weights, as views into the fused
    gate_up [E, 2F, D] (gate rows first) and down [E, D, F] ([E, D, 2F] / [E, F, D] for
    gate_up_t; gpt_oss: gate and up columns interleaved, gate first; its biases:
    split_biases). The one place experts are split: in memory (unfused) and streamed (split_state)."""
    if layout in ("gate_up_t", "gpt_oss"):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if layout == "gpt_oss":
        return [(gate_up[e, 0::2], gate_up[e, 1::2], down[e]) for e in range(gate_up.shape[0])]
    inner = gate_up.shape[1] // 2
    return [(gate_up[e, :inner], gate_up[e, inner:], down[e]) for e in range(gate_up.shape[0])]


def split_biases(gate_up_bias: torch.Tensor, down_bias: torch.Tensor
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """gpt_oss's biases per expert: (gate [F], up [F], down [D]); gate and up interleaved."""
    return [(gate_up_bias[e, 0::2], gate_up_bias[e, 1::2], down_bias[e])
            for e in range(gate_up_bias.shape[0])]


def unfused(module: nn.Module, layout: Layout, names=DEFAULT_NAMES) -> ExpertMLPs:
    """ExpertMLPs holding the weights of a fused experts module (gate rows first, then up)."""
    weights = split_fused(module.gate_up_proj.data, module.down_proj.data, layout)
    inner, hidden = weights[0][0].shape
    dtype, device = module.gate_up_proj.dtype, module.gate_up_proj.device
    if layout == "gpt_oss":
        glu, act = ClampedSwiGLU(module.alpha, module.limit), None
        biases = split_biases(module.gate_up_proj_bias.data, module.down_proj_bias.data)
    else:
        glu, act, biases = None, module.act_fn, None
    result = ExpertMLPs([ExpertMLP(hidden, inner, act, names, dtype, device,
                                   bias=biases is not None, glu=glu) for _ in weights])
    if device.type != "meta":
        for e, (expert, tensors) in enumerate(zip(result, weights)):
            for projection, weight in zip(expert.projections(), tensors):
                projection.weight.data.copy_(weight)
            for projection, bias in zip(expert.projections(), biases[e] if biases else ()):
                projection.bias.data.copy_(bias)
    return result


def split_state(tensors: dict[str, torch.Tensor], block: str, record: dict
                ) -> dict[str, torch.Tensor]:
    """A state dict in which experts module `block` is stored fused (`{block}.gate_up_proj`,
    `{block}.down_proj`, and gpt-oss's `_bias` of each, as transformers saves it without
    conversion), with those replaced by the weights unfused() gives ExpertMLPs
    (`{block}.{e}.{name}.weight` / `.bias`, each a contiguous copy). record: the block's
    structure["experts"] entry. Unchanged if the block is not there fused (a per-expert
    checkpoint already holds those names)."""
    gate_up, down = f"{block}.gate_up_proj", f"{block}.down_proj"
    if gate_up not in tensors or down not in tensors:
        return tensors
    fused = {gate_up, down, gate_up + "_bias", down + "_bias"}
    out = {k: v for k, v in tensors.items() if k not in fused}
    parts = {"weight": split_fused(tensors[gate_up], tensors[down], record["layout"])}
    if record["layout"] == "gpt_oss":
        parts["bias"] = split_biases(tensors[gate_up + "_bias"], tensors[down + "_bias"])
    for kind, per_expert in parts.items():
        for e, weights in enumerate(per_expert):
            for name, weight in zip(record["names"], weights):
                out[f"{block}.{e}.{name}.{kind}"] = weight.clone(
                    memory_format=torch.contiguous_format)
    return out


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
    """Modules holding 3D expert weights this module cannot split into Linears (a layout
    fused_layout does not know): {module name: class name}. Passes that
    target Linears leave them in 16 bits, and say so."""
    hidden = model.config.get_text_config().hidden_size
    return {name: type(module).__name__ for name, module in model.named_modules()
            if any(p.dim() == 3 for p in module.parameters(recurse=False))
            and fused_layout(module, hidden) is None}


def unfuse_experts(model: nn.Module, check: bool = True) -> dict[str, dict]:
    """Replace every fused experts module by ExpertMLPs (same weights, same function, checked on
    random input; on the meta device, with random weights for each class). Returns what it
    unfused:
    {module name: {"layout": ..., "names": [gate, up, down]}} (structure["experts"])."""
    from compress.runtime.modules import get_module, set_module

    names = checkpoint_names(model.config.model_type)
    found, probed = {}, set()
    for name, layout in fused_experts(model).items():
        fused = get_module(model, name)
        experts = unfused(fused, layout, names)
        found[name] = {"layout": layout, "names": list(names)}
        if fused.gate_up_proj.device.type == "meta":
            # weights read later, layer by layer (streaming): check the split of each class
            # once, on random weights
            if check and type(fused) not in probed:
                probed.add(type(fused))
                probe = random_copy(fused)
                check_split(name, probe, unfused(probe, layout, names), layout)
        elif check:
            check_split(name, fused, experts, layout)
        set_module(model, name, experts)
    return found


def check_split(name: str, fused: nn.Module, experts: ExpertMLPs, layout: Layout) -> None:
    """Refuse a fused layout whose split does not compute what the fused module does."""
    if not same_function(fused, experts, fused.gate_up_proj.shape[2 if layout == "gate_up"
                                                                  else 1]):
        raise CompressError(f"{name}: the fused experts of {type(fused).__name__} do not "
                            "compute act(gate) * up -> down with gate rows first; "
                            "compress cannot split them into per-expert Linears")


def random_copy(module: nn.Module) -> nn.Module:
    """A float32 CPU copy of a module built on the meta device, with random weights."""
    import copy

    gen = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(module).to_empty(device="cpu").float()
    with torch.no_grad():
        for tensor in probe.parameters():
            tensor.normal_(0.0, 0.05, generator=gen)
    return probe


def load_experts(model: nn.Module, record: dict[str, dict]) -> None:
    """structure["experts"] loader: unfuse the same blocks of a freshly built model."""
    from compress.runtime.modules import get_module, set_module

    for name, entry in record.items():
        set_module(model, name, unfused(get_module(model, name), entry["layout"],
                                        entry["names"]))
