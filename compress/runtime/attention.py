"""Decode attention without repeat_kv. With grouped-query attention (Llama-3-8B: 32 query heads
on 8 key/value heads) and a mask (a static cache always passes one), transformers' SDPA
attention up to at least 5.17 (the H200 machine's) copies every layer's whole K and V cache
n_rep times a step (`repeat_kv`): 64 copies a step of an 8B decode, 7% of the INT4 step on the
H200 (kernels/NOTES.md, ninth session). With one query token, the n_rep query heads that share a
key/value head are instead laid along the query-length axis ([B, H, 1, D] -> [B, H / n_rep,
n_rep, D]) and attend to that head's K and V once, the mask broadcast over them: the same
products and the same softmax, no copy. transformers 5.24 does exactly this (its `pack_gqa`);
there this module changes nothing. The step's boolean mask is also turned into SDPA's additive
form once a step instead of once a layer (additive_mask). With DECODE_KERNEL the packed
attention runs through compress/kernels/decode_attention.py (the keys split over the SMs)
under either transformers."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from compress.runtime import scope

# The single-token attention through compress/kernels/decode_attention.py (keys split over the
# SMs, one launch) instead of SDPA (a program per key/value head: 8 on 132 SMs for Llama-3-8B)
# where kernels run and it takes the shapes. Off: not yet timed on the H200 (eighteenth
# session, no device); bench_e2e's "<format>-attn" rows measure it; COMPRESS_DECODE_ATTENTION=1
# turns it on for a process (compress bench, generate).
DECODE_KERNEL = os.environ.get("COMPRESS_DECODE_ATTENTION", "0") == "1"


def transformers_packs_gqa() -> bool:
    from transformers.integrations import sdpa_attention

    return hasattr(sdpa_attention, "pack_gqa")


def pack_gqa_decode(model: nn.Module) -> bool:
    """Run the single-token SDPA attention of model's grouped-query layers on the packed heads
    (module docstring) with the step's mask made additive once (where the installed
    transformers packs the heads itself, only the latter). The process-wide "sdpa" attention
    function is wrapped once; the wrapper acts only inside the forward of a model given here
    (scope.py) and otherwise calls transformers' function. Returns whether model now runs it."""
    config = getattr(model, "config", None)
    heads, kv_heads = (getattr(config, key, None) for key in
                       ("num_attention_heads", "num_key_value_heads"))
    if (getattr(config, "_attn_implementation", None) != "sdpa"
            or not heads or not kv_heads or heads == kv_heads):
        return False
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(original, "compress_original", None):
        AttentionInterface.register("sdpa", _packed(original))
    scope.enter_scope(model)
    return True


def packed_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """Attention of one query token, query [B, H, 1, D], key/value [B, H_kv, S, D] (H a multiple
    of H_kv, head h reading key/value head h // (H / H_kv), as repeat_kv lays them), mask
    [B, 1, 1, S] or None -> [B, 1, H, D_v] (transformers' attention output layout)."""
    if DECODE_KERNEL:
        from compress.kernels.decode_attention import decode_attention, handles
        from compress.runtime.modules import kernel_unavailable

        if kernel_unavailable(query) is None and handles(query, key, value, mask):
            return decode_attention(query, key, value, mask, scaling)
    b, h, _, d = query.shape
    n_rep = h // key.shape[1]
    out = F.scaled_dot_product_attention(query.reshape(b, h // n_rep, n_rep, d), key, value,
                                         attn_mask=mask, scale=scaling)
    return out.reshape(b, h, 1, -1).transpose(1, 2).contiguous()


_LAST_MASK: list = [None, None, None]   # the boolean mask last made additive, what it was
                                       # made for (below), its additive form


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the 0 / -inf mask SDPA turns it into (torch's
    convert_boolean_attn_mask: two scalar tensors on the mask's device and a where, three
    launches), made once for all layers of a step: transformers hands every layer of a forward
    the same mask object. The form made is reused only within the same scoped forward
    (scope.RUNNING's object), for the same dtype, and, where the mask has a version counter,
    if it was not written in place since (tensors made under torch.inference_mode have none,
    so the forward is what bounds the reuse). Other masks as they are."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    made_for = (scope.RUNNING.get(), None if mask.is_inference() else mask._version, dtype)
    last, last_made_for, additive = _LAST_MASK
    if (last is mask and last_made_for[0] is made_for[0] and last_made_for[1:] == made_for[1:]
            and (made_for[0] or made_for[1] is not None)):   # outside a forward: versions only
        return additive
    zero, minus_inf = (torch.full((), v, dtype=dtype, device=mask.device)
                       for v in (0.0, float("-inf")))
    _LAST_MASK[:] = mask, made_for, torch.where(mask, zero, minus_inf)
    return _LAST_MASK[2]


def _packed(original):
    def sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                               scaling=None, **kwargs):
        mask = attention_mask
        heads, kv_heads = query.shape[1], key.shape[1]
        if (scope.RUNNING.get() and heads > kv_heads and heads % kv_heads == 0
                and query.shape[2] == 1 and dropout == 0.0
                and (mask is None or (mask.ndim == 4 and mask.shape[1] == mask.shape[2] == 1))
                and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
                and not kwargs.get("output_attentions", False)
                and not torch.compiler.is_compiling()):   # as transformers' own pack_gqa
            if mask is not None:   # made additive before the slice: the object every layer gets
                # (transformers 4.x's masks may run longer than the keys)
                mask = additive_mask(mask, query.dtype)[:, :, :, :key.shape[-2]]
            if transformers_packs_gqa() and not DECODE_KERNEL:   # 5.24 on: it packs the
                # heads, given the mask made once (with DECODE_KERNEL, ours runs either way)
                return original(module, query, key, value, mask, dropout=dropout,
                                scaling=scaling, **kwargs)
            return packed_decode_attention(query, key, value, mask, scaling), None
        return original(module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, **kwargs)

    sdpa_attention_forward.compress_original = original
    return sdpa_attention_forward
