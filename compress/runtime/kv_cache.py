"""A static KV cache's update in one kernel at run time: transformers' StaticLayer.update runs
five small kernels a layer and step (compress/kernels/kv_cache.py says which), 160 launches of
an 8B decode step replayed from a CUDA graph, where the step's weights take ~3 ms."""

from __future__ import annotations

import functools

import torch
from torch import nn

from compress.runtime import scope


def fuse_static_cache(model: nn.Module) -> bool:
    """Make every update of an initialized static cache layer inside the forward of model
    (scope.py) one launch of compress.kernels.kv_cache.static_cache_write, where kernels run
    for model's device. transformers' StaticLayer.update is wrapped once, process-wide, after
    checking on small layers that the kernel leaves keys, values and the length counter as it
    does (a transformers whose static layer keeps its state otherwise fails the check and
    keeps its own); another model in the process keeps transformers' update. The first update
    of a layer (the prompt, which allocates the cache) always runs transformers'. Returns
    whether model now runs it."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:   # transformers 4.x: no cache layers
        return False
    from compress.runtime.modules import activation_like

    like = activation_like(model)
    original = getattr(StaticLayer.update, "compress_original", StaticLayer.update)
    if like is None or not _agrees(StaticLayer, original, like.device, like.dtype):
        return False
    if StaticLayer.update is original:
        StaticLayer.update = _fused(StaticLayer, original)
    scope.enter_scope(model)
    return True


def _fused(layer_class, original):
    @functools.wraps(original)
    def update(self, key_states, value_states, *args, **kwargs):
        arrivals = self.__dict__.get("compress_arrivals")
        if (scope.RUNNING.get() and type(self) is layer_class and arrivals is not None
                and _fits(self, key_states, value_states, arrivals)
                and not torch.compiler.is_compiling()):
            from compress.kernels.kv_cache import static_cache_write

            static_cache_write(self.keys, self.values, key_states, value_states,
                               self.cumulative_length, arrivals)
            return self.keys, self.values
        out = original(self, key_states, value_states, *args, **kwargs)
        if scope.RUNNING.get() and arrivals is None and getattr(self, "is_initialized", False):
            # the kernel's arrival counter, allocated beside the cache (the prompt's update
            # runs before any CUDA graph capture of the decode step)
            self.compress_arrivals = torch.zeros(1, dtype=torch.int32, device=self.keys.device)
        return out

    update.compress_original = original
    return update


def _fits(layer, k: torch.Tensor, v: torch.Tensor, arrivals: torch.Tensor) -> bool:
    from compress.runtime.modules import kernel_unavailable

    keys, values = layer.keys, layer.values
    return (getattr(layer, "is_initialized", False) and kernel_unavailable(k) is None
            and arrivals.device == keys.device == k.device == v.device
            and keys.is_contiguous() and values.is_contiguous()
            and k.dim() == 4 and k.shape[:2] == keys.shape[:2] and k.shape[3] == keys.shape[3]
            and v.shape[:3] == k.shape[:3] and v.shape[3] == values.shape[3]
            and k.dtype == keys.dtype and v.dtype == values.dtype
            and k.stride(3) == 1 and v.stride(3) == 1
            and isinstance(layer.cumulative_length, torch.Tensor)
            and layer.cumulative_length.device == keys.device)


def _agrees(layer_class, original, device: torch.device, dtype: torch.dtype) -> bool:
    """Does the kernel path leave two small layers as transformers' update does: a prompt of 3
    tokens by transformers' update in both, then steps of 2 and 1 tokens (keys transposed, as
    attention layers pass them) by each path, filling the cache."""
    from compress.runtime.modules import kernel_unavailable

    if kernel_unavailable(torch.empty(0, device=device)) is not None:
        return False
    gen = torch.Generator().manual_seed(0)

    def states(tokens):   # [B, T, H, D] transposed to [B, H, T, D], as q/k/v views are
        return [torch.randn(2, tokens, 3, 16, generator=gen).to(device, dtype).transpose(1, 2)
                for _ in range(2)]

    fused = _fused(layer_class, original)
    token = scope.RUNNING.set(True)   # as inside a scoped model's forward
    try:
        want, got = layer_class(max_cache_len=6), layer_class(max_cache_len=6)
        for step in (states(3), states(2), states(1)):
            original(want, *step)
            fused(got, *step)
    except (TypeError, RuntimeError, ValueError, AttributeError):
        return False
    finally:
        scope.RUNNING.reset(token)
    return (got.__dict__.get("compress_arrivals") is not None
            and all(torch.equal(getattr(want, n), getattr(got, n))
                    for n in ("keys", "values", "cumulative_length")))
