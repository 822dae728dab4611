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
  * M == 1 has its own kernel, _gemv_kernel, with fewer instructions a code: INT codes as float
    mantissas (_int_slot_dot), E2M1 as float32 bits scaled by 2^-126 (_fp4_as_f32); a
    transposed [WORDS, BLOCK_N] tile (a thread owns word columns of all rows, so x is loaded
    once for BLOCK_N rows and nothing goes through shared memory), a float32 accumulator
    reduced across K only once at the end; M > 1 uses tensor-core tl.dot on [BLOCK_M, WORDS];
  * split-K, when a config asks for it, in one launch: each K-slice stores its float32
    partial, the last slice of a tile to finish sums them and runs the epilogue
    (_common.split_total): no zero fill, no reduction kernel, no cast afterwards.
No repack: rows of packed words are contiguous along K; a warp reads 32 consecutive words of a
row per load (coalesced). Launch configs come from compress/kernels/configs/*.json (see _common).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C

FMT_INT, FMT_NVFP4, FMT_MXFP4 = 0, 1, 2
# M = 1, INT4: x of a word column in one load (_int4_x8_dot) instead of 8 scalar loads. On since
# its H200 A/B (2026-12-04, kernels/BENCHMARKS.md; bench_kernels.py variant "@no-x8" is the old
# loads): as fast or faster on all four Llama shapes, down_proj 19.2 -> 17.9 us, asym 2-13%.
X8_LOADS = True
# The same for FP4 (NVFP4, MXFP4: _fp4_x8_dot). On since its H200 A/B (2026-12-04: NVFP4 M = 1
# 2-9% faster on the four Llama shapes, MXFP4 0-3%; bench_kernels.py "@no-fp4-x8" is the old).
X8_LOADS_FP4 = True
# M = 1: words 2p and 2p + 1 of a row read as one 64-bit element (the words viewed as int64):
# one load for both, and, as both lie in one scale group, one scale (and zero point) for both.
# The loop's loads a K-tile, INT4 8 x 1024 tile: 34 -> 18 (compile_check --sass), in the same
# layout (no shared memory), but 48 -> 62 registers. Its H200 A/B on the configs tuned without
# it (2026-12-04, kernels/BENCHMARKS.md) went either way by format and shape (NVFP4 +5-10%, INT4
# asym up to -18%), so the launch config says (Config.pair, tuned); None follows the config,
# True / False force it (bench_kernels "@pair" / "@no-pair").
PAIR_WORDS: bool | None = None


@triton.jit
def _load_or_zero(ptrs, mask, MASKED: tl.constexpr):
    """tl.load, 0 where mask is False; not MASKED: no mask (one predicate a load less)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0)
    return tl.load(ptrs)


@triton.jit
def _group_scale(s_ptr, z_ptr, gs, rows, cols, mask, G, FMT: tl.constexpr, BITS: tl.constexpr,
                 PER: tl.constexpr, HAS_ZERO: tl.constexpr, MASKED: tl.constexpr = True,
                 SCALAR: tl.constexpr = False, row0=0):
    """(scale, zero) float32 for rows row0 + `rows` and group columns `cols` (broadcast shapes).
    INT: scale as stored, zero point unpacked (0 when symmetric). FP4: the decoded group scale
    times 2^14 (undoing the float16 trick in _decode_codes), zero 0. MASKED False: no mask.
    SCALAR: 2-D offsets loaded one element a thread (the M = 1 kernel's layout, _gemv_kernel)."""
    s_ptr += row0 * G   # a scalar base: small per-element offsets (see _gemv_kernel)
    offs = rows * G + cols
    if SCALAR:
        offs = tl.max_contiguous(offs, [1, 1])
    if FMT == 0:
        s = _load_or_zero(s_ptr + offs, mask, MASKED).to(tl.float32)
        if HAS_ZERO:
            rows = row0 + rows
            zoffs = (rows // PER) * G + cols
            if SCALAR:
                zoffs = tl.max_contiguous(zoffs, [1, 1])
            zw = _load_or_zero(z_ptr + zoffs, mask, MASKED)
            z = (((zw >> ((rows % PER) * BITS)) & ((1 << BITS) - 1))
                 - (1 << (BITS - 1))).to(tl.float32)
        else:
            z = tl.zeros_like(s)
    else:
        b = _load_or_zero(s_ptr + offs, mask, MASKED).to(tl.int32)
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
def _int_slot_dot(t, corr, xsum, words, x_at, k_at, K, one, j: tl.constexpr,
                  BITS: tl.constexpr, EVEN_K: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Code slot j (and j + 1 for 4 bits) of every word [W, BN] against x: returns t, corr,
    xsum with t += x_k * v_k, corr += what the constant part of v_k adds (both per word column
    [W, 1], shared by the rows), xsum += x_k (kept only for zero points). x_at / k_at: x's
    pointers / indices of slot 0 of each word column [W, 1]. The caller finishes a tile with
    s * (2^B t - corr - z xsum) = s * sum_k x_k (c_k - 2^(B-1) - z).

    Why this shape (SASS counted, kernels/NOTES.md): _code_mantissas makes v = 1 + c/2^B (4
    bits: 16 + c/16 for the lower code of a shift) with no int->float conversion and no
    per-code subtraction, the same weight on c for both codes of a shift, so one accumulator.
    ~2.5 instructions a code against ~8 for shift/and/convert/subtract/FMA; the offsets in t are
    < 32x the signal, so its fp32 sum keeps >= 18 bits of it."""
    xa = _load_x(x_at + j, k_at + j, K, EVEN_K)
    lo, hi = _code_mantissas(words, j, one, BITS)
    if BITS == 8:
        t += xa * lo
        corr += xa * 384.0          # 256 (the 1 in v) + 128 (the code offset)
        if HAS_ZERO:
            xsum += xa
    else:
        xb = _load_x(x_at + (j + 1), k_at + (j + 1), K, EVEN_K)
        t += xa * lo
        t += xb * hi
        corr += xa * 264.0 + xb * 24.0   # 16 * (16 xa + xb) + 8 * (xa + xb)
        if HAS_ZERO:
            xsum += xa + xb
    return t, corr, xsum


@triton.jit
def _int4_pair_dot(t, words, j: tl.constexpr, xa, xb, one):
    """t += x_j v_j + x_{j+1} v_{j+1} for INT4 code slots j, j + 1 (_code_mantissas), xa / xb [W].
    Two statements: written as one sum of products, the compiler did not fuse them into FFMAs."""
    lo, hi = _code_mantissas(words, j, one, 4)
    t += xa[:, None] * lo
    t += xb[:, None] * hi
    return t


@triton.jit
def _x8_slots(x_at, k_at, K, EVEN_K: tl.constexpr):
    """x at the 8 code slots of each word column (x_at, k_at [W, 1]: slot 0's pointer and
    input), read as one [W, 8] tile (a 16-byte load a thread where x is aligned) and split into
    8 float32 vectors [W] in registers, instead of 8 scalar loads: the M = 1 kernel is limited
    by L1 load instructions (H200 ncu: L1/TEX 71% busy, kernels/NOTES.md)."""
    r8 = tl.arange(0, 8)[None, :]
    if EVEN_K:
        x8 = tl.load(x_at + r8)
    else:
        x8 = tl.load(x_at + r8, mask=k_at + r8 < K, other=0.0)
    x8 = x8.to(tl.float32)
    even, odd = tl.split(tl.reshape(x8, (x8.shape[0], 4, 2)))   # slots 0 2 4 6 | 1 3 5 7
    e04, e26 = tl.split(tl.reshape(even, (x8.shape[0], 2, 2)))
    o15, o37 = tl.split(tl.reshape(odd, (x8.shape[0], 2, 2)))
    x0, x4 = tl.split(e04)
    x2, x6 = tl.split(e26)
    x1, x5 = tl.split(o15)
    x3, x7 = tl.split(o37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _int4_x8_dot(t, words, x_at, k_at, K, one, EVEN_K: tl.constexpr):
    """_int_slot_dot for all 8 slots of INT4 words [W, BN] at once, x by _x8_slots. Returns t,
    corr, xsum as _int_slot_dot."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _x8_slots(x_at, k_at, K, EVEN_K)
    t = _int4_pair_dot(t, words, 0, x0, x1, one)
    t = _int4_pair_dot(t, words, 2, x2, x3, one)
    t = _int4_pair_dot(t, words, 4, x4, x5, one)
    t = _int4_pair_dot(t, words, 6, x6, x7, one)
    xa = x0 + x2 + x4 + x6      # the lower code of each shift (see _int_slot_dot's corr)
    xb = x1 + x3 + x5 + x7
    return t, (xa * 264.0 + xb * 24.0)[:, None], (xa + xb)[:, None]


@triton.jit
def _fp4_x8_dot(t, words, x_at, k_at, K, EVEN_K: tl.constexpr):
    """t += x_j v_j over the 8 E2M1 slots of words [W, BN] (_fp4_as_f32; x times 2^64 as in
    the scalar loop), x by _x8_slots. One statement a slot (the compiler then emits FFMAs)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _x8_slots(x_at, k_at, K, EVEN_K)
    t += (x0 * 18446744073709551616.0)[:, None] * _fp4_as_f32(words, 0)
    t += (x1 * 18446744073709551616.0)[:, None] * _fp4_as_f32(words, 1)
    t += (x2 * 18446744073709551616.0)[:, None] * _fp4_as_f32(words, 2)
    t += (x3 * 18446744073709551616.0)[:, None] * _fp4_as_f32(words, 3)
    t += (x4 * 18446744073709551616.0)[:, None] * _fp4_as_f32(words, 4)
    t += (x5 * 18446744073709551616.0)[:, None] * _fp4_as_f32(words, 5)
    t += (x6 * 18446744073709551616.0)[:, None] * _fp4_as_f32(words, 6)
    t += (x7 * 18446744073709551616.0)[:, None] * _fp4_as_f32(words, 7)
    return t


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
def _load_x(ptrs, rk, K, EVEN_K: tl.constexpr):
    """Activations at pointers ptrs (inputs rk) as float32 (0 from K on; EVEN_K: no bounds
    check)."""
    if EVEN_K:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=rk < K, other=0.0).to(tl.float32)


@triton.jit
def _load_words(w_ptr, rn, n_in, rw, KW, EVEN: tl.constexpr):
    """Packed words [BN, W] of rows rn (row length KW) and word columns rw, 0 outside the
    matrix. EVEN: inside the matrix, no bounds checks (one ISETP a load less)."""
    ptrs = w_ptr + rn[:, None] * KW + rw[None, :]
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=n_in[:, None] & (rw[None, :] < KW), other=0)


@triton.jit
def _words_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, gs_ptr, ws_ptr, cnt_ptr,
                         M, N, K, KW, G, GROUP, stride_xm, K_PER_SPLIT,
                         FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                         HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                         TILE_SCALE: tl.constexpr, IEEE: tl.constexpr,
                         SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr = False,
                         EVEN_N: tl.constexpr = False, GROUP_SHIFT: tl.constexpr = -1):
    """A few rows (BLOCK_M >= 16): tensor-core dots of x's slot-j columns against the j-th
    codes of every word. M = 1 runs _gemv_kernel."""
    WORDS: tl.constexpr = BLOCK_K // PER
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.arange(0, WORDS)
    n_in = rn < N
    gs = 1.0
    if FMT == 1:  # NVFP4: w = e2m1 * scale / global_scale; 2^14 undoes the float16 decode
        gs = 16384.0 / tl.load(gs_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + kk
        rw = k0 // PER + ri
        words = _load_words(w_ptr, rn, n_in, rw, KW, EVEN_K and EVEN_N)
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
    if SPLIT:
        C.finish_split(acc, b_ptr, out_ptr, ws_ptr, cnt_ptr, rm, rn, rm < M, n_in, M, N, pid_k,
                       HAS_BIAS)
    else:
        C.finish_tile(acc, b_ptr, out_ptr, rm, rn, rm < M, n_in, N, HAS_BIAS)


@triton.jit
def _word_dot(t, corr, xsum, words, x_at, k_at, K, one, FMT: tl.constexpr, BITS: tl.constexpr,
              PER: tl.constexpr, X8: tl.constexpr, EVEN_K: tl.constexpr,
              HAS_ZERO: tl.constexpr):
    """Every code slot of words [C, BN] (one word a tile column) against x from x_at / k_at
    (slot 0's pointers and inputs, [C, 1]): INT adds into t, corr, xsum (_int_slot_dot), FP4
    into t (_fp4_as_f32: x times 2^64); X8: x of the word in one load (_x8_slots)."""
    if FMT == 0 and X8:
        t, c, xs = _int4_x8_dot(t, words, x_at, k_at, K, one, EVEN_K)
        corr += c
        xsum += xs
    elif FMT == 0:
        for j in tl.static_range(0, PER, 1 if BITS == 8 else 2):
            t, corr, xsum = _int_slot_dot(t, corr, xsum, words, x_at, k_at, K, one, j, BITS,
                                          EVEN_K, HAS_ZERO)
    elif X8:
        t = _fp4_x8_dot(t, words, x_at, k_at, K, EVEN_K)
    else:
        for j in tl.static_range(PER):
            xj = _load_x(x_at + j, k_at + j, K, EVEN_K)
            t += (xj * 18446744073709551616.0) * _fp4_as_f32(words, j)
    return t, corr, xsum


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, gs_ptr, ws_ptr, cnt_ptr, N,
                 stride_xm, one_bits,
                 K: tl.constexpr, KW: tl.constexpr, G: tl.constexpr, GROUP: tl.constexpr,
                 K_PER_SPLIT: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr,
                 PER: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_N: tl.constexpr, PREFETCH: tl.constexpr = False,
                 X8: tl.constexpr = False, GATED: tl.constexpr = False,
                 HALF: tl.constexpr = 0, PAIR: tl.constexpr = False, PDL: tl.constexpr = False):
    """One activation row (program axis 2) times BLOCK_N rows of W, over one K-slice (axis 1).

    The tile is [WORDS, BLOCK_N], transposed: a thread owns word columns, and all BLOCK_N rows
    of each column sit in its registers. So x at a column's 8 code slots is loaded and converted
    once for BLOCK_N rows, and every load (words, scales, x) is one element a thread
    (tl.max_contiguous(.., [1, 1])) in the same layout: no conversion through shared memory.
    (The [BLOCK_N, WORDS] tile with vector loads converted x through shared memory, with two CTA
    barriers, per slot pair: 705 SASS in the loop of the 8x2048 tile, 5.5 a code; this one,
    3.9 a code, kernels/NOTES.md.) K, KW, G, GROUP and K_PER_SPLIT are constexpr: a row's
    offset is then an immediate of the load instead of a 64-bit address computed per element
    (a compile per distinct K; a model has two or three).

    GATED: W stacks gate (rows 0 .. HALF-1) and up (rows HALF .. 2 HALF-1) of a SiLU-gated MLP;
    a program takes BLOCK_N / 2 rows of each, and stores silu(gate) * up for its BLOCK_N / 2
    outputs (out [M, HALF]): the activation and product of the MLP in the epilogue, not in two
    more launches a layer. N is then HALF (the output rows).

    SPLIT: the K-slices (program axis 1) store their partial sums of the BLOCK_N rows in a
    workspace [S, M, grid_n * BLOCK_N]; the last slice of each (row, pid_n) to finish adds them
    up and runs the epilogue (bias, the gated product, the store): _common.split_total.

    PAIR: w_ptr holds the words as int64, words 2p and 2p + 1 of a row in one element (PAIR_WORDS):
    a tile column is then a pair, one load and one scale for both words.

    PDL (launched with programmatic dependent launch, _common.PDL): the first tile's words (and
    NVFP4's global scale) are loaded before waiting for the kernel that wrote x."""
    WORDS: tl.constexpr = BLOCK_K // PER
    EVEN_K: tl.constexpr = K % K_PER_SPLIT == 0 and KW * PER == K
    MASKED: tl.constexpr = not (EVEN_K and EVEN_N)
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, BLOCK_N)          # this program's rows, from its first
    if GATED:   # the first half of the tile from gate's rows, the second from up's
        OUTS: tl.constexpr = BLOCK_N // 2
        row0 = pid_n * OUTS
        n_in = row0 + rows % OUTS < N
        rows = tl.where(rows < OUTS, rows, rows - OUTS + HALF)   # constant per register
    else:
        OUTS: tl.constexpr = BLOCK_N
        row0 = pid_n * BLOCK_N
        n_in = row0 + rows < N
    # a tile column: one word, or with PAIR two (an int64: PAIR_WORDS), of CW codes; KC a row's
    COLS: tl.constexpr = WORDS // 2 if PAIR else WORDS
    CW: tl.constexpr = 2 * PER if PAIR else PER
    KC: tl.constexpr = KW // 2 if PAIR else KW
    ri = tl.arange(0, COLS)
    # Scalar (64-bit) pointers to this program's first row and K-slice; the per-element offsets
    # from them are then small: the compiler folds a row's offset into the load's immediate
    # instead of sign-extending a 32-bit offset per element (LEA + LEA.HI.X each: 65 of 580
    # SASS in the loop).
    k_first = pid_k * K_PER_SPLIT
    w_prog = w_ptr + row0 * KC + k_first // CW
    x_prog = x_ptr + row * stride_xm + k_first
    gs = 1.0
    if FMT == 1:  # NVFP4: w = e2m1 * scale / global_scale; 2^14 undoes the float16 decode
        gs = 16384.0 / tl.load(gs_ptr).to(tl.float32)
    acc = tl.zeros((COLS, BLOCK_N), dtype=tl.float32)
    offs = tl.max_contiguous(ri[:, None] + rows[None, :] * KC, [1, 1])
    if PREFETCH:
        ahead = _load_or_zero(w_prog + offs, ((k_first // CW + ri)[:, None] < KC)
                              & n_in[None, :], MASKED)
        stop = tl.minimum(KC, (k_first + K_PER_SPLIT) // CW)   # this slice's last column + 1
    C.wait_for_producer(PDL)   # (weights and scales are constants: read before it)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        rw = (k_first + kk) // CW + ri                         # tile columns
        inside = (rw[:, None] < KC) & n_in[None, :]
        if PREFETCH:   # this tile's words came one iteration early; ask for the next ones now
            words = ahead
            ahead = tl.load(w_prog + (kk + BLOCK_K) // CW + offs,
                            mask=((rw + COLS) < stop)[:, None] & n_in[None, :], other=0)
        else:
            words = _load_or_zero(w_prog + kk // CW + offs, inside, MASKED)
        s, z = _group_scale(s_ptr, z_ptr, gs, rows[None, :], ((rw * CW) // GROUP)[:, None],
                            inside, G, FMT, BITS, PER, HAS_ZERO, MASKED, True, row0)
        k_off = tl.max_contiguous((kk + ri * CW)[:, None], [1, 1])   # slot 0 of each column
        x_at = x_prog + k_off
        k_at = k_first + k_off
        t = tl.zeros((COLS, BLOCK_N), dtype=tl.float32)
        corr = tl.zeros((COLS, 1), dtype=tl.float32)
        xsum = tl.zeros((COLS, 1), dtype=tl.float32)
        if PAIR:   # the low half is word 2p (little-endian), the high half word 2p + 1
            t, corr, xsum = _word_dot(t, corr, xsum, words.to(tl.int32), x_at, k_at, K,
                                      one_bits, FMT, BITS, PER, X8, EVEN_K, HAS_ZERO)
            t, corr, xsum = _word_dot(t, corr, xsum, (words >> 32).to(tl.int32), x_at + PER,
                                      k_at + PER, K, one_bits, FMT, BITS, PER, X8, EVEN_K,
                                      HAS_ZERO)
        else:
            t, corr, xsum = _word_dot(t, corr, xsum, words, x_at, k_at, K, one_bits, FMT, BITS,
                                      PER, X8, EVEN_K, HAS_ZERO)
        if FMT == 0:   # see _int_slot_dot
            if HAS_ZERO:
                acc += s * (t * (1 << BITS) - corr - z * xsum)
            else:
                acc += s * (t * (1 << BITS) - corr)
        else:          # FP4: see _fp4_as_f32; 2^48 = 2^(126-64) / 2^14 in s
            acc += (t * 281474976710656.0) * s
    y = tl.sum(acc, axis=0)
    last = True
    if SPLIT:
        last, y = C.row_split_total(y, ws_ptr, cnt_ptr, pid_n, pid_k, row, BLOCK_N)
    if last:
        _gemv_epilogue(y, b_ptr, out_ptr, row, row0, rows, n_in, N, OUTS, HAS_BIAS, GATED)


@triton.jit
def _gemv_epilogue(y, b_ptr, out_ptr, row, row0, rows, n_in, N, OUTS: tl.constexpr,
                   HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    """Bias and store of one activation row's BLOCK_N sums y (GATED: silu(gate) * up of its
    OUTS outputs)."""
    if HAS_BIAS:
        y += tl.load(b_ptr + row0 + rows, mask=n_in, other=0.0).to(tl.float32)
    if GATED:
        gate, up = tl.split(tl.trans(tl.reshape(y, (2, OUTS))))
        ro = row0 + tl.arange(0, OUTS)
        tl.store(out_ptr + row * N + ro, (gate * tl.sigmoid(gate) * up).to(
            out_ptr.dtype.element_ty), mask=ro < N)
    else:
        tl.store(out_ptr + row * N + row0 + rows, y.to(out_ptr.dtype.element_ty), mask=n_in)


def pairs_apply(words: torch.Tensor, per: int, group: int, block_k: int) -> bool:
    """PAIR_WORDS can read these words: whole pairs a row, 8-byte aligned, a scale group and a
    K-tile holding whole pairs."""
    return (words.shape[1] % 2 == 0 and words.stride(1) == 1 and words.stride(0) % 2 == 0
            and words.data_ptr() % 8 == 0 and group % (2 * per) == 0
            and block_k % (2 * per) == 0)


def group_shift(group: int) -> int:
    """log2(group) for a power-of-two group (per-word scale columns by a shift: a division per
    word was a quarter of the M = 1 loop's SASS, 953 -> 705 on the 8x2048 tile), else -1."""
    return group.bit_length() - 1 if group > 0 and group & (group - 1) == 0 else -1


def words_matmul(x2: torch.Tensor, fmt: int, words: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, global_scale: torch.Tensor | None, n: int, k: int,
                 bits: int, group: int, bias: torch.Tensor | None, cfg: C.Config,
                 out_dtype: torch.dtype, gated: bool = False) -> torch.Tensor:
    """x2 [M, K] (contiguous rows) @ W^T -> [M, N] in out_dtype. words: int32 [N, KW]; scale
    [N, G] (FP4: raw bits as uint8); arguments already checked by the format's wrapper.
    cfg.block_m == 1: one program per row and BLOCK_N outputs (_gemv_kernel); else tensor-core
    tiles of block_m rows (_words_matmul_kernel). gated (M = 1 kernel only): W is gate and up
    stacked, the result silu(x W_gate^T) * (x W_up^T), [M, N / 2]."""
    m = x2.shape[0]
    per = 32 // bits
    use_dot = cfg.block_m > 1
    half = n // 2 if gated else 0
    C.check(not gated or (not use_dot and n % 2 == 0 and cfg.block_n >= 2),
            f"config {cfg}: the gated product needs the M = 1 kernel (block_m 1, block_n >= 2) "
            f"and an even number of rows, got {n}")
    C.check(not use_dot or (cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k // per >= 16),
            f"config {cfg}: tensor-core tiles need block_m, block_n >= 16 and block_k >= "
            f"{16 * per}")
    C.check(cfg.block_k % per == 0 and (cfg.block_k & (cfg.block_k - 1)) == 0,
            f"config {cfg}: block_k must be a power of two and a multiple of {per}")
    C.check(use_dot or m <= 65535, f"config {cfg}: block_m 1 runs one program per row, at most "
            f"65535 rows (CUDA's grid), got {m}; use a config with block_m >= 16")
    groups = scale.shape[1]
    split, k_per_split = C.split_of(k, cfg)
    out = C.alloc((m, half or n), out_dtype, x2.device)
    outs = cfg.block_n // 2 if gated else cfg.block_n   # outputs a program
    grid_m, grid_n = -(-m // cfg.block_m), -(-(half or n) // outs)
    # split-K: float32 partials, summed by the last K-slice of each tile (C.split_total); the
    # M = 1 kernel keeps a program's BLOCK_N sums (gate and up rows when gated) per row
    size, tiles = (m * n, grid_m * grid_n) if use_dot else (m * grid_n * cfg.block_n, m * grid_n)
    ws, counters = C.split_buffers(split, size, tiles, out)
    # NVFP4's global scale stays a device tensor read in the kernel (no host sync: CUDA graphs)
    gs = global_scale if fmt == FMT_NVFP4 else scale
    common = {"FMT": fmt, "BITS": bits, "PER": per, "HAS_ZERO": zero is not None,
              "HAS_BIAS": bias is not None, "SPLIT": split > 1, "BLOCK_N": cfg.block_n,
              "BLOCK_K": cfg.block_k, "EVEN_N": (half or n) % outs == 0, "num_warps": cfg.num_warps}
    pointers = (x2, words, scale, zero if zero is not None else words,
                bias if bias is not None else x2, out, gs, ws, counters)
    if not use_dot:
        pair = (cfg.pair if PAIR_WORDS is None else PAIR_WORDS) and pairs_apply(
            words, per, group, cfg.block_k)
        if pair:   # words 2p and 2p + 1 of a row as one int64 (little-endian: 2p the low half)
            pointers = (x2, words.view(torch.int64)) + pointers[2:]
        _gemv_kernel[(grid_n, split, m)](
            *pointers, half or n, x2.stride(0),
            0x3F800000,   # float32 1.0 as a runtime value: kept in a register (_code_mantissas)
            K=k, KW=words.shape[1], G=groups, GROUP=group, K_PER_SPLIT=k_per_split,
            PREFETCH=cfg.num_stages > 1,
            X8=X8_LOADS_FP4 if fmt != FMT_INT else X8_LOADS and bits == 4,
            GATED=gated, HALF=half, PAIR=pair, **C.pdl_args(x2.device),
            num_stages=1, **common)   # not Triton's pipeline (through shared memory): registers
    else:
        _words_matmul_kernel[(grid_m, grid_n, split)](
            *pointers, m, n, k, words.shape[1], groups, group, x2.stride(0), k_per_split,
            TILE_SCALE=groups == 1 or group % cfg.block_k == 0, IEEE=C.dot_in_f32(x2.dtype),
            BLOCK_M=cfg.block_m, EVEN_K=k % k_per_split == 0, GROUP_SHIFT=group_shift(group),
            num_stages=cfg.num_stages, **common)
    return out
