"""A static KV cache's update in one launch.

transformers' StaticLayer.update (5.x) writes a step's keys and values into its preallocated
[B, H, S, D] tensors at its own length counter: an arange, an add, the counter's add_ and two
index_copy_, five kernels a layer, 160 of a decode step of an 8B model (kernels/NOTES.md). Here
one program a (batch, head, token) reads the counter, copies that token's key and value rows
to position counter + token, and the last program to finish moves the counter on by the
number of tokens, as the separate kernels leave it: an arrival counter, acq_rel at GPU scope
after a CTA barrier (the pattern of _common.finish_split), so no program reads the length
after it moved. Positions past the cache's end are not written (index_copy_ stops with a
device assert there; either way the cache is full).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C


@triton.jit
def _static_cache_write_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, length_ptr, arrivals_ptr,
                               H, T, S, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                               DK: tl.constexpr, DV: tl.constexpr,
                               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                               PDL: tl.constexpr = False):
    C.wait_for_producer(PDL)   # launched with programmatic dependent launch: see _common.PDL
    bh, t = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    start = tl.load(length_ptr)
    pos = start + t
    room = tl.where(pos < S, 1, 0)   # 0 past the cache's end: nothing stored
    dk = tl.arange(0, BLOCK_DK)
    key = tl.load(k_ptr + b * sk_b + h * sk_h + t * sk_t + dk, mask=dk < DK)
    tl.store(keys_ptr + (bh * S + pos) * DK + dk, key, mask=dk < DK * room)
    dv = tl.arange(0, BLOCK_DV)
    value = tl.load(v_ptr + b * sv_b + h * sv_h + t * sv_t + dv, mask=dv < DV)
    tl.store(values_ptr + (bh * S + pos) * DV + dv, value, mask=dv < DV * room)
    # (its barrier: every thread has read the length before this program arrives)
    if C.last_to_arrive(arrivals_ptr, 0, tl.num_programs(0) * tl.num_programs(1)):
        tl.store(length_ptr, start + T)   # the last to arrive: the others have read it
        tl.store(arrivals_ptr, 0)


def static_cache_write(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, length: torch.Tensor, arrivals: torch.Tensor) -> None:
    """keys, values: the cache [B, H, S, D] (contiguous); k, v: this step's [B, H, T, D] (any
    strides, the last 1); length: the cache's int64 token count (0-dim), advanced by T;
    arrivals: int32 [1], zero between calls (the kernel leaves it so)."""
    b, h, s, dk = keys.shape
    t = k.shape[2]
    C.check(keys.is_contiguous() and values.is_contiguous()
            and values.shape[:3] == (b, h, s), "the cache must be two contiguous [B, H, S, D]")
    C.check(k.shape == (b, h, t, dk) and v.shape == (b, h, t, values.shape[3])
            and k.dtype == keys.dtype and v.dtype == values.dtype
            and k.stride(3) == 1 and v.stride(3) == 1,
            f"keys/values of [{b}, {h}, T, D] in the cache's dtype, got {list(k.shape)} "
            f"{k.dtype} and {list(v.shape)} {v.dtype}")
    C.check(length.numel() == 1 and arrivals.dtype == torch.int32, "length: one value, "
            "arrivals: int32")
    if b * h * t == 0:
        return
    _static_cache_write_kernel[(b * h, t)](
        k, v, keys, values, length, arrivals, h, t, s, *k.stride()[:3], *v.stride()[:3],
        DK=dk, DV=values.shape[3], BLOCK_DK=C.next_pow2(dk), BLOCK_DV=C.next_pow2(values.shape[3]),
        num_warps=1, **C.pdl_args(keys.device))


def static_cache_write_ref(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, length: torch.Tensor) -> None:
    """transformers' StaticLayer.update, the writes and the counter."""
    position = torch.arange(k.shape[2], device=keys.device) + length
    length.add_(k.shape[2])
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
