"""GPTQ (Frantar et al. 2022): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the inputs.

Pure math on tensors: the quantize pass (compress/passes/quantize.py) gathers the Hessians with
the layer-wise Calibrator and calls `gptq_quantize` per module (or per group of modules that
read the same input and share a format: their rows are independent given H, so they are
quantized as one stacked matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats import GroupParams, QuantizedWeight, WeightFormat, codec
from compress.hessian import inverse_cholesky, prepare_hessian
from compress.passes import qparams


@dataclass
class GptqInfo:
    damp: float            # damping actually used (escalated when the factorization failed)
    act_order: bool


def _static_params(w: torch.Tensor, fmt: WeightFormat, g: int, tensor_scale,
                   importance: torch.Tensor, search: qparams.ScaleSearch) -> GroupParams:
    """Group parameters of the whole matrix up front ("static groups"). w: [O, I],
    importance: [I] -> params [O, I/g, 1]."""
    wg = w.reshape(w.shape[0], -1, g)
    return qparams.group_params(wg, fmt, tensor_scale, importance.reshape(-1, g), search)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False,
                  mask: torch.Tensor | None = None, name: str = "",
                  static_groups: bool = False, scale_search: qparams.ScaleSearch = "minmax",
                  global_scale: torch.Tensor | None = None
                  ) -> tuple[QuantizedWeight, GptqInfo]:
    """w: [O, I], H: [I, I] (2/n sum x x^T), mask: bool [O, I] of weights allowed to be non-zero.
    Returns the quantized weight (same layout as round-to-nearest) and what was used.

    Without act_order, group parameters are taken from the already-updated weights when the
    column loop reaches each group (as in the paper). With act_order, columns are processed in
    order of decreasing H[i, i] but group parameters are fixed from the original weights first
    ("static groups", llm-compressor's actorder=weight): the stored layout stays the plain
    [O, I/g] one, so no weight_g_idx is needed and every kernel reads it unchanged.
    static_groups without act_order fixes every group's parameters from the original weights
    too (llm-compressor's GPTQ does this by default). scale_search chooses how a group's
    parameters are found (compress/passes/qparams.py: min-max or a diag(H)-weighted MSE search).
    global_scale: NVFP4's per-tensor scale when it is shared with other tensors (fused q/k/v).
    Raises CompressError when the Hessian cannot be factorized at any damping."""
    c = codec(fmt)
    out_features, in_features = w.shape
    g = fmt.group_for(in_features)
    # from the whole tensor (or the fused group) first; None for formats without one
    tensor_scale = global_scale if global_scale is not None else c.tensor_scale(w, fmt)
    H, W = prepare_hessian(H.float(), w.float())
    if mask is not None:
        mask = mask.to(torch.bool)
        W = W * mask
    importance = torch.diag(H)     # mean squared input of each column (before damping)
    static = _static_params(W, fmt, g, tensor_scale, importance, scale_search) \
        if act_order or static_groups else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    U, used = inverse_cholesky(H if perm is None else H[perm][:, perm], damp, name=name)
    # Work on W^T [I, O] (columns of W as contiguous rows) in processing order; every buffer
    # is created where W is, and nothing in the loops reads a value back to the host.
    Wt = (W if perm is None else W[:, perm]).T.contiguous()
    keep_t = None if mask is None else (mask if perm is None else mask[:, perm]).T.contiguous()
    group_of = torch.arange(in_features, device=W.device) // g
    if perm is not None:
        group_of = group_of[perm]           # column k in processing order is in this group
    codes_t = torch.empty(in_features, out_features, dtype=torch.int8, device=W.device)
    if static is not None:
        scales, zeros = static.scale[..., 0].float(), None if static.zero is None else \
            static.zero[..., 0]
    else:
        scales = torch.empty(out_features, in_features // g, device=W.device)
        zeros = None if fmt.symmetric else torch.empty_like(scales, dtype=torch.int8)
    p = None
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        if static is not None:   # parameters of every column of the block, gathered once
            columns = group_of[i1:i2]
            block_p = GroupParams(fmt, scales, zeros, tensor_scale).map(
                lambda t, columns=columns: t.T[columns])
        for i in range(i2 - i1):
            if static is not None:
                p = block_p.map(lambda t, i=i: t[i])
            elif (i1 + i) % g == 0:   # first column of a group: parameters from the updated W
                ahead = W1[i:i + g] if i + g <= i2 - i1 else torch.cat([W1[i:], Wt[i2:]])[:g]
                col = i1 + i            # natural order here: act_order implies static
                p = qparams.group_params(ahead.T, fmt, tensor_scale, importance[col:col + g],
                                         scale_search).map(lambda t: t[:, 0])  # [O]
                scales[:, (i1 + i) // g] = p.scale
                if zeros is not None:
                    zeros[:, (i1 + i) // g] = p.zero
            q = c.encode(W1[i], p)
            codes_t[i1 + i] = q
            err = torch.div(W1[i] - c.decode(q, p), U1[i, i], out=Err1[i])
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)  # W[:, i:] -= err * Hinv[i, i:]
            if keep_t is not None:
                W1[i + 1:] *= keep_t[i1 + i + 1:i2]          # kept zeros stay zero
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)     # lazy update of later blocks
        if keep_t is not None:
            Wt[i2:] *= keep_t[i2:]
    codes = codes_t.T if perm is None else codes_t[torch.argsort(perm)].T
    return QuantizedWeight(fmt, codes.contiguous(), scales, zeros, tensor_scale), \
        GptqInfo(used, act_order)
