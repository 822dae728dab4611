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

from compress.formats import QuantizedWeight, WeightFormat, codec
from compress.hessian import inverse_cholesky, prepare_hessian


@dataclass
class GptqInfo:
    damp: float            # damping actually used (escalated when the factorization failed)
    act_order: bool


def _static_params(w: torch.Tensor, fmt: WeightFormat, g: int, gs):
    """Group parameters of the whole matrix up front ("static groups"). w: [O, I] ->
    scale, zero [O, I/g, 1]."""
    c = codec(fmt)
    wg = w.reshape(w.shape[0], -1, g)
    return c.group_params(wg, fmt, gs) if gs is not None else c.group_params(wg, fmt)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False,
                  mask: torch.Tensor | None = None, name: str = "") -> tuple[QuantizedWeight,
                                                                            GptqInfo]:
    """w: [O, I], H: [I, I] (2/n sum x x^T), mask: bool [O, I] of weights allowed to be non-zero.
    Returns the quantized weight (same layout as round-to-nearest) and what was used.

    Without act_order, group parameters are taken from the already-updated weights when the
    column loop reaches each group (as in the paper). With act_order, columns are processed in
    order of decreasing H[i, i] but group parameters are fixed from the original weights first
    ("static groups", llm-compressor's actorder=weight): the stored layout stays the plain
    [O, I/g] one, so no weight_g_idx is needed and every kernel reads it unchanged.
    Raises CompressError when the Hessian cannot be factorized at any damping."""
    c = codec(fmt)
    out_features, in_features = w.shape
    g = fmt.group_for(in_features)
    gs = c.global_scale(w) if fmt.type == "nvfp4" else None  # from the whole tensor first
    gs_kw = {"global_scale": gs} if gs is not None else {}
    H, W = prepare_hessian(H.float(), w.float())
    if mask is not None:
        mask = mask.to(torch.bool)
        W = W * mask
    static = _static_params(W, fmt, g, gs) if act_order else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else \
        torch.arange(in_features, device=W.device)
    order = perm.tolist()   # one device-to-host copy, not one .item() per column
    W, H = W[:, perm], H[perm][:, perm]
    mask_p = mask[:, perm] if mask is not None else None
    U, used = inverse_cholesky(H, damp, name=name)  # upper factor of H^-1

    # Every buffer lives where W and H do (the calibration device): nothing is created on the
    # CPU by default, which is what made GPTQ fail on CUDA.
    dev = W.device
    codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=dev)
    scales = torch.zeros(out_features, in_features // g, device=dev)
    zeros = None if fmt.symmetric else torch.zeros(out_features, in_features // g,
                                                   dtype=torch.int8, device=dev)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros(out_features, i2 - i1, device=dev), \
            U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]                 # original column index
            group = col // g
            if static is not None:
                scale, zero = static[0][:, group], (None if static[1] is None
                                                    else static[1][:, group])
            elif col % g == 0:                 # first column of a group: fix its parameters
                ahead = W1[:, i:i + g] if i + g <= i2 - i1 else \
                    torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                scale, zero = c.group_params(ahead, fmt, **gs_kw)
            q = c.encode(W1[:, i:i + 1], scale, zero, fmt, **gs_kw)
            dq = c.decode(q, scale, zero, **gs_kw)[:, 0]
            codes[:, col] = q[:, 0]
            scales[:, group] = scale[:, 0]
            if zeros is not None:
                zeros[:, group] = zero[:, 0]
            err = (W1[:, i] - dq) / U1[i, i]
            W1[:, i:] -= err[:, None] @ U1[i, i:][None, :]   # W[:, i:] -= err * Hinv[i, i:]
            if mask_p is not None:
                W1[:, i:] *= mask_p[:, i1 + i:i2]           # kept zeros stay zero
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]                   # lazy update of later blocks
        if mask_p is not None:
            W[:, i2:] *= mask_p[:, i2:]
    return QuantizedWeight(fmt, codes, scales, zeros, gs), GptqInfo(used, act_order)
