"""Fused residual add + RMSNorm: h = x + residual; y = weight * (h / sqrt(mean(h^2) + eps)).

Returns (y, h): the normed output for the next sublayer and the updated residual stream, in one
pass over the row instead of three (add, norm statistics, scale). Matches transformers'
LlamaRMSNorm: statistics in float32, the normalized row cast to the input dtype, then times the
weight. One program per row; D (the hidden size) fits one block (up to 16384).

Also the rmsnorm pass's norms (compress/runtime/norms.py): weightless RMSNorm (weight None), and
CRMSNorm, the RMSNorm of a zero-mean vector of `crms_dim` values stored as its first D =
crms_dim - 1 (the last is minus their sum): mean square (sum h^2 + (sum h)^2) / crms_dim. Eager,
CRMSNorm is nine kernels a call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, D, stride_x, stride_r, eps, DIVISOR,
                        HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                        CENTERED: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    C.wait_for_producer(PDL)   # launched with programmatic dependent launch: see _common.PDL
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
    square = tl.sum(hf * hf, axis=0)
    if CENTERED:   # CRMSNorm: the implied last value is -sum(h)
        total = tl.sum(hf, axis=0)
        square += total * total
    rstd = 1.0 / tl.sqrt(square / DIVISOR + eps)
    if HAS_WEIGHT:
        normed = (hf * rstd).to(h_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(y_ptr + row * D + cols, (hf * rstd).to(y_ptr.dtype.element_ty), mask=inside)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                eps: float = 1e-6, crms_dim: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., D]; weight: [D] or None -> (y [..., D] in weight's promoted dtype (x's
    when weightless), h [..., D]). With residual None, h is x itself. crms_dim: CRMSNorm of a
    crms_dim-vector stored as its first D = crms_dim - 1 values (weightless)."""
    d = x.shape[-1]
    C.check(crms_dim is None or (crms_dim == d + 1 and weight is None),
            f"CRMSNorm stores dim - 1 values and has no weight: dim {crms_dim}, rows of {d}")
    if weight is not None:
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
    out_dtype = x.dtype if weight is None else torch.promote_types(weight.dtype, x.dtype)
    y = C.alloc((rows, d), out_dtype, x.device)
    h = C.alloc((rows, d), x.dtype, x.device) if residual is not None else x2
    if rows:
        block = C.next_pow2(d)
        _add_rmsnorm_kernel[(rows,)](
            x2, x2 if r2 is None else r2, x2 if weight is None else weight, y, h, d,
            x2.stride(0), 0 if r2 is None else r2.stride(0), eps, float(crms_dim or d),
            HAS_RESIDUAL=r2 is not None, HAS_WEIGHT=weight is not None,
            CENTERED=crms_dim is not None, BLOCK_D=block, num_warps=min(16, max(1, block // 256)),
            **C.pdl_args(x.device))
    return y.reshape(x.shape), h.reshape(x.shape)


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                    eps: float = 1e-6, crms_dim: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused computation, as transformers' LlamaRMSNorm after a residual add (weightless:
    torch's RMSNorm in float32; crms_dim: compress.runtime.norms.CRMSNorm)."""
    h = x if residual is None else x + residual
    hf = h.float()
    if crms_dim is not None:
        square = hf.pow(2).sum(-1, keepdim=True) + hf.sum(-1, keepdim=True).pow(2)
        return (hf * torch.rsqrt(square / crms_dim + eps)).to(h.dtype), h
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return normed.to(h.dtype), h
    return weight * normed.to(h.dtype), h
