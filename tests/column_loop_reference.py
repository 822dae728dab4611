"""The column-by-column GPTQ and SparseGPT loops as they were before the restructure (one codec
call per column on W's columns, group parameters written per column): the references that
tests/test_gptq.py and tests/test_sparsify.py compare the restructured loops against."""
from __future__ import annotations

import torch

from compress.formats import GroupParams, QuantizedWeight, WeightFormat, codec
from compress.hessian import inverse_cholesky, prepare_hessian
from compress.passes.sparsify import nm_mask, unstructured_block


def _static_params(w: torch.Tensor, fmt: WeightFormat, g: int, gs):
    """Group parameters of the whole matrix up front ("static groups"). w: [O, I] ->
    scale, zero [O, I/g, 1]."""
    p = codec(fmt).group_params(w.reshape(w.shape[0], -1, g), fmt, gs)
    return p.scale, p.zero


def gptq_quantize_reference(w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat,
                            block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                            mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Same contract as gptq_quantize (without the info)."""
    c = codec(fmt)
    out_features, in_features = w.shape
    g = fmt.group_for(in_features)
    gs = c.tensor_scale(w, fmt)  # from the whole tensor first (NVFP4; None for others)
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
    U, _ = inverse_cholesky(H, damp)  # upper factor of H^-1

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
                p = c.group_params(ahead, fmt, gs)
                scale, zero = p.scale, p.zero
            p = GroupParams(fmt, scale, zero, gs)
            q = c.encode(W1[:, i:i + 1], p)
            dq = c.decode(q, p)[:, 0]
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
    return QuantizedWeight(fmt, codes, scales, zeros, gs)


def sparsegpt_prune_reference(w: torch.Tensor, H: torch.Tensor, n: int, m: int,
                    sparsity: float | None = None, block_size: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """SparseGPT: prune w [O, I] to N:M (m > 0) or to `sparsity` (m == 0), choosing by
    w^2 / [H^-1]_jj^2 and compensating each pruned column on the later ones through the
    Cholesky factor of H^-1 (Frantar and Alistarh 2023, Algorithm 1). H: [I, I]. Returns the
    pruned float32 weight."""
    H, W = prepare_hessian(H.float(), w.float())
    U, _ = inverse_cholesky(H, damp)
    columns = W.shape[1]
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        if m == 0:  # unstructured: one threshold over the block (the paper's adaptive mask)
            pruned = ~unstructured_block(W1 ** 2 / d ** 2, sparsity)
        else:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if m and i % m == 0:  # choose the N:M mask of the next m columns, updated so far
                scores = W1[:, i:i + m] ** 2 / d[i:i + m] ** 2
                pruned[:, i:i + m] = ~nm_mask(scores, n, m)
            w_col = W1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w_col), w_col)
            err = (w_col - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W
