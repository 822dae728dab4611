"""Decode-size matmul (M = 1 .. ~128) for weights packed as 32-bit words of 4- or 8-bit codes.

INT4/INT8 (compressed-tensors pack-quantized, int32 [N, ceil(K/P)]) and NVFP4/MXFP4 (uint8
[N, K/2], viewed as int32 [N, K/8]: little-endian, so nibble j of word i is element 8 i + j in
both) share this one main loop; only the per-code decode and the scale differ.

Why this shape (kernels/NOTES.md has the byte/FLOP floors):
  * no tl.reshape of unpacked codes (it makes Triton shuffle the tile through shared memory):
    for code slot j of every word we load the activations at k = P*i + j (a strided read of x,
    which sits in L1) and multiply-add against the j-th codes of all words;
  * INT codes become floats without an int->float conversion (a quarter-rate instruction):
    (code | 0x4B000000) read as float32 is 2^23 + code, one subtraction removes 2^23 + offset
    + zero point (exact);
  * FP4 E2M1 codes become float16 bits ((c & 7) << 9 | sign << 15): the value times 2^-14,
    exact, also for the 0.5 subnormal; the 2^14 is folded into the per-group scale;
  * scales are read once per tile when a tile lies in one group (INT g128, per channel) and
    applied to the partial sum, else once per word (8 codes), never per element;
  * M == 1 decodes differently, with fewer instructions (kernels/NOTES.md v3): INT codes as float
    mantissas (_int_slot_dot), E2M1 as float32 bits scaled by 2^-126 (_fp4_as_f32);
  * M == 1 keeps a [BLOCK_N, WORDS] float32 accumulator and reduces across K only once at the
    end (no per-iteration warp reduction); M > 1 uses tensor-core tl.dot on [BLOCK_M, WORDS];
  * split-K, when a config asks for it, adds into a zeroed float32 output with atomics (no
    partial buffer and no separate reduction kernel over [S, M, N]).
No repack: rows of packed words are contiguous along K, which is what a row-per-program GEMV
reads coalesced. Launch configs come from compress/kernels/configs/*.json (see _common).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C

FMT_INT, FMT_NVFP4, FMT_MXFP4 = 0, 1, 2


@triton.jit
def _load_or_zero(ptrs, mask, MASKED: tl.constexpr):
    """tl.load, 0 where mask is False; not MASKED: no mask (one predicate a load less)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0)
    return tl.load(ptrs)


@triton.jit
def _group_scale(s_ptr, z_ptr, gs, rows, cols, mask, G, FMT: tl.constexpr, BITS: tl.constexpr,
                 PER: tl.constexpr, HAS_ZERO: tl.constexpr, MASKED: tl.constexpr = True):
    """(scale, zero) float32 for row indices `rows` and group columns `cols` (broadcast shapes).
    INT: scale as stored, zero point unpacked (0 when symmetric). FP4: the decoded group scale
    times 2^14 (undoing the float16 trick in _decode_codes), zero 0. MASKED False: no mask."""
    if FMT == 0:
        s = _load_or_zero(s_ptr + rows * G + cols, mask, MASKED).to(tl.float32)
        if HAS_ZERO:
            zw = _load_or_zero(z_ptr + (rows // PER) * G + cols, mask, MASKED)
            z = (((zw >> ((rows % PER) * BITS)) & ((1 << BITS) - 1))
                 - (1 << (BITS - 1))).to(tl.float32)
        else:
            z = tl.zeros_like(s)
    else:
        b = _load_or_zero(s_ptr + rows * G + cols, mask, MASKED).to(tl.int32)
        if FMT == 1:
            s = C.e4m3_to_f32(b) * gs
        else:
            s = C.e8m0_to_f32(b) * 16384.0
        z = tl.zeros_like(s)
    return s, z


@triton.jit
def _decode_codes(words, j: tl.constexpr, z, FMT: tl.constexpr, BITS: tl.constexpr):
    """Code slot j of every word -> float32, unscaled: INT code - zero, FP4 value * 2^-14."""
    c = (words >> (j * BITS)) & ((1 << BITS) - 1)
    if FMT == 0:
        return (c | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + (1 << (BITS - 1)) + z)
    else:
        h = (((c & 7) << 9) | ((c & 8) << 12)).to(tl.int16)
        return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _code_mantissas(words, j: tl.constexpr, one, BITS: tl.constexpr):
    """INT code slot j (and j + 1 for 4 bits) of every word as float32 mantissas, one shift and
    one LOP3 a code (`one` = 0x3F800000 in a register: LOP3 takes one immediate). 8 bits: (v, v)
    with v = 1 + c_j/256 (code at mantissa bits 15-22). 4 bits: (lo, hi) = (16 + c_j/16,
    1 + c_{j+1}/16): code j + 1 lands at bits 19-22 under exponent 2^0, code j at bits 15-18
    under exponent 2^4, so the code's weight is 1/16 in both."""
    if BITS == 8:
        sh: tl.constexpr = 15 - 8 * j     # code j -> mantissa bits 15-22
    else:
        sh: tl.constexpr = 15 - 4 * j     # code j -> bits 15-18, code j + 1 -> bits 19-22
    if sh >= 0:
        ws = words << sh
    else:
        ws = words >> (-sh)   # arithmetic: the sign copies land above bit 22, masked off
    if BITS == 8:
        lo = ((ws & 0x007F8000) | one).to(tl.float32, bitcast=True)
        hi = lo
    else:
        lo = ((ws & 0x00078000) | (one + 0x02000000)).to(tl.float32, bitcast=True)
        hi = ((ws & 0x00780000) | one).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _int_slot_dot(t, corr, xsum, words, x_ptr, rk_word, K, one, j: tl.constexpr,
                  BITS: tl.constexpr, EVEN_K: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Code slot j (and j + 1 for 4 bits) of every word [BN, W] against x: returns t, corr,
    xsum with t += x_k * v_k, corr += what the constant part of v_k adds (both per word column
    [W], shared by the rows), xsum += x_k (kept only for zero points). The caller finishes a
    tile with s * (2^B t - corr - z xsum) = s * sum_k x_k (c_k - 2^(B-1) - z).

    Why this shape (SASS counted, kernels/NOTES.md): _code_mantissas makes v = 1 + c/2^B (4
    bits: 16 + c/16 for the lower code of a shift) with no int->float conversion and no
    per-code subtraction, the same weight on c for both codes of a shift, so one accumulator.
    ~2.5 instructions a code against ~8 for shift/and/convert/subtract/FMA; the offsets in t are
    < 32x the signal, so its fp32 sum keeps >= 18 bits of it."""
    rk = rk_word + j
    xa = _load_x(x_ptr, rk, K, EVEN_K)
    lo, hi = _code_mantissas(words, j, one, BITS)
    if BITS == 8:
        t += xa[None, :] * lo
        corr += xa * 384.0          # 256 (the 1 in v) + 128 (the code offset)
        if HAS_ZERO:
            xsum += xa
    else:
        xb = _load_x(x_ptr, rk + 1, K, EVEN_K)
        t += xa[None, :] * lo
        t += xb[None, :] * hi
        corr += xa * 264.0 + xb * 24.0   # 16 * (16 xa + xb) + 8 * (xa + xb)
        if HAS_ZERO:
            xsum += xa + xb
    return t, corr, xsum


@triton.jit
def _fp4_as_f32(words, j: tl.constexpr):
    """E2M1 code slot j of every word as float32 bits: value * 2^-126, exact, in two shifts and
    one LOP3. The code's sign lands on bit 31, its 3 magnitude bits on bits 22-24 (the exponent's
    two low bits and the mantissa's top bit), which is float32's own encoding of E2M1 scaled by
    2^-126, the e = 0 codes (0, 0.5) as denormals. Triton's FMAs keep denormals (no .ftz), and the
    caller multiplies x by 2^64 first so the products stay normal floats."""
    top = words << (28 - 4 * j)           # the code in bits 28-31
    return ((top >> 6) & -0x7E400000).to(tl.float32, bitcast=True)   # mask 0x81C00000


@triton.jit
def _load_x(x_ptr, rk, K, EVEN_K: tl.constexpr):
    """Activations at inputs rk as float32 (0 from K on; EVEN_K: no bounds check)."""
    if EVEN_K:
        return tl.load(x_ptr + rk).to(tl.float32)
    return tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)


@triton.jit
def _load_words(w_ptr, rn, n_in, rw, KW, limit, EVEN: tl.constexpr):
    """Packed words [BN, W] of rows rn (row length KW) and word columns rw, 0 from column
    `limit` on (KW, or where a split's prefetch must stop). EVEN: inside the matrix, no bounds
    checks (one ISETP a load less)."""
    ptrs = w_ptr + rn[:, None] * KW + rw[None, :]
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=n_in[:, None] & (rw[None, :] < limit), other=0)


@triton.jit
def _words_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, gs_ptr,
                         M, N, K, KW, G, GROUP, stride_xm, K_PER_SPLIT, one_bits,
                         FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                         HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                         TILE_SCALE: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                         ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr = False,
                         EVEN_N: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                         GROUP_SHIFT: tl.constexpr = -1):
    WORDS: tl.constexpr = BLOCK_K // PER
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.arange(0, WORDS)
    n_in = rn < N
    gs = 1.0
    if FMT == 1:  # NVFP4: w = e2m1 * scale / global_scale; 2^14 undoes the float16 decode
        gs = 16384.0 / tl.load(gs_ptr).to(tl.float32)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # BLOCK_M == 1: reduce over K once, after the loop
        acc2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    if PREFETCH:
        ahead = _load_words(w_ptr, rn, n_in, pid_k * K_PER_SPLIT // PER + ri, KW, KW,
                            EVEN_K and EVEN_N)
        stop = tl.minimum(KW, (pid_k + 1) * K_PER_SPLIT // PER)   # this split's last word + 1
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + kk
        rw = k0 // PER + ri
        if PREFETCH:   # this tile came one iteration early; ask for the next one now
            words = ahead
            ahead = _load_words(w_ptr, rn, n_in, rw + WORDS, KW, stop, False)
        else:
            words = _load_words(w_ptr, rn, n_in, rw, KW, KW, EVEN_K and EVEN_N)
        if TILE_SCALE:  # the whole tile lies in one group: one scale per row
            s, z = _group_scale(s_ptr, z_ptr, gs, rn[:, None], k0 // GROUP,
                                n_in[:, None] & (rn[:, None] * 0 + k0 < K), G,
                                FMT, BITS, PER, HAS_ZERO)
        else:           # one scale per word (a word's codes share a group)
            if GROUP_SHIFT >= 0:   # a power-of-two group: a shift, not a division per word
                cols = (rw * PER) >> GROUP_SHIFT
            else:
                cols = (rw * PER) // GROUP
            # inside the matrix (EVEN): unmasked, as the words
            s, z = _group_scale(s_ptr, z_ptr, gs, rn[:, None], cols[None, :],
                                n_in[:, None] & (rw[None, :] < KW), G, FMT, BITS, PER,
                                HAS_ZERO, not (EVEN_K and EVEN_N))
        if USE_DOT:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PER):
                v = _decode_codes(words, j, z, FMT, BITS)
                if not TILE_SCALE:
                    v = v * s
                rk = k0 + ri * PER + j
                xj = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                             mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
                if IEEE:
                    part = tl.dot(xj.to(tl.float32), tl.trans(v), part, input_precision="ieee")
                else:
                    part = tl.dot(xj, tl.trans(v.to(xj.dtype)), part)
            if TILE_SCALE:
                acc += part * tl.reshape(s, (1, BLOCK_N))
            else:
                acc += part
        elif FMT == 0:   # M == 1, INT: see _int_slot_dot
            t = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            corr = tl.zeros((WORDS,), dtype=tl.float32)
            xsum = tl.zeros((WORDS,), dtype=tl.float32)
            rk_word = k0 + ri * PER
            for j in tl.static_range(0, PER, 1 if BITS == 8 else 2):
                t, corr, xsum = _int_slot_dot(t, corr, xsum, words, x_ptr + pid_m * stride_xm,
                                              rk_word, K, one_bits, j, BITS, EVEN_K, HAS_ZERO)
            if HAS_ZERO:
                acc2 += s * (t * (1 << BITS) - corr[None, :] - z * xsum[None, :])
            else:
                acc2 += s * (t * (1 << BITS) - corr[None, :])
        else:            # M == 1, FP4: see _fp4_as_f32; 2^48 = 2^(126-64) / 2^14 in s
            t = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            for j in tl.static_range(PER):
                rk = k0 + ri * PER + j
                xj = _load_x(x_ptr + pid_m * stride_xm, rk, K, EVEN_K)
                t += (xj * 18446744073709551616.0)[None, :] * _fp4_as_f32(words, j)
            acc2 += (t * 281474976710656.0) * s
    if not USE_DOT:
        acc = tl.reshape(tl.sum(acc2, axis=1), (1, BLOCK_N))
    C.finish_tile(acc, b_ptr, out_ptr, rm, rn, rm < M, n_in, N, pid_k, HAS_BIAS, ATOMIC)


def group_shift(group: int) -> int:
    """log2(group) for a power-of-two group (per-word scale columns by a shift: a division per
    word was a quarter of the M = 1 loop's SASS, 953 -> 705 on the 8x2048 tile), else -1."""
    return group.bit_length() - 1 if group > 0 and group & (group - 1) == 0 else -1


def words_matmul(x2: torch.Tensor, fmt: int, words: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, global_scale: torch.Tensor | None, n: int, k: int,
                 bits: int, group: int, bias: torch.Tensor | None, cfg: C.Config,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """x2 [M, K] (contiguous rows) @ W^T -> [M, N] in out_dtype. words: int32 [N, KW]; scale
    [N, G] (FP4: raw bits as uint8); arguments already checked by the format's wrapper."""
    m = x2.shape[0]
    per = 32 // bits
    use_dot = cfg.block_m > 1
    C.check(not use_dot or (cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k // per >= 16),
            f"config {cfg}: tensor-core tiles need block_m, block_n >= 16 and block_k >= "
            f"{16 * per}")
    C.check(cfg.block_k % per == 0 and (cfg.block_k & (cfg.block_k - 1)) == 0,
            f"config {cfg}: block_k must be a power of two and a multiple of {per}")
    groups = scale.shape[1]
    tile_scale = groups == 1 or group % cfg.block_k == 0
    split, k_per_split, out = C.atomic_split_plan(m, n, k, cfg, out_dtype, x2.device)
    grid_m, grid_n = -(-m // cfg.block_m), -(-n // cfg.block_n)
    # NVFP4's global scale stays a device tensor read in the kernel (no host sync: CUDA graphs)
    gs = global_scale if fmt == FMT_NVFP4 else scale
    _words_matmul_kernel[(grid_m, grid_n, split)](
        x2, words, scale, zero if zero is not None else words,
        bias if bias is not None else x2, out,
        gs,
        m, n, k, words.shape[1], groups, group, x2.stride(0), k_per_split,
        0x3F800000,   # float32 1.0 as a runtime value: kept in a register (see _int_slot_dot)
        FMT=fmt, BITS=bits, PER=per, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
        TILE_SCALE=tile_scale, USE_DOT=use_dot, IEEE=C.dot_in_f32(x2.dtype),
        ATOMIC=split > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % k_per_split == 0, EVEN_N=n % cfg.block_n == 0,
        PREFETCH=not use_dot and cfg.num_stages > 2,   # M=1: registers, not Triton's pipeline
        GROUP_SHIFT=group_shift(group),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(out_dtype) if split > 1 else out
