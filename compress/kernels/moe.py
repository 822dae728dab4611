"""Grouped decode matmul for mixture-of-experts: every routed (token, slot) row times its expert.

    y[r] = x[r // rows_per_x] @ W[ids[r]]^T        r = 0 .. R-1, R = ids.numel()

The experts' compressed-tensors tensors are stacked along a leading expert axis, otherwise as
stored (compress/kernels/w4a16.py, fp4.py):
    packed        INT int32 [E, N, ceil(K/P)]; FP4 uint8 [E, N, K/2] (read as int32 [E, N, K/8])
    scale         [E, N, G] (INT: float; NVFP4: float8_e4m3fn; MXFP4: uint8 E8M0)
    zero          int32 [E, ceil(N/P), G] or None (INT with zero points, packed along N)
    global_scale  float32 [E, S] (NVFP4): the N rows are S equal segments, each with its own
                  global scale (S = 2 for gate and up stacked as one [2F, K] weight)
The expert of each row is read from `ids` in the kernel, on the device: no host sync, so the
launch can be captured in a CUDA graph (the per-expert loop of compress/runtime/moe.py needs
torch.where per expert). Rows whose id lies outside [0, E) (transformers' masked slots) are 0.

Design: each program owns one row r and BLOCK_N outputs and runs decode.py's M = 1 scheme
(its _group_scale and _decode_codes, a [BLOCK_N, WORDS] float32 accumulator reduced across K
once) on expert ids[r]'s tiles. At decode sizes (R = tokens x top_k, up to a few hundred) the
rows of one expert are few, so a tensor-core tile over them would be mostly padding. Rows are
the fastest grid axis: the R programs of one N block are consecutive, so rows that share an
expert read its tiles at about the same time and all but the first read come from L2.
Launch config: the "moe" table's M = 1 config of the per-expert shape (N, K)
(compress.kernels._common.kernel_config, bucket m1): block_n, block_k, num_warps, num_stages;
split_k is not used (R x N / block_n programs already fill the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C
from compress.kernels.decode import FMT_INT, FMT_MXFP4, FMT_NVFP4, _decode_codes, _group_scale
from compress.kernels.fp4 import FORMATS as FP4_GROUP   # format -> group size (format table)

FMTS = {"int": FMT_INT, "nvfp4": FMT_NVFP4, "mxfp4": FMT_MXFP4}


@triton.jit
def _grouped_matmul_kernel(x_ptr, ids_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, out_ptr,
                           N, K, KW, G, GROUP, E, ROWS_PER_X, SEG_N, SEGS, stride_xm,
                           FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                           HAS_ZERO: tl.constexpr, TILE_SCALE: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_K // PER
    r, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + r).to(tl.int64)
    valid = (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.arange(0, WORDS)
    n_in = rn < tl.where(valid, N, 0)   # a masked row reads nothing (its codes, scales: 0)
    # this expert's tensors
    w_e = w_ptr + e * N * KW
    s_e = s_ptr + e * N * G
    z_e = z_ptr + e * ((N + PER - 1) // PER) * G
    x_row = x_ptr + (r // ROWS_PER_X) * stride_xm
    gs = 1.0
    if FMT == 1:  # NVFP4: one global scale per row segment; 2^14 undoes the float16 decode
        seg = rn[:, None] // SEG_N
        gs = 16384.0 / tl.load(gs_ptr + e * SEGS + seg, mask=n_in[:, None], other=1.0)
    acc2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rw = k0 // PER + ri
        inside = n_in[:, None] & (rw[None, :] < KW)
        words = tl.load(w_e + rn[:, None] * KW + rw[None, :], mask=inside, other=0)
        if TILE_SCALE:  # the whole tile lies in one group: one scale per row
            s, z = _group_scale(s_e, z_e, gs, rn[:, None], k0 // GROUP, n_in[:, None], G,
                                FMT, BITS, PER, HAS_ZERO)
        else:           # one scale per word (a word's codes share a group)
            s, z = _group_scale(s_e, z_e, gs, rn[:, None], ((rw * PER) // GROUP)[None, :],
                                inside, G, FMT, BITS, PER, HAS_ZERO)
        t = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        for j in tl.static_range(PER):
            v = _decode_codes(words, j, z, FMT, BITS)
            rk = k0 + ri * PER + j
            xj = tl.load(x_row + rk, mask=rk < K, other=0.0)
            t += xj.to(tl.float32)[None, :] * v
        acc2 += t * s
    acc = tl.sum(acc2, axis=1)
    tl.store(out_ptr + r * N + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


# ---------------------------------------------------------------------------------------------
# Host wrapper

def _check(x, ids, fmt, packed, scale, zero, global_scale, bits, rows_per_x) -> tuple[int, int]:
    """(N, group size); one-line errors for what a caller can get wrong."""
    C.check(fmt in FMTS, f"unknown format {fmt!r}; use {' or '.join(FMTS)}")
    C.check(x.dim() == 2, f"x must be [rows, K], got {list(x.shape)}")
    C.check(ids.dim() == 1 and ids.dtype in (torch.int32, torch.int64)
            and ids.numel() == x.shape[0] * rows_per_x,
            f"ids must be int32/int64 [{x.shape[0] * rows_per_x}] (x rows x rows_per_x), got "
            f"{ids.dtype} {list(ids.shape)}")
    C.check(packed.dim() == 3 and scale.dim() == 3 and scale.shape[:2] == packed.shape[:2],
            f"packed [E, N, words] and scale [E, N, G] must agree, got {list(packed.shape)} "
            f"and {list(scale.shape)}")
    e, n, k, groups = packed.shape[0], packed.shape[1], x.shape[1], scale.shape[2]
    C.check(k % groups == 0, f"{groups} scale groups do not divide K = {k}")
    if fmt == "int":
        per = 32 // bits
        C.check(bits in (4, 8), f"integer weights have 4 or 8 bits, not {bits}")
        C.check(packed.dtype == torch.int32 and packed.shape[2] == -(-k // per),
                f"INT packed must be int32 [E, N, {-(-k // per)}], got {packed.dtype} "
                f"{list(packed.shape)}")
        if zero is not None:
            C.check(zero.dtype == torch.int32 and zero.shape == (e, -(-n // per), groups),
                    f"zero points must be int32 [{e}, {-(-n // per)}, {groups}], got "
                    f"{zero.dtype} {list(zero.shape)}")
    else:
        C.check(zero is None and bits == 4, f"{fmt} has 4-bit codes and no zero points")
        C.check(packed.dtype == torch.uint8 and packed.shape[2] * 2 == k and k % 8 == 0,
                f"{fmt} packed must be uint8 [E, N, {k // 2}] with K % 8 == 0, got "
                f"{list(packed.shape)}")
        C.check(k // groups == FP4_GROUP[fmt], f"{fmt} has groups of {FP4_GROUP[fmt]}, the "
                f"scales give {k // groups}")
    if fmt == "nvfp4":
        C.check(global_scale is not None and global_scale.dim() == 2
                and global_scale.shape[0] == e and n % global_scale.shape[1] == 0,
                f"nvfp4 needs global_scale float32 [{e}, S] with S dividing N = {n}")
    tensors = (x, ids, packed, scale) + tuple(t for t in (zero, global_scale) if t is not None)
    C.check(all(t.device == x.device for t in tensors), "all tensors must be on x's device")
    C.check(all(t.is_contiguous() for t in tensors[1:]), "stacked tensors must be contiguous")
    return n, k // groups


def grouped_matmul(x: torch.Tensor, ids: torch.Tensor, fmt: str, packed: torch.Tensor,
                   scale: torch.Tensor, zero: torch.Tensor | None = None,
                   global_scale: torch.Tensor | None = None, bits: int = 4,
                   rows_per_x: int = 1, config: C.Config | None = None) -> torch.Tensor:
    """y [R, N] in x.dtype, y[r] = x[r // rows_per_x] @ W[ids[r]]^T; x [R / rows_per_x, K],
    ids [R] (int on x's device; outside [0, E): a zero row). fmt: "int", "nvfp4", "mxfp4";
    tensors as in the module docstring. config: a decode config (block_n, block_k, num_warps,
    num_stages), else the tuned M = 1 config of the per-expert shape."""
    n, group = _check(x, ids, fmt, packed, scale, zero, global_scale, bits, rows_per_x)
    k = x.shape[1]
    per = 32 // bits
    if config is None:
        family = fmt if fmt != "int" else f"int{bits}" + ("-asym" if zero is not None else "")
        config = C.kernel_config("moe", family, 1, n, k, x.device)
    C.check(config.block_k % per == 0 and config.block_k & (config.block_k - 1) == 0
            and config.block_n & (config.block_n - 1) == 0,
            f"config {config}: block_n and block_k must be powers of two, block_k a multiple "
            f"of {per}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    words = packed if fmt == "int" else packed.view(torch.int32)   # nibble j of word i: 8i + j
    rows = ids.numel()
    out = C.alloc((rows, n), x.dtype, x.device)
    if rows == 0:
        return out
    gs = global_scale if fmt == "nvfp4" else scale   # unused unless NVFP4
    segments = global_scale.shape[1] if fmt == "nvfp4" else 1
    groups = scale.shape[2]
    _grouped_matmul_kernel[(rows, triton.cdiv(n, config.block_n))](
        x, ids, words, scale.view(torch.uint8) if fmt != "int" else scale,
        zero if zero is not None else words, gs, out,
        n, k, words.shape[2], groups, group, packed.shape[0], rows_per_x, n // segments,
        segments, x.stride(0),
        FMT=FMTS[fmt], BITS=bits, PER=per, HAS_ZERO=zero is not None,
        TILE_SCALE=groups == 1 or group % config.block_k == 0,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


# ---------------------------------------------------------------------------------------------
# Reference

def expert_weights_ref(fmt: str, packed, scale, zero, global_scale, k: int,
                       bits: int = 4) -> torch.Tensor:
    """Every expert's weight decoded, float32 [E, N, K] (by the per-format references)."""
    from compress.kernels.fp4 import fp4_dequantize_ref
    from compress.kernels.w4a16 import int_dequantize_ref

    e, n = packed.shape[:2]
    if fmt == "int":
        return torch.stack([int_dequantize_ref(packed[i], scale[i],
                                               None if zero is None else zero[i], (n, k), bits)
                            for i in range(e)])
    one = torch.ones(1, device=packed.device)
    w = torch.stack([fp4_dequantize_ref(fmt, packed[i], scale[i], one, (n, k))
                     for i in range(e)])
    if fmt == "nvfp4":   # scale / global_scale of each row's segment
        w = w / global_scale.float().repeat_interleave(n // global_scale.shape[1], dim=1)[..., None]
    return w


def grouped_matmul_ref(x, ids, fmt, packed, scale, zero=None, global_scale=None, bits=4,
                       rows_per_x=1) -> torch.Tensor:
    """What grouped_matmul computes, in float32, cast to x.dtype."""
    w = expert_weights_ref(fmt, packed, scale, zero, global_scale, x.shape[1], bits)
    valid = (ids >= 0) & (ids < w.shape[0])
    xr = x.float().repeat_interleave(rows_per_x, dim=0)                 # [R, K]
    y = torch.bmm(w[ids.clamp(0, w.shape[0] - 1)], xr[:, :, None])[..., 0]   # [R, N]
    return torch.where(valid[:, None], y, 0.0).to(x.dtype)
