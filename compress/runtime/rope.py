"""RoPE in one kernel per attention layer at run time: transformers' apply_rotary_pos_emb is
~12 small kernels a call (two multiplies, rotate_half's slices, negation and concatenation, an
add, for q and for k), one call per layer of every decode step."""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from compress.runtime import scope


def fuse_rope(model: nn.Module) -> int:
    """Run the RoPE of the model's attention layers (the module-level apply_rotary_pos_emb their
    forward looks up) through compress.kernels.rope_gather.rope_qk where kernels run (CUDA),
    after checking on random heads that it computes what the family's own function does
    (rotate-half RoPE; other conventions fail the check and keep theirs). The function is
    wrapped once in the family's modeling module; the wrapper takes the kernel only inside the
    forward of a model given here, for the inputs it handles, else calls the original.
    Returns how many attention layers now run it (0 when called again)."""
    if getattr(model, "compress_fused_rope", False):
        return 0
    from compress.runtime.modules import activation_like

    layers, like = 0, activation_like(model)
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        function = getattr(modeling, "apply_rotary_pos_emb", None)
        if not type(module).__name__.endswith("Attention") or function is None:
            continue
        original = getattr(function, "compress_original", function)
        if like is None or not _agrees(original, like.device, like.dtype):
            continue
        if function is original:
            modeling.apply_rotary_pos_emb = _fused(original)
        layers += 1
    if layers:
        scope.enter_scope(model)   # only this model's forward takes the kernel
        model.compress_fused_rope = True
    return layers


def _agrees(original, device: torch.device, dtype: torch.dtype) -> bool:
    from compress.kernels.rope_gather import rope_qk
    from compress.runtime.modules import kernel_unavailable

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(shape, generator=gen).to(device, dtype)
            for shape in ((1, 4, 3, 64), (1, 2, 3, 64)))
    angle = torch.rand(1, 3, 32, generator=gen) * 6
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(device, dtype) for f in (torch.cos, torch.sin))
    if kernel_unavailable(q) is not None:
        return False
    try:
        with torch.no_grad():
            want, got = original(q, k, cos, sin), rope_qk(q, k, cos, sin)
    except (TypeError, RuntimeError, ValueError):
        return False
    return got is not None and all(
        w.shape == g.shape and torch.allclose(w.float(), g.float(), rtol=2e-2, atol=2e-2)
        for w, g in zip(want, got))


def _fused(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        from compress.kernels import rope_gather
        from compress.runtime.modules import kernel_unavailable

        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if (scope.RUNNING.get() and unsqueeze_dim == 1 and len(args) <= 1
                and set(kwargs) <= {"unsqueeze_dim"} and kernel_unavailable(q) is None):
            out = rope_gather.rope_qk(q, k, cos, sin)
            if out is not None:
                return out
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.compress_original = original
    return apply_rotary_pos_emb
