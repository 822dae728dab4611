"""Tensor-core matmul for M = 17 .. ~511 rows (and the whole-weight dequantize) for weights packed
as 32-bit words of 4- or 8-bit codes: INT4/INT8 (sym, asym) and NVFP4/MXFP4, as stored.

Same tensors as the decode kernel (compress/kernels/decode.py): INT int32 [N, ceil(K/P)], FP4
uint8 [N, K/2] viewed as int32 [N, K/8] (nibble j of word i is element 8 i + j in both), scales
[N, K/g], INT zero points int32 [ceil(N/P), K/g] packed along N. No repack, no second copy.

One program owns a [BLOCK_M, BLOCK_N] output tile; per K-tile (kernels/NOTES.md, "tc path"):
  * the packed words are loaded as a [BLOCK_N, BLOCK_K / P] tile (rows contiguous along K:
    16-byte vector loads, coalesced), never one load per code;
  * code slot j of every word is decoded with decode.py's _decode_codes (INT: the 2^23 magic
    float, no int->float conversion; FP4: E2M1 as float16 bits), times the group scale read
    once per tile (group >= BLOCK_K: INT g128, per channel) or once per word (8 codes), then
    cast to the activation dtype: [BLOCK_N, WORDS] per slot, all elementwise;
  * the P slots are put in K order with tl.interleave (a join + reshape that keeps each
    thread's values in its own registers; the old kernels' [BN, W, P] reshape in float32 sent
    the tile through shared memory before the dot as well);
  * one tl.dot(x [BLOCK_M, BLOCK_K], w^T) per K-tile, float32 accumulation, num_stages
    pipelining of the word and activation loads;
  * split-K (config split_k > 1) adds K-slices into a zeroed float32 output with atomics.
float32 activations use an exact (IEEE) dot on float32 weights (see _common.dot_in_f32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C
from compress.kernels.decode import (
    FMT_INT,
    FMT_NVFP4,
    _decode_codes,
    _group_scale,
    _load_words,
)


@triton.jit
def _slot(words, j: tl.constexpr, s, z, FMT: tl.constexpr, BITS: tl.constexpr, DTYPE):
    """Code slot j of every word [BN, W] -> weights in DTYPE (s, z: [BN, 1] or [BN, W])."""
    return (_decode_codes(words, j, z, FMT, BITS) * s).to(DTYPE)


@triton.jit
def _weight_tile(words, s, z, FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                 DTYPE):
    """Packed words [BN, W] -> weights [BN, W * PER] in K order (code j of word i at column
    PER * i + j). interleave(a, b) puts a at even and b at odd columns, so slot order is the
    bit reversal of j: three interleaves for 8 codes a word, two for 4."""
    if PER == 4:
        even = tl.interleave(_slot(words, 0, s, z, FMT, BITS, DTYPE),
                             _slot(words, 2, s, z, FMT, BITS, DTYPE))
        odd = tl.interleave(_slot(words, 1, s, z, FMT, BITS, DTYPE),
                            _slot(words, 3, s, z, FMT, BITS, DTYPE))
    else:
        even = tl.interleave(tl.interleave(_slot(words, 0, s, z, FMT, BITS, DTYPE),
                                           _slot(words, 4, s, z, FMT, BITS, DTYPE)),
                             tl.interleave(_slot(words, 2, s, z, FMT, BITS, DTYPE),
                                           _slot(words, 6, s, z, FMT, BITS, DTYPE)))
        odd = tl.interleave(tl.interleave(_slot(words, 1, s, z, FMT, BITS, DTYPE),
                                          _slot(words, 5, s, z, FMT, BITS, DTYPE)),
                            tl.interleave(_slot(words, 3, s, z, FMT, BITS, DTYPE),
                                          _slot(words, 7, s, z, FMT, BITS, DTYPE)))
    return tl.interleave(even, odd)


@triton.jit
def _decoded_tile(w_ptr, s_ptr, z_ptr, gs, rn, n_in, k0, K, KW, G, GROUP,
                  FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                  HAS_ZERO: tl.constexpr, TILE_SCALE: tl.constexpr, EVEN: tl.constexpr,
                  BLOCK_K: tl.constexpr, DTYPE):
    """Weights [BN, BLOCK_K] of rows rn, inputs k0 .. k0 + BLOCK_K, in DTYPE. Outside the
    matrix the words and scales read as 0, so the weights there are 0 (or finite in rows
    >= N, which are never stored)."""
    rw = k0 // PER + tl.arange(0, BLOCK_K // PER)
    words = _load_words(w_ptr, rn, n_in, rw, KW, KW, EVEN)
    if TILE_SCALE:   # the tile lies in one group: one scale (and zero) per row
        s, z = _group_scale(s_ptr, z_ptr, gs, rn[:, None], k0 // GROUP,
                            n_in[:, None] & (rn[:, None] * 0 + k0 < K), G, FMT, BITS, PER,
                            HAS_ZERO)
    else:            # one per word: a word's codes share a group (group % P == 0)
        s, z = _group_scale(s_ptr, z_ptr, gs, rn[:, None], ((rw * PER) // GROUP)[None, :],
                            n_in[:, None] & (rw[None, :] < KW), G, FMT, BITS, PER, HAS_ZERO)
    return _weight_tile(words, s, z, FMT, BITS, PER, DTYPE)


@triton.jit
def _nvfp4_gs(gs_ptr, FMT: tl.constexpr):
    """The factor _group_scale multiplies NVFP4's E4M3 scales by: 2^14 (undoing the float16
    decode of E2M1) / the global scale, read on the device (no host sync: CUDA graphs)."""
    gs = 1.0
    if FMT == 1:
        gs = 16384.0 / tl.load(gs_ptr).to(tl.float32)
    return gs


@triton.jit
def _tc_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, gs_ptr,
                      M, N, K, KW, G, GROUP, stride_xm, K_PER_SPLIT,
                      FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                      HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      TILE_SCALE: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr = False, EVEN_N: tl.constexpr = False):
    # M-tiles are grid axis 0, so the programs sharing a weight tile run together (L2 reuse)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = rn < N
    m_in = rm < M
    gs = _nvfp4_gs(gs_ptr, FMT)
    # float32 activations: float32 weights and an exact dot (see _common.dot_in_f32)
    DTYPE: tl.constexpr = tl.float32 if IEEE else x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)   # y^T: see the dot below
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + kk
        w = _decoded_tile(w_ptr, s_ptr, z_ptr, gs, rn, n_in, k0, K, KW, G, GROUP, FMT, BITS,
                          PER, HAS_ZERO, TILE_SCALE, EVEN_K and EVEN_N, BLOCK_K, DTYPE)
        rk = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_in[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=m_in[:, None] & (rk[None, :] < K), other=0.0)
        # y^T[BN, BM] += w[BN, BK] @ x^T: the weight rows fill the MMA's 64-row side (few
        # activation rows are its narrow N side, no padding to 64), and on Hopper the decoded
        # tile is wgmma's register operand A (x^T, in shared memory, is B)
        if IEEE:
            acc = tl.dot(w, tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
    C.finish_tile(tl.trans(acc), b_ptr, out_ptr, rm, rn, m_in, n_in, N, pid_k, HAS_BIAS, ATOMIC)


@triton.jit
def _tc_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, gs_ptr, N, K, KW, G, GROUP,
                       FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                       HAS_ZERO: tl.constexpr, TILE_SCALE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole weight [N, K] in out_ptr's dtype, with the matmul's tile decoder."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    n_in = rn < N
    gs = _nvfp4_gs(gs_ptr, FMT)
    w = _decoded_tile(w_ptr, s_ptr, z_ptr, gs, rn, n_in, k0, K, KW, G, GROUP, FMT, BITS, PER,
                      HAS_ZERO, TILE_SCALE, False, BLOCK_K, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w,
             mask=n_in[:, None] & (rk[None, :] < K))


# ---------------------------------------------------------------------------------------------
# Host wrappers (arguments already checked by the format's wrapper, w4a16.py / fp4.py)

def check_config(cfg: C.Config, per: int) -> None:
    C.check(cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k >= max(32, per)
            and cfg.block_k & (cfg.block_k - 1) == 0,
            f"config {cfg}: the tc path needs block_m, block_n >= 16 and block_k a power of two "
            f">= 32")


def _tile_scale(groups: int, group: int, block_k: int) -> bool:
    """One scale per row and tile: per channel, or block_k divides the group."""
    return groups == 1 or group % block_k == 0


def tc_matmul(x2: torch.Tensor, fmt: int, words: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor | None, global_scale: torch.Tensor | None, n: int, k: int,
              bits: int, group: int, bias: torch.Tensor | None, cfg: C.Config,
              out_dtype: torch.dtype) -> torch.Tensor:
    """x2 [M, K] (contiguous rows) @ W^T -> [M, N] in out_dtype; arguments as decode's
    words_matmul (words int32 [N, KW], scale [N, G], FP4 scales as raw uint8 bits)."""
    m = x2.shape[0]
    per = 32 // bits
    check_config(cfg, per)
    groups = scale.shape[1]
    split, k_per_split, out = C.atomic_split_plan(m, n, k, cfg, out_dtype, x2.device)
    grid = (-(-m // cfg.block_m), -(-n // cfg.block_n), split)
    _tc_matmul_kernel[grid](
        x2, words, scale, zero if zero is not None else words,
        bias if bias is not None else x2, out,
        global_scale if fmt == FMT_NVFP4 else scale,
        m, n, k, words.shape[1], groups, group, x2.stride(0), k_per_split,
        FMT=fmt, BITS=bits, PER=per, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
        TILE_SCALE=_tile_scale(groups, group, cfg.block_k), IEEE=C.dot_in_f32(x2.dtype),
        ATOMIC=split > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % k_per_split == 0, EVEN_N=n % cfg.block_n == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(out_dtype) if split > 1 else out


def tc_dequantize(fmt: int, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  global_scale: torch.Tensor | None, n: int, k: int, bits: int, group: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The whole weight decoded to dtype, [N, K] (the prefill path, then cuBLAS)."""
    cfg = C.CONFIGS["dequant"]
    out = C.alloc((n, k), dtype, words.device)
    _tc_dequant_kernel[(-(-n // cfg.block_n), -(-k // cfg.block_k))](
        words, scale, zero if zero is not None else words, out,
        global_scale if fmt == FMT_NVFP4 else scale,
        n, k, words.shape[1], scale.shape[1], group,
        FMT=fmt, BITS=bits, PER=32 // bits, HAS_ZERO=zero is not None,
        TILE_SCALE=_tile_scale(scale.shape[1], group, cfg.block_k),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    return out


# ---------------------------------------------------------------------------------------------
# Reference (of the word view: what the kernel reads, decoded independently of decode.py)

def words_dequantize_ref(fmt: int, words: torch.Tensor, scale: torch.Tensor,
                         zero: torch.Tensor | None, global_scale: torch.Tensor | None, n: int,
                         k: int, bits: int, group: int) -> torch.Tensor:
    """float32 [N, K] from int32 words [N, KW] (code j of word i is element P i + j)."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    codes = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(n, -1)[:, :k]
    if fmt == FMT_INT:
        q = (codes - (1 << (bits - 1))).float()
        if zero is not None:
            zc = ((zero.T.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(zero.shape[1], -1)
            q = q - (zc[:, :n].T - (1 << (bits - 1))).float().repeat_interleave(group, dim=1)
        s = scale.float()
    else:
        mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], device=words.device)
        q = mags[codes & 7] * (1 - 2 * (codes >> 3)).float()
        if fmt == FMT_NVFP4:
            s = scale.view(torch.float8_e4m3fn).float() / global_scale.float()
        else:
            s = torch.exp2(scale.float() - 127)
    return q * s.repeat_interleave(group, dim=1)[:, :k]
