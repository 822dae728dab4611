"""GPTQ's column loop over one block of INT weights in one Triton launch (issue 15: solve time).

The columns of a block are solved one after another, but the output rows are independent
given the block of U (Frantar et al. 2022): one program holds BLOCK_O rows' part of the block
(W^T [B, BLOCK_O], float32) in registers and runs all B columns: encode the column with its
fixed group parameters, store the codes and the scaled error, spread the error over the later
columns. The torch loop it replaces (gptq._solve_columns, a CUDA graph of ~12 small kernels a
column) took ~44 us a column on an H200: 37 s of the 102 s 32-layer GPTQ run
(evaluate/RESULTS.md, sixth session). Here a column is ~320 SASS instructions a thread,
compiled for sm_90 (kernels/compile_check.py); on the H200 the 32-layer run's solve went from
37.4 to 16.2 s with it (evaluate/RESULTS.md, seventh session).

INT formats with static group parameters (act_order or static_groups, the default) only;
everything else keeps the torch loop. Same arithmetic as compress/formats/intq.py encode /
decode (round half to even of an IEEE division, zero point added before the clamp); the error
update is one fused multiply-add per element where torch's addr_ rounds twice, so results
agree with the torch loop to float32 rounding, not bit for bit (tests/kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats.intq import int_range

BLOCK_O = 32      # output rows a program: 128 threads hold a [128, 32] float32 block


@triton.jit
def _round_half_even(x):
    # 1.5 * 2^23: adding it leaves no fraction bits, so float addition rounds x to an integer,
    # half to even; exact for |x| < 2^22, and beyond that x is clamped to the code range anyway
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, s_ptr, z_ptr, keep_ptr, codes_ptr, err_ptr,
                       n_out, NB, stride_u0, stride_u1,
                       QMIN: tl.constexpr, QMAX: tl.constexpr, B: tl.constexpr,
                       BLOCK_O: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_KEEP: tl.constexpr):
    # w, s, z, keep, codes, err: [NB, n_out] row-major (row i = column i of the block of W);
    # u: the block of U, [NB, NB] with strides (it is a transposed view)
    pid = tl.program_id(0)
    ro = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    rb = tl.arange(0, B)
    o_in = ro < n_out
    inside = (rb[:, None] < NB) & o_in[None, :]
    offs = rb[:, None] * n_out + ro[None, :]
    W = tl.load(w_ptr + offs, mask=inside, other=0.0)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + offs, mask=inside, other=0).to(tl.float32)
    for i in range(NB):
        w = tl.sum(tl.where(rb[:, None] == i, W, 0.0), axis=0)        # column i, [BLOCK_O]
        s = tl.load(s_ptr + i * n_out + ro, mask=o_in, other=1.0)
        q = _round_half_even(tl.math.div_rn(w, s))
        if HAS_ZERO:
            z = tl.load(z_ptr + i * n_out + ro, mask=o_in, other=0).to(tl.float32)
            q = tl.minimum(tl.maximum(q + z, QMIN), QMAX)
            dq = (q - z) * s
        else:
            q = tl.minimum(tl.maximum(q, QMIN), QMAX)
            dq = q * s
        tl.store(codes_ptr + i * n_out + ro, q.to(tl.int8), mask=o_in)
        err = tl.math.div_rn(w - dq, tl.load(u_ptr + i * stride_u0 + i * stride_u1))
        tl.store(err_ptr + i * n_out + ro, err, mask=o_in)
        u = tl.load(u_ptr + i * stride_u0 + rb * stride_u1, mask=(rb > i) & (rb < NB), other=0.0)
        W = W - u[:, None] * err[None, :]                  # W[:, i+1:] -= err * Hinv[i, i+1:]
        if HAS_KEEP:
            W = W * keep                                   # kept zeros stay zero


def gptq_block(W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None, keep: torch.Tensor | None, bits: int,
               codes: torch.Tensor) -> torch.Tensor:
    """The block's columns solved: writes codes (int8 [nb, O], may be a view of rows) and
    returns the scaled errors float32 [nb, O]. W1: float32 [nb, O] (W^T rows; left as given),
    U1: [nb, nb] (any strides), scale float32 / zero int8 / keep bool: [nb, O]."""
    nb, out_features = W1.shape
    assert nb <= 128 and codes.stride(1) == 1 and codes.stride(0) == out_features
    qmin, qmax = int_range(bits)
    err = torch.empty_like(W1)
    W1, scale = W1.contiguous(), scale.float().contiguous()
    _gptq_block_kernel[(triton.cdiv(out_features, BLOCK_O),)](
        W1, U1, scale, zero.contiguous() if zero is not None else scale,
        keep.contiguous() if keep is not None else scale, codes, err,
        out_features, nb, U1.stride(0), U1.stride(1),
        QMIN=qmin, QMAX=qmax, B=128, BLOCK_O=BLOCK_O, HAS_ZERO=zero is not None,
        HAS_KEEP=keep is not None, num_warps=4)
    return err


def gptq_block_ref(W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None, keep: torch.Tensor | None, bits: int,
                   codes: torch.Tensor) -> torch.Tensor:
    """The same in PyTorch, column by column (what gptq._solve_columns does for INT formats)."""
    from compress.formats import intq

    W1 = W1.clone()
    err = torch.empty_like(W1)
    for i in range(W1.shape[0]):
        z = None if zero is None else zero[i]
        codes[i] = intq.encode(W1[i], scale[i], z, bits)
        err[i] = (W1[i] - intq.decode(codes[i], scale[i], z)) / U1[i, i]
        W1[i + 1:] -= U1[i, i + 1:, None] * err[i][None, :]
        if keep is not None:
            W1[i + 1:] *= keep[i + 1:]
    return err
