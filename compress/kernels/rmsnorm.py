"""Fused residual add + RMSNorm: h = x + residual; y = weight * (h / sqrt(mean(h^2) + eps)).

Returns (y, h): the normed output for the next sublayer and the updated residual stream, in one
pass over the row instead of three (add, norm statistics, scale). Matches transformers'
LlamaRMSNorm: statistics in float32, the normalized row cast to the input dtype, then times the
weight. One program per row; D (the hidden size) fits one block (up to 16384).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, D, stride_x, stride_r, eps,
                        HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    hf = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # added in float32 and rounded to the stream's dtype, as torch's unfused add does
        r = tl.load(r_ptr + row * stride_r + cols, mask=inside, other=0.0).to(tl.float32)
        h = (hf + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * D + cols, h, mask=inside)
        hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
    normed = (hf * rstd).to(h_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=inside)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., D]; weight: [D] -> (y [..., D] in weight's promoted dtype, h [..., D]).
    With residual None, h is x itself."""
    d = x.shape[-1]
    C.check(weight.shape == (d,), f"norm weight must be [{d}], got {list(weight.shape)}")
    C.check(d <= 16384, f"add_rmsnorm handles rows up to 16384 wide, got {d}")
    if residual is not None:
        C.check(residual.shape == x.shape and residual.dtype == x.dtype,
                f"residual must match x ({list(x.shape)}, {x.dtype}), got "
                f"{list(residual.shape)}, {residual.dtype}")
    x2 = x.reshape(-1, d)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r2 = None if residual is None else residual.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = C.alloc((rows, d), out_dtype, x.device)
    h = C.alloc((rows, d), x.dtype, x.device) if residual is not None else x2
    if rows:
        block = C.next_pow2(d)
        _add_rmsnorm_kernel[(rows,)](
            x2, x2 if r2 is None else r2, weight, y, h, d, x2.stride(0),
            0 if r2 is None else r2.stride(0), eps, HAS_RESIDUAL=r2 is not None,
            BLOCK_D=block, num_warps=min(16, max(1, block // 256)))
    return y.reshape(x.shape), h.reshape(x.shape)


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused computation, as transformers' LlamaRMSNorm after a residual add."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * normed, h
