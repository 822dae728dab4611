"""W4A16 (and W8A16): activations times group-wise integer weights, decoded in registers.

Reads compressed-tensors "pack-quantized" tensors exactly as stored (compress/formats/intq.py),
so loading needs no repack:
    weight_packed      int32 [N, ceil(K/P)]   P = 32/bits codes a word, element j at bits j*bits,
                                              stored as code + 2^(bits-1)
    weight_scale       float [N, K/g]         (float32, bfloat16 or float16)
    weight_zero_point  int32 [ceil(N/P), K/g] optional, packed the same way along N
w[n, k] = (code - zero) * scale[n, k // g]; y = x @ w^T (+ bias).

One entry point, `int_matmul`, picks the path by M (see compress/kernels/_common.py); M up to
DECODE_MAX_M runs the decode kernel of compress/kernels/decode.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C
from compress.kernels._common import apply_int_scale, mac_tile, store_tile
from compress.kernels.decode import FMT_INT, words_matmul


@triton.jit
def _unpack_words(words, BITS: tl.constexpr, PER: tl.constexpr, ROWS: tl.constexpr,
                  COLS: tl.constexpr):
    """int32 words [ROWS, COLS // PER] -> signed codes [ROWS, COLS] (element j at bits j*BITS)."""
    shifts = tl.arange(0, PER) * BITS
    vals = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(vals, (ROWS, COLS)) - (1 << (BITS - 1))


@triton.jit
def _int_tile(w_ptr, s_ptr, z_ptr, rn, k0, N, K, KW, G, GROUP,
              BITS: tl.constexpr, PER: tl.constexpr, HAS_ZERO: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decoded weights [BLOCK_N, BLOCK_K] float32 for rows rn, inputs k0.. (0 outside).
    k0 is a multiple of BLOCK_K, itself a multiple of PER, so tiles start on a word."""
    rk = k0 + tl.arange(0, BLOCK_K)
    rw = k0 // PER + tl.arange(0, BLOCK_K // PER)
    words = tl.load(w_ptr + rn[:, None] * KW + rw[None, :],
                    mask=(rn[:, None] < N) & (rw[None, :] < KW), other=0)
    q = _unpack_words(words, BITS, PER, BLOCK_N, BLOCK_K).to(tl.float32)
    inside = (rn[:, None] < N) & (rk[None, :] < K)
    grp = rk // GROUP
    return apply_int_scale(q, s_ptr, z_ptr, rn, grp, inside, G, BITS, PER, HAS_ZERO)


@triton.jit
def _int_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
                       M, N, K, KW, G, GROUP, stride_xm, stride_split, K_PER_SPLIT,
                       BITS: tl.constexpr, PER: tl.constexpr, HAS_ZERO: tl.constexpr,
                       HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + kk
        rk = k0 + tl.arange(0, BLOCK_K)
        w = _int_tile(w_ptr, s_ptr, z_ptr, rn, k0, N, K, KW, G, GROUP,
                      BITS, PER, HAS_ZERO, BLOCK_N, BLOCK_K)
        acc = mac_tile(acc, x_ptr, w, rm, rk, M, K, stride_xm, USE_DOT, IEEE)
    store_tile(acc, b_ptr, out_ptr, rm, rn, M, N, pid_k, stride_split, HAS_BIAS)


@triton.jit
def _int_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, G, GROUP,
                        BITS: tl.constexpr, PER: tl.constexpr, HAS_ZERO: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    w = _int_tile(w_ptr, s_ptr, z_ptr, rn, k0, N, K, KW, G, GROUP,
                  BITS, PER, HAS_ZERO, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rk[None, :] < K))


# ---------------------------------------------------------------------------------------------
# Host wrapper

def _check_int(packed, scale, zero, bits, n, k):
    per = 32 // bits
    C.check(bits in (4, 8), f"integer kernel supports 4 and 8 bits, not {bits}")
    C.check(packed.dtype == torch.int32 and packed.shape == (n, -(-k // per)),
            f"weight_packed must be int32 [{n}, {-(-k // per)}], got {packed.dtype} "
            f"{list(packed.shape)}")
    C.check(scale.dim() == 2 and scale.shape[0] == n and k % scale.shape[1] == 0,
            f"weight_scale must be [{n}, K/group] with the group dividing {k}, got "
            f"{list(scale.shape)}")
    if zero is not None:
        C.check(zero.dtype == torch.int32 and zero.shape == (-(-n // per), scale.shape[1]),
                f"weight_zero_point must be int32 [{-(-n // per)}, {scale.shape[1]}], got "
                f"{zero.dtype} {list(zero.shape)}")
    for t in (packed, scale) + (() if zero is None else (zero,)):
        C.check(t.is_contiguous(), "packed weight tensors must be contiguous")


def int_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None, shape: tuple[int, int], bits: int = 4,
               bias: torch.Tensor | None = None, path: str | None = None,
               split_k: int | None = None, config: C.Config | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(W [N, K])^T + bias -> [..., N] in x.dtype. path/split_k/config
    override the choice by M and the tuned config (tests, benchmarks, autotune use them)."""
    n, k = shape
    _check_int(packed, scale, zero, bits, n, k)
    x2 = C.activation_2d(x, k)
    m = x2.shape[0]
    path = path or C.choose_path(m, decode=True, device=x.device)
    per, groups = 32 // bits, scale.shape[1]
    common = dict(BITS=bits, PER=per, HAS_ZERO=zero is not None)
    zero_arg = packed if zero is None else zero
    if path == "decode":
        family = f"int{bits}" + ("-asym" if zero is not None else "")
        cfg = config or C.decode_config(family, m, n, k, x.device)
        y = words_matmul(x2, FMT_INT, packed, scale, zero, None, n, k, bits, k // groups, bias,
                         cfg, x.dtype)
        return y.reshape(*x.shape[:-1], n)
    if path == "dequant":
        w = int_dequantize(packed, scale, zero, shape, bits, x.dtype)
        y = torch.nn.functional.linear(x2, w, bias)
        return y.reshape(*x.shape[:-1], n)
    cfg, grid, k_per_split, out = C.launch_plan(path, m, n, k, split_k, x.dtype, x.device)
    split = grid[2]
    _int_matmul_kernel[grid](
        x2, packed, scale, zero_arg, bias if bias is not None else scale, out,
        m, n, k, packed.shape[1], groups, k // groups, x2.stride(0), m * n, k_per_split,
        HAS_BIAS=bias is not None, USE_DOT=path != "gemv", IEEE=C.dot_in_f32(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    y = C.split_sum(out, x.dtype) if split > 1 else out
    return y.reshape(*x.shape[:-1], n)


def int_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   shape: tuple[int, int], bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight decoded to dtype, [N, K] (the prefill path, then cuBLAS)."""
    n, k = shape
    _check_int(packed, scale, zero, bits, n, k)
    cfg = C.CONFIGS["dequant"]
    out = C.alloc((n, k), dtype, packed.device)
    grid = (-(-n // cfg.block_n), -(-k // cfg.block_k))
    _int_dequant_kernel[grid](packed, scale, packed if zero is None else zero, out,
                              n, k, packed.shape[1], scale.shape[1], k // scale.shape[1],
                              BITS=bits, PER=32 // bits, HAS_ZERO=zero is not None,
                              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                              num_warps=cfg.num_warps)
    return out


# ---------------------------------------------------------------------------------------------
# Reference

def _unpack_ref(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    vals = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*words.shape[:-1], words.shape[-1] * per)[..., :length] - (1 << (bits - 1))


def int_dequantize_ref(packed, scale, zero, shape, bits: int = 4) -> torch.Tensor:
    """float32 [N, K], written independently of compress.formats.intq (tests compare both)."""
    n, k = shape
    codes = _unpack_ref(packed, bits, k).float()
    if zero is not None:
        codes = codes - _unpack_ref(zero.T.contiguous(), bits, n).T.float().repeat_interleave(
            k // scale.shape[1], dim=1)
    return codes * scale.float().repeat_interleave(k // scale.shape[1], dim=1)


def int_matmul_ref(x, packed, scale, zero, shape, bits: int = 4, bias=None) -> torch.Tensor:
    """What int_matmul computes, in float32, cast to x.dtype."""
    w = int_dequantize_ref(packed, scale, zero, shape, bits)
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)
