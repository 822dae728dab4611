"""Projections that read the same input run as one matmul: q/k/v and gate/up at decode time.

At batch-1 decode a small matrix costs about a launch and a ramp-up whatever its size (k_proj
and v_proj of an 8B model are 1024 x 4096: ~6 us each on an H200, against ~13 us for the
6144 x 4096 of q/k/v together). `fuse_projections` stacks the packed tensors of each such group
once, along the output rows, and rebinds every member's buffers to its rows of the stack: the
memory held stays the compressed size, and the modules, their state_dict and the artifact are
unchanged (the stored layout stays compressed-tensors'). The first member called with an input
computes the whole stack's output; the others return their rows of it.

Only plain QuantizedLinear members of one format, input size and bias presence are fused (NVFP4
members must also share their global scale, as fused_global_scales makes them); MoE experts are
left to their grouped kernel (compress/runtime/moe.py).

A SiLU-gated MLP (down(silu(gate(x)) * up(x)): Llama, Mistral, Qwen) then runs silu(gate) * up
in the gate/up matmul's epilogue at M = 1 (decode._gemv_kernel GATED): one launch where
transformers' forward takes three (the matmul, SiLU, the product), 64 fewer a step of an 8B
model. The MLP's forward is replaced only where it computes that formula (checked on a random
input when fused), and only with GATED_MLP set.

With L2_PREFETCH_MIB set, a layer's q/k/v group at one row also asks L2 for the layer's next
weights (o_proj's, then gate/up's) right after its matmul (L2Prefetch, link_l2_prefetch).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from compress.errors import UsageError
from compress.kernels._common import silu_mul
from compress.runtime.modules import QuantizedLinear, _record, dispatch_linear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# SiLU-gated MLPs in the gate/up epilogue: on since its H200 A/B (2026-12-04: INT4 decode
# +1% in three same-run pairs, 390.8-392.3 -> 394.4-396.1 tok/s; GPU suite passed).
GATED_MLP = True
STACKED = ("weight_packed", "weight_scale", "weight_zero_point")   # stacked along output rows


def stacked_buffers(module: QuantizedLinear) -> list[torch.Tensor]:
    """The module's tensors of output rows (STACKED) that it holds."""
    return [module._buffers[n] for n in STACKED if module._buffers.get(n) is not None]


def _l2_prefetch_mib() -> float:
    raw = os.environ.get("COMPRESS_L2_PREFETCH_MIB", "0")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise UsageError(f"COMPRESS_L2_PREFETCH_MIB must be a number of MiB (e.g. 24), got "
                         f"{raw!r}") from None


# After a layer's q/k/v matmul at one row, ask L2 for this many MiB of the layer's o_proj and
# then gate/up tensors (compress/kernels/prefetch.py): the RoPE, cache and attention kernels in
# between leave DRAM nearly idle. 0: off. Not yet timed on the H200 (eighteenth session, no
# device): bench_e2e's "<format>-l2pf<MiB>" rows measure it; COMPRESS_L2_PREFETCH_MIB sets it
# for a process (compress bench, generate).
L2_PREFETCH_MIB = _l2_prefetch_mib()


class FusedGroup:
    """The stacked module of one group and the rows each member owns in its output."""

    def __init__(self, members: list[QuantizedLinear]):
        self.members = members
        first = members[0]
        rows = [m.out_features for m in members]
        self.bounds = [(sum(rows[:i]), sum(rows[:i + 1])) for i in range(len(rows))]
        bias = (torch.cat([m.bias for m in members]) if first.bias is not None else None)
        self.stack = QuantizedLinear(first.in_features, sum(rows), first.fmt, bias)
        buffers = dict(first.named_buffers(recurse=False))
        with torch.no_grad():
            for name in buffers:
                if name in STACKED:
                    stacked = torch.cat([m._buffers[name] for m in members])
                    self.stack.register_buffer(name, stacked)
                    for m, (lo, hi) in zip(members, self._buffer_rows(name, stacked)):
                        m._buffers[name] = stacked[lo:hi]     # a view: no second copy
                elif name == "weight_shape":
                    self.stack.register_buffer(name, torch.tensor([sum(rows),
                                                                   first.in_features]))
                else:   # weight_global_scale: one shared value (checked by fusable)
                    self.stack.register_buffer(name, buffers[name])
        self.views = self._views()
        self.cache: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.prefetch: L2Prefetch | None = None   # q/k/v: see link_l2_prefetch

    def _buffer_rows(self, name: str, stacked: torch.Tensor) -> list[tuple[int, int]]:
        """Each member's row range in a stacked tensor (zero points pack 8 rows a word)."""
        per = (self.bounds[-1][1] // stacked.shape[0]) if stacked.shape[0] else 1
        return [(lo // per, hi // per) for lo, hi in self.bounds]

    def _views(self) -> list[int]:
        return [t.data_ptr() for m in self.members for t in stacked_buffers(m)]

    def current(self) -> bool:
        """Whether the members still hold views into the stack (a later .to() or a load of
        new weights replaces them: then each member runs on its own again)."""
        return self._views() == self.views and all(
            m._buffers["weight_packed"].device == self.stack.weight_packed.device
            for m in self.members)

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        member = self.members[index]
        if not self.current():
            self.cache = None
            return QuantizedLinear.forward(member, x)
        if self.cache is None or self.cache[0] is not x:
            self.cache = (x, self.stack(x), len(self.members))
            if self.prefetch is not None and L2_PREFETCH_MIB and x.numel() == x.shape[-1]:
                self.prefetch.issue(x)   # one row: a decode step (the attention comes next)
        cached_x, y, left = self.cache
        # the last member to read it drops the cache (an input held no longer than needed)
        self.cache = (cached_x, y, left - 1) if left > 1 else None
        _record(member, self.stack.kernel_path + " (fused)")
        lo, hi = self.bounds[index]
        return y[..., lo:hi]

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x) of a gate/up group (see the module docstring)."""
        if not self.current():
            gate, up = (QuantizedLinear.forward(m, x) for m in self.members)
            return torch.nn.functional.silu(gate) * up
        return dispatch_linear(self.stack, x, lambda x: silu_mul(self.stack.reference_forward(x)),
                               gated=True)


def fusable(members: list[nn.Module]) -> bool:
    """Plain QuantizedLinear of one format, input size and bias presence; NVFP4: one global
    scale; INT zero points: every member's rows a multiple of the 8 rows a word packs."""
    if not all(type(m) is QuantizedLinear for m in members):
        return False
    first = members[0]
    if any(m.fmt != first.fmt or m.in_features != first.in_features
           or (m.bias is None) != (first.bias is None)
           or set(m._buffers) != set(first._buffers) for m in members):
        return False
    if "weight_global_scale" in first._buffers and not all(
            torch.equal(m.weight_global_scale, first.weight_global_scale) for m in members):
        return False
    if "weight_zero_point" in first._buffers and any(m.out_features % 8 for m in members):
        return False
    return all(m._buffers[n].is_contiguous() for m in members for n in STACKED
               if n in m._buffers)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of the model that fusable() accepts (see the module
    docstring); patches the members' forward. Returns how many groups were fused."""
    from compress.runtime.moe import ExpertMLP

    fused = 0
    for parent in model.modules():
        if isinstance(parent, ExpertMLP):
            continue
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if None in members or not fusable(members) or any(
                    getattr(m, "fused_group", None) for m in members):
                continue
            group = FusedGroup(members)
            for index, member in enumerate(members):
                member.fused_group = group
                member.forward = (lambda x, i=index, g=group: g.forward(i, x))
            if GATED_MLP and names == ("gate_proj", "up_proj") and _silu_gated(parent, group):
                parent.forward = (lambda x, p=parent, g=group: _gated_forward(p, g, x))
                parent.fused_gated_mlp = True
            fused += 1
    link_l2_prefetch(model)
    return fused


class L2Prefetch:
    """The weights a layer's q/k/v group asks L2 for after its matmul: the first
    L2_PREFETCH_MIB of its targets' tensors (o_proj's, then the gate/up stack's), each target
    by the same fraction of its rows in every tensor (codes, scales, zero points: the rows a
    program of its matmul reads together). The ranges are made on first use and again when
    the budget or a tensor's address changes; never inside a CUDA graph capture (a host-to-
    device copy), where a call before capture has not made them the step goes without."""

    def __init__(self, targets: list[QuantizedLinear]):
        self.targets = targets
        self.key: tuple | None = None
        self.ranges = None

    def tensors(self) -> list[list[torch.Tensor]]:
        return [stacked_buffers(m) for m in self.targets]

    def plan(self, mib: float) -> list[tuple[torch.Tensor, int]]:
        """(tensor, bytes from its start) within mib MiB, targets in order."""
        left, ranges = int(mib * 2 ** 20), []
        for tensors in self.tensors():
            total = sum(t.numel() * t.element_size() for t in tensors)
            share = min(1.0, left / total) if total else 0.0
            ranges += [(t, int(t.numel() * t.element_size() * share)) for t in tensors]
            left -= int(total * share)
            if left <= 0:
                break
        return ranges

    def issue(self, x: torch.Tensor) -> None:
        from compress.kernels.prefetch import prefetch_l2, prefetch_ranges
        from compress.runtime.modules import kernel_unavailable

        if kernel_unavailable(x) is not None:
            return
        key = (L2_PREFETCH_MIB, tuple(t.data_ptr() for ts in self.tensors() for t in ts))
        if key != self.key:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return
            self.ranges, self.key = prefetch_ranges(self.plan(L2_PREFETCH_MIB), x.device), key
        if self.ranges is not None:   # the interpreter runs no PTX: the kernel's plan instead
            prefetch_l2(self.ranges, plan=os.environ.get("TRITON_INTERPRET") == "1")


def link_l2_prefetch(model: nn.Module) -> int:
    """Give every decoder layer's fused q/k/v group its L2Prefetch: the layer's o_proj, then
    its gate/up stack (or gate_proj and up_proj), where those are plain QuantizedLinear.
    Returns how many groups got one (they ask for nothing while L2_PREFETCH_MIB is 0)."""
    linked = 0
    for layer in model.modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        group = getattr(getattr(attn, "q_proj", None), "fused_group", None)
        if group is None or mlp is None:
            continue
        targets = [getattr(attn, "o_proj", None)]
        gate_group = getattr(getattr(mlp, "gate_proj", None), "fused_group", None)
        targets += ([gate_group.stack] if gate_group is not None else
                    [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")])
        targets = [t for t in targets if type(t) is QuantizedLinear]
        if targets:
            group.prefetch = L2Prefetch(targets)
            linked += 1
    return linked


def _gated_forward(mlp: nn.Module, group: FusedGroup, x: torch.Tensor) -> torch.Tensor:
    if mlp.gate_proj is group.members[0] and mlp.up_proj is group.members[1]:
        return mlp.down_proj(group.gated(x))
    return type(mlp).forward(mlp, x)   # gate or up replaced since (bench_e2e's restore)


def _silu_gated(mlp: nn.Module, group: FusedGroup) -> bool:
    """Does mlp's forward compute down_proj(silu(gate_proj(x)) * up_proj(x))? Checked on a
    random row against the forward it has, in its device and dtype."""
    down = getattr(mlp, "down_proj", None)
    if down is None or getattr(down, "in_features", None) != group.members[0].out_features:
        return False
    like = group.stack.weight_scale
    dtype = like.dtype if like.dtype in (torch.float16, torch.bfloat16) else torch.float32
    x = torch.randn(1, group.members[0].in_features,
                    generator=torch.Generator().manual_seed(0)).to(like.device, dtype)
    with torch.no_grad():
        try:
            want, got = mlp(x), down(group.gated(x))
        except (RuntimeError, TypeError, ValueError):
            return False
    return want.shape == got.shape and torch.allclose(want.float(), got.float(), rtol=3e-2,
                                                      atol=3e-2 * want.abs().max().item())
