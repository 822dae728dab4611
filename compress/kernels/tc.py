"""Tensor-core matmul for M = 17 .. ~511 rows (and the whole-weight dequantize) for weights packed
as 32-bit words of 4- or 8-bit codes: INT4/INT8 (sym, asym) and NVFP4/MXFP4, as stored.

Same tensors as the decode kernel (compress/kernels/decode.py): INT int32 [N, ceil(K/P)], FP4
uint8 [N, K/2] viewed as int32 [N, K/8] (nibble j of word i is element 8 i + j in both), scales
[N, K/g], INT zero points int32 [ceil(N/P), K/g] packed along N. No repack, no second copy.

One program owns a [BLOCK_M, BLOCK_N] output tile; per K-tile (kernels/NOTES.md, "The tc
path" has the SASS counts):
  * the packed words are loaded as a [BLOCK_N, BLOCK_K / P] tile (rows contiguous along K:
    16-byte vector loads, pipelined by num_stages), never one load per code;
  * the code slots of every word are decoded on [BLOCK_N, WORDS] tensors, all elementwise,
    ~3 instructions a code: INT codes become float mantissas (decode._code_mantissas, one
    shift for two 4-bit codes) and one FMA applies offset, zero point and scale; E2M1 becomes
    float32 bits (decode._fp4_as_f32) and one multiply applies the scale;
  * scales are read per row once per tile (the tile in one group), per group and spread over
    the words (NVFP4 g16, MXFP4 g32), or per word, one tile ahead of their use;
  * the slots are put in K order with tl.interleave (a join + reshape that keeps each
    thread's values in its registers), then cast to the activation dtype;
  * one tl.dot per K-tile with float32 accumulation: y^T = W x^T for few rows (the weight rows
    on the MMA's 64-row side), y = x W^T from 64 rows (Config.swap, see swap);
  * split-K (config split_k > 1): the K-slices' float32 partials are summed by the last
    program of each tile (_common.finish_split): one launch, no zero fill, no cast.
float32 activations use an exact (IEEE) dot on exactly decoded float32 weights.

INT4 with 16-bit activations and scales of their dtype, a tile inside one group (PACKED): the
codes are decoded two to a 32-bit register by inline PTX (_int4_packed), ~2 instructions a code
instead of ~3.5, each weight the reference's own rounding of (code - 8 - zero) * scale; as even
and odd halves (two dots on a split x) or, with Config.k_order, in K order (one dot).

Whether the next tile's decode overlaps a tile's wgmmas (compiled for sm_90 on the CPU,
kernels/compile_check.py --sass: "wgmma in flight N"): Triton issues the dot asynchronously only
when its shared-memory operand comes straight from a pipelined load, i.e. on swapped tiles whose
x is not split (the plain decode, or K order); x @ W^T tiles store the decoded tile to shared
memory inside the loop and always wait (kernels/NOTES.md, fourteenth session).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C
from compress.kernels.decode import (
    FMT_INT,
    FMT_NVFP4,
    _code_mantissas,
    _fp4_as_f32,
    _group_scale,
    _load_words,
)


@triton.jit
def _spread(t, WPG: tl.constexpr):
    """[BN, C] -> [BN, C * WPG], each column repeated WPG times (self-interleaves: registers
    only, and the result has the layout of an interleaved tile, like the words')."""
    if WPG >= 2:
        t = tl.interleave(t, t)
    if WPG >= 4:
        t = tl.interleave(t, t)
    if WPG >= 8:
        t = tl.interleave(t, t)
    if WPG >= 16:
        t = tl.interleave(t, t)
    return t


@triton.jit
def _row_scale(s_ptr, z_ptr, gs, rn, n_in, k0, K, G, GROUP, GROUP_SHIFT, FMT: tl.constexpr,
               BITS: tl.constexpr, PER: tl.constexpr, HAS_ZERO: tl.constexpr,
               POW2_GROUP: tl.constexpr):
    """(scale, zero) [BN, 1] of the K-tile at k0 when it lies in one group (SCALES 0): the
    group found by a shift (GROUP_SHIFT) or a division; 0 past K."""
    if POW2_GROUP:
        col = k0 >> GROUP_SHIFT
    else:
        col = k0 // GROUP
    return _group_scale(s_ptr, z_ptr, gs, rn[:, None], col,
                        n_in[:, None] & (rn[:, None] * 0 + k0 < K), G, FMT, BITS, PER, HAS_ZERO)


@triton.jit
def _tile_factors(s_ptr, z_ptr, gs, rn, n_in, k0, K, KW, G, GROUP, GROUP_SHIFT,
                  FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                  HAS_ZERO: tl.constexpr, SCALES: tl.constexpr, WPG: tl.constexpr,
                  POW2_GROUP: tl.constexpr, EXACT: tl.constexpr, WORDS: tl.constexpr):
    """(a, b_lo, b_hi) of the K-tile at k0. INT: w = v * a + b with v from _code_mantissas
    (b_lo for the lower code of a 4-bit shift, b_hi for the upper one), or when EXACT,
    w = (v * 2^B + b) * a (a = scale; one rounding, as the reference); FP4: w = f * a with
    f = value * 2^-126 (_fp4_as_f32), a = scale * 2^100 (the kernel multiplies its
    accumulator by 2^26 at the end), or, when EXACT, a = scale (f is multiplied by 2^126
    first). SCALES: 0, the tile lies in one group (INT g128, per channel): one factor per row
    [BN, 1], the group found by a shift (GROUP_SHIFT) or a division; 1, the tile holds whole
    groups of WPG words: the tile's groups are loaded as [BN, WORDS / WPG] (contiguous) and
    spread over the words [BN, WORDS]; 2, any other group size: per word, by a division."""
    if SCALES == 0:
        s, z = _row_scale(s_ptr, z_ptr, gs, rn, n_in, k0, K, G, GROUP, GROUP_SHIFT, FMT, BITS,
                          PER, HAS_ZERO, POW2_GROUP)
    elif SCALES == 1:
        cols = k0 // (WPG * PER) + tl.arange(0, WORDS // WPG)
        s, z = _group_scale(s_ptr, z_ptr, gs, rn[:, None], cols[None, :],
                            n_in[:, None] & (cols[None, :] < G), G, FMT, BITS, PER, HAS_ZERO)
    else:
        rw = k0 // PER + tl.arange(0, WORDS)
        cols = (rw * PER) // GROUP
        s, z = _group_scale(s_ptr, z_ptr, gs, rn[:, None], cols[None, :],
                            n_in[:, None] & (rw[None, :] < KW), G, FMT, BITS, PER, HAS_ZERO)
    if FMT == 0:   # v = 1 + c/2^B (+ 2^B for the lower 4-bit code)
        if BITS == 4:
            b_hi = -(24.0 + z)                    # 16 (the 1 in v) + 8 (the code offset)
            b_lo = -(264.0 + z)                   # 256 + 8
        else:
            b_hi = -(384.0 + z)                   # 256 + 128
            b_lo = b_hi
        if EXACT:
            a = s
        else:      # exact FMA offsets for bfloat16/float16 scales ((264 + z) s: 17 bits)
            a = s * (1 << BITS)
            b_lo = b_lo * s
            b_hi = b_hi * s
    else:          # _group_scale's FP4 scale carries 2^14 (decode's float16 trick)
        if EXACT:
            a = s * 6.103515625e-05               # 2^-14
        else:
            a = s * 77371252455336267181195264.0  # 2^86 = 2^(126 - 26 - 14)
        b_lo = a
        b_hi = a
    if SCALES == 1:
        a = _spread(a, WPG)
        if FMT == 0:
            b_lo = _spread(b_lo, WPG)
            b_hi = _spread(b_hi, WPG) if BITS == 4 else b_lo
        else:
            b_lo = a
            b_hi = a
    return a, b_lo, b_hi


@triton.jit
def _int_pair(words, j: tl.constexpr, a, b_lo, b_hi, one, BITS: tl.constexpr,
              EXACT: tl.constexpr, DTYPE):
    """INT code slots j and j + 1 (4 bits; 8 bits: j twice) as weights in DTYPE: one shift,
    one LOP3 and one FMA a code (its constant b is exact for 16-bit scales: (264 + z) * scale
    needs 17 bits), half a conversion. EXACT (float32 activations, dequantize): the integer
    code - offset - zero first (exact), then one rounding times the scale, as the reference."""
    lo, hi = _code_mantissas(words, j, one, BITS)
    if EXACT:
        w_lo = (lo * (1 << BITS) + b_lo) * a
        w_hi = (hi * (1 << BITS) + b_hi) * a
    else:
        w_lo = lo * a + b_lo
        w_hi = hi * a + b_hi
    return w_lo.to(DTYPE), w_hi.to(DTYPE)


@triton.jit
def _fp4_pair(words, j: tl.constexpr, a, EXACT: tl.constexpr, DTYPE):
    """E2M1 code slots j and j + 1 as weights in DTYPE: f = value * 2^-126 in two shifts and a
    LOP3 (decode._fp4_as_f32, the 0.5 code a denormal), times a. Unless EXACT, one FMUL:
    f * scale * 2^100 = value * scale * 2^-26, normal and exact in float32 and bfloat16 for any
    scale in 2^-100 .. 2^28 (the accumulator gets the 2^26 back); float16 lacks that range, so
    EXACT multiplies by 2^126 first (exact: f is a multiple of 2^-127)."""
    f0 = _fp4_as_f32(words, j)
    f1 = _fp4_as_f32(words, j + 1)
    if EXACT:
        f0 = f0 * 8.507059173023462e37            # 2^126
        f1 = f1 * 8.507059173023462e37
    return (f0 * a).to(DTYPE), (f1 * a).to(DTYPE)


@triton.jit
def _weight_tile(words, a, b_lo, b_hi, one, FMT: tl.constexpr, BITS: tl.constexpr,
                 EXACT: tl.constexpr, DTYPE):
    """Packed words [BN, W] -> weights [BN, W * P] in K order (code j of word i at column
    P * i + j). interleave(u, v) puts u at even and v at odd columns (a join and a reshape that
    keep each thread's values in its registers), so slot order is j's bit reversal."""
    if BITS == 8:
        w0, _ = _int_pair(words, 0, a, b_lo, b_hi, one, BITS, EXACT, DTYPE)
        w1, _ = _int_pair(words, 1, a, b_lo, b_hi, one, BITS, EXACT, DTYPE)
        w2, _ = _int_pair(words, 2, a, b_lo, b_hi, one, BITS, EXACT, DTYPE)
        w3, _ = _int_pair(words, 3, a, b_lo, b_hi, one, BITS, EXACT, DTYPE)
        tile = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    else:
        if FMT == 0:
            w0, w1 = _int_pair(words, 0, a, b_lo, b_hi, one, BITS, EXACT, DTYPE)
            w2, w3 = _int_pair(words, 2, a, b_lo, b_hi, one, BITS, EXACT, DTYPE)
            w4, w5 = _int_pair(words, 4, a, b_lo, b_hi, one, BITS, EXACT, DTYPE)
            w6, w7 = _int_pair(words, 6, a, b_lo, b_hi, one, BITS, EXACT, DTYPE)
        else:
            w0, w1 = _fp4_pair(words, 0, a, EXACT, DTYPE)
            w2, w3 = _fp4_pair(words, 2, a, EXACT, DTYPE)
            w4, w5 = _fp4_pair(words, 4, a, EXACT, DTYPE)
            w6, w7 = _fp4_pair(words, 6, a, EXACT, DTYPE)
        even = tl.interleave(tl.interleave(w0, w4), tl.interleave(w2, w6))
        odd = tl.interleave(tl.interleave(w1, w5), tl.interleave(w3, w7))
        tile = tl.interleave(even, odd)
    return tile


# INT4 codes to 16-bit weights, two to a register (Marlin's and FasterTransformer's trick, for
# Triton: tl.inline_asm_elementwise with pack=4, so one call gets 4 bytes in one register).
# Per 4 bytes (8 codes): PRMT puts bytes 0, 1 (2, 3) in the low byte of each 16-bit half; a shift
# brings the high nibbles down; LOP3 (x & 0x000F000F) | MAGIC makes each half MAGIC_VALUE + code
# exactly (bfloat16 0x4300 = 128, float16 0x6400 = 1024, one unit per code); SUB removes
# MAGIC_VALUE + 8 + zero (exact: small integers), MUL the scale (the one rounding the reference
# makes). 16 instructions for 8 codes. Operands: $0-$3 out (low nibbles of bytes 0-1, 2-3, then
# high nibbles), $4 the bytes, $5-$6 the scales, $7-$8 MAGIC_VALUE + 8 + zero, each a pair of
# halves for bytes 0-1 and 2-3; outputs early-clobber ("=&r"): they are written while $5-$8 are
# still read.
_INT4_PACKED_ASM = """{{
.reg .b32 t0, t1, u0, u1;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
shr.b32 u0, t0, 4;
shr.b32 u1, t1, 4;
lop3.b32 t0, t0, 0x000F000F, {magic}, 0xEA;
lop3.b32 t1, t1, 0x000F000F, {magic}, 0xEA;
lop3.b32 u0, u0, 0x000F000F, {magic}, 0xEA;
lop3.b32 u1, u1, 0x000F000F, {magic}, 0xEA;
sub.rn.{t}x2 t0, t0, $7;
sub.rn.{t}x2 t1, t1, $8;
sub.rn.{t}x2 u0, u0, $7;
sub.rn.{t}x2 u1, u1, $8;
mul.rn.{t}x2 $0, t0, $5;
mul.rn.{t}x2 $1, t1, $6;
mul.rn.{t}x2 $2, u0, $5;
mul.rn.{t}x2 $3, u1, $6;
}}"""
INT4_TO_BF16: tl.constexpr = tl.constexpr(_INT4_PACKED_ASM.format(magic="0x43004300", t="bf16"))
INT4_TO_F16: tl.constexpr = tl.constexpr(_INT4_PACKED_ASM.format(magic="0x64006400", t="f16"))

# The same decode with the codes in K order (_int4_packed_k_order, Config.k_order): u = bytes
# >> 4 puts each byte's high nibble in the low nibble of u's same byte, so PRMT selector 0x4400
# (bytes b0, b0, u0, u0) and the LOP3 leave (code 0, code 1) in one register's halves, 0x5511
# codes 2 and 3, and so on: 17 instructions for 8 codes instead of 16. Operands as above; $0-$1
# are the codes of bytes 0-1 (first output), $2-$3 of bytes 2-3.
_INT4_K_ORDER_ASM = """{{
.reg .b32 u, t0, t1, t2, t3;
shr.b32 u, $4, 4;
prmt.b32 t0, $4, u, 0x4400;
prmt.b32 t1, $4, u, 0x5511;
prmt.b32 t2, $4, u, 0x6622;
prmt.b32 t3, $4, u, 0x7733;
lop3.b32 t0, t0, 0x000F000F, {magic}, 0xEA;
lop3.b32 t1, t1, 0x000F000F, {magic}, 0xEA;
lop3.b32 t2, t2, 0x000F000F, {magic}, 0xEA;
lop3.b32 t3, t3, 0x000F000F, {magic}, 0xEA;
sub.rn.{t}x2 t0, t0, $7;
sub.rn.{t}x2 t1, t1, $7;
sub.rn.{t}x2 t2, t2, $8;
sub.rn.{t}x2 t3, t3, $8;
mul.rn.{t}x2 $0, t0, $5;
mul.rn.{t}x2 $1, t1, $5;
mul.rn.{t}x2 $2, t2, $6;
mul.rn.{t}x2 $3, t3, $6;
}}"""
INT4_K_ORDER_BF16: tl.constexpr = tl.constexpr(_INT4_K_ORDER_ASM.format(magic="0x43004300",
                                                                        t="bf16"))
INT4_K_ORDER_F16: tl.constexpr = tl.constexpr(_INT4_K_ORDER_ASM.format(magic="0x64006400",
                                                                       t="f16"))

# The same decode on one int32 word (8 codes, code j at bits 4j), output j = code j
# (_int4_planes_dot, "planes"): a shift and a LOP3 give codes j and j + 4 in one register's
# halves, SUB and MUL as above, MOV splits the halves: 19 instructions for 8 codes. Operands:
# $0-$7 out, $8 the word, $9 the scale, $10 MAGIC_VALUE + 8 + zero (16-bit, pack=1).
_INT4_PLANES_ASM = """{{
.reg .b32 s2, z2, v, t0, t1, t2, t3;
mov.b32 s2, {{$9, $9}};
mov.b32 z2, {{$10, $10}};
lop3.b32 t0, $8, 0x000F000F, {magic}, 0xEA;
shr.b32 v, $8, 4;
lop3.b32 t1, v, 0x000F000F, {magic}, 0xEA;
shr.b32 v, $8, 8;
lop3.b32 t2, v, 0x000F000F, {magic}, 0xEA;
shr.b32 v, $8, 12;
lop3.b32 t3, v, 0x000F000F, {magic}, 0xEA;
sub.rn.{t}x2 t0, t0, z2;
sub.rn.{t}x2 t1, t1, z2;
sub.rn.{t}x2 t2, t2, z2;
sub.rn.{t}x2 t3, t3, z2;
mul.rn.{t}x2 t0, t0, s2;
mul.rn.{t}x2 t1, t1, s2;
mul.rn.{t}x2 t2, t2, s2;
mul.rn.{t}x2 t3, t3, s2;
mov.b32 {{$0, $4}}, t0;
mov.b32 {{$1, $5}}, t1;
mov.b32 {{$2, $6}}, t2;
mov.b32 {{$3, $7}}, t3;
}}"""
INT4_PLANES_BF16: tl.constexpr = tl.constexpr(_INT4_PLANES_ASM.format(magic="0x43004300",
                                                                      t="bf16"))
INT4_PLANES_F16: tl.constexpr = tl.constexpr(_INT4_PLANES_ASM.format(magic="0x64006400",
                                                                     t="f16"))


@triton.jit
def _int4_packed(w_ptr, rn, n_in, k0, KW, s, z, DTYPE, BLOCK_K: tl.constexpr,
                 EVEN: tl.constexpr, K_ORDER: tl.constexpr = False):
    """INT4 weights of rows rn from input k0 on, in DTYPE (bfloat16 or float16): (even, odd)
    [BN, BLOCK_K / 2], the inputs k0 + 2i and k0 + 2i + 1 (byte i of the packed row holds both);
    s, z: the tile's scale and zero point per row [BN, 1] (float32, s exact in DTYPE). Two
    tensors, not one in K order: an interleave would re-pair every register (a PRMT per two
    codes, SASS counted); the dots take even and odd inputs apart instead. K_ORDER: the K-order
    PTX instead, each 4 bytes giving codes 0-3 (first output) and 4-7 (second), for
    _int4_packed_k_order."""
    rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ptrs = w_ptr.to(tl.pointer_type(tl.uint8)) + rn[:, None] * (KW * 4) + rb[None, :]
    if EVEN:
        b = tl.load(ptrs)
    else:
        b = tl.load(ptrs, mask=n_in[:, None] & (rb[None, :] < KW * 4), other=0)
    if DTYPE == tl.bfloat16:
        lo, hi = tl.inline_asm_elementwise(INT4_K_ORDER_BF16 if K_ORDER else INT4_TO_BF16,
                                           "=&r,=&r,=&r,=&r,r,r,r,r,r",
                                           [b, s.to(tl.bfloat16), (136.0 + z).to(tl.bfloat16)],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                           pack=4)
    else:
        lo, hi = tl.inline_asm_elementwise(INT4_K_ORDER_F16 if K_ORDER else INT4_TO_F16,
                                           "=&r,=&r,=&r,=&r,r,r,r,r,r",
                                           [b, s.to(tl.float16), (1032.0 + z).to(tl.float16)],
                                           dtype=(tl.float16, tl.float16), is_pure=True,
                                           pack=4)
    return lo, hi


@triton.jit
def _int4_packed_k_order(w_ptr, rn, n_in, k0, KW, s, z, DTYPE, BLOCK_K: tl.constexpr,
                         EVEN: tl.constexpr):
    """_int4_packed's weights as one [BN, BLOCK_K] tile in K order: codes 0-3 and 4-7 of each
    4 bytes joined and permuted back to K order in registers. More instructions than the
    even/odd halves (the permute; a layout conversion through shared memory), but x needs no
    split: see Config.k_order."""
    lo, hi = _int4_packed(w_ptr, rn, n_in, k0, KW, s, z, DTYPE, BLOCK_K, EVEN, True)
    BN: tl.constexpr = lo.shape[0]
    lo = tl.reshape(lo, (BN, BLOCK_K // 8, 4))
    hi = tl.reshape(hi, (BN, BLOCK_K // 8, 4))
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (BN, BLOCK_K))


@triton.jit
def _int4_planes_dot(w_ptr, rn, n_in, k0, KW, s, z, x, acc, DTYPE, BLOCK_K: tl.constexpr,
                     EVEN: tl.constexpr):
    """acc [BN, BM] + the K-tile at k0 of INT4 weights times x^T (x [BM, BLOCK_K], the tile's
    activations), as eight dots of K / 8, one a
    code slot ("plane" j: code j of every word, inputs k0 + 8 i + j). Each plane comes from the
    words by elementwise operations alone, so Triton loads the words straight into the wgmma's
    register-operand layout and the decoded tile never goes through shared memory (the
    STS/LDSM round trip Nsight Compute found the tc kernel waiting on); x is split into the
    same eight planes in registers (its stride-8 inputs) instead. See Config.planes."""
    BW: tl.constexpr = BLOCK_K // 8
    words = _load_words(w_ptr, rn, n_in, k0 // 8 + tl.arange(0, BW), KW, EVEN)
    if DTYPE == tl.bfloat16:
        w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
            INT4_PLANES_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
            [words, s.to(tl.bfloat16), (136.0 + z).to(tl.bfloat16)],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
            INT4_PLANES_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
            [words, s.to(tl.float16), (1032.0 + z).to(tl.float16)],
            dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    # x as [BM, BW, 8], element (m, i, j) = x[m, k0 + 8 i + j]; three splits give the planes
    BM: tl.constexpr = x.shape[0]
    x_even, x_odd = tl.split(tl.reshape(x, (BM, BW, 4, 2)))
    x04, x26 = tl.split(tl.reshape(x_even, (BM, BW, 2, 2)))
    x15, x37 = tl.split(tl.reshape(x_odd, (BM, BW, 2, 2)))
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    acc = tl.dot(w0, tl.trans(x0), acc)
    acc = tl.dot(w1, tl.trans(x1), acc)
    acc = tl.dot(w2, tl.trans(x2), acc)
    acc = tl.dot(w3, tl.trans(x3), acc)
    acc = tl.dot(w4, tl.trans(x4), acc)
    acc = tl.dot(w5, tl.trans(x5), acc)
    acc = tl.dot(w6, tl.trans(x6), acc)
    acc = tl.dot(w7, tl.trans(x7), acc)
    return acc


@triton.jit
def _nvfp4_gs(gs_ptr, FMT: tl.constexpr):
    """The factor _group_scale multiplies NVFP4's E4M3 scales by: 2^14 / the global scale,
    read on the device (no host sync: CUDA graphs)."""
    gs = 1.0
    if FMT == 1:
        gs = 16384.0 / tl.load(gs_ptr).to(tl.float32)
    return gs


@triton.jit
def _x_tile(x_ptr, rm, m_in, stride_xm, rk, K, EVEN_K: tl.constexpr):
    """Activations [BM, len(rk)] of rows rm at inputs rk (0 outside)."""
    ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    if EVEN_K:
        return tl.load(ptrs, mask=m_in[:, None], other=0.0)
    return tl.load(ptrs, mask=m_in[:, None] & (rk[None, :] < K), other=0.0)


@triton.jit
def _dot(w, x, acc, SWAP: tl.constexpr, IEEE: tl.constexpr):
    """acc + the tile's product, acc [BN, BM] when SWAP else [BM, BN]; w [BN, k], x [BM, k]."""
    if SWAP:
        # y^T[BN, BM] += w[BN, BK] @ x^T: the weight rows fill the MMA's 64-row side (a few
        # activation rows are its narrow N side, no padding to 64); on Hopper the decoded
        # tile is wgmma's register operand A and x^T, read from its pipelined buffer, lets
        # the wgmmas run while the next tile is decoded
        acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee" if IEEE else None)
    else:
        # y[BM, BN] += x @ w^T: both wgmma operands in shared memory (BLOCK_M >= 64 on Hopper,
        # else mma.sync tiles), the wgmmas of a tile issued back to back
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee" if IEEE else None)
    return acc


@triton.jit
def _tc_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, gs_ptr, ws_ptr, cnt_ptr,
                      M, N, K, KW, G, GROUP, GROUP_SHIFT, stride_xm, K_PER_SPLIT, one_bits,
                      FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                      HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SCALES: tl.constexpr,
                      WPG: tl.constexpr, POW2_GROUP: tl.constexpr, IEEE: tl.constexpr,
                      SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SWAP: tl.constexpr, EVEN_K: tl.constexpr = False,
                      EVEN_N: tl.constexpr = False, PACKED: tl.constexpr = False,
                      K_ORDER: tl.constexpr = False, PLANES: tl.constexpr = False,
                      PDL: tl.constexpr = False):
    # launched with programmatic dependent launch (_common.PDL): the loop reads x from the start
    C.wait_for_producer(PDL)
    # M-tiles are grid axis 0, so the programs sharing a weight tile run together (L2 reuse)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.arange(0, BLOCK_K // PER)
    n_in = rn < N
    m_in = rm < M
    gs = _nvfp4_gs(gs_ptr, FMT)
    # float32 activations: float32 weights and an exact dot (see _common.dot_in_f32)
    DTYPE: tl.constexpr = tl.float32 if IEEE else x_ptr.dtype.element_ty
    # exact decodes where needed: float32 activations (one rounding, as the reference), and FP4
    # in float16 (no room for the 2^-26 lift)
    EXACT: tl.constexpr = IEEE or (FMT != 0 and DTYPE == tl.float16)
    k_start = pid_k * K_PER_SPLIT
    # the scales of a tile are loaded one iteration ahead (Triton's pipeline skips these small
    # loads): their latency hides behind a tile's decode and dot
    if PACKED:   # INT4, 16-bit, one group a tile: scale and zero per row (_int4_packed)
        s, z = _row_scale(s_ptr, z_ptr, gs, rn, n_in, k_start, K, G, GROUP, GROUP_SHIFT, FMT,
                          BITS, PER, HAS_ZERO, POW2_GROUP)
    else:
        a, b_lo, b_hi = _tile_factors(s_ptr, z_ptr, gs, rn, n_in, k_start, K, KW, G, GROUP,
                                      GROUP_SHIFT, FMT, BITS, PER, HAS_ZERO, SCALES, WPG,
                                      POW2_GROUP, EXACT, BLOCK_K // PER)
    if SWAP:   # y^T: see the dot below
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the loop runs at least once: without this, the zero-trip path's acc = 0 reaches the wait
    # after the loop, and ptxas serializes every wgmma of the tile (warning C7515) from 32 rows
    tl.assume(K_PER_SPLIT > 0)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + kk
        if PACKED and PLANES and SWAP and BLOCK_K >= 128:   # eight dots of K / 8 >= 16 each
            x = _x_tile(x_ptr, rm, m_in, stride_xm, k0 + tl.arange(0, BLOCK_K), K, EVEN_K)
            acc = _int4_planes_dot(w_ptr, rn, n_in, k0, KW, s, z, x, acc, DTYPE, BLOCK_K,
                                   EVEN_K and EVEN_N)
            s, z = _row_scale(s_ptr, z_ptr, gs, rn, n_in, k0 + BLOCK_K, K, G, GROUP, GROUP_SHIFT,
                              FMT, BITS, PER, HAS_ZERO, POW2_GROUP)
        elif PACKED and K_ORDER:   # one dot, x straight from its buffer (Config.k_order)
            w = _int4_packed_k_order(w_ptr, rn, n_in, k0, KW, s, z, DTYPE, BLOCK_K,
                                     EVEN_K and EVEN_N)
            s, z = _row_scale(s_ptr, z_ptr, gs, rn, n_in, k0 + BLOCK_K, K, G, GROUP, GROUP_SHIFT,
                              FMT, BITS, PER, HAS_ZERO, POW2_GROUP)
            x = _x_tile(x_ptr, rm, m_in, stride_xm, k0 + tl.arange(0, BLOCK_K), K, EVEN_K)
            acc = _dot(w, x, acc, SWAP, False)
        elif PACKED:   # two dots, even and odd inputs (see _int4_packed)
            w_even, w_odd = _int4_packed(w_ptr, rn, n_in, k0, KW, s, z, DTYPE, BLOCK_K,
                                         EVEN_K and EVEN_N)
            s, z = _row_scale(s_ptr, z_ptr, gs, rn, n_in, k0 + BLOCK_K, K, G, GROUP, GROUP_SHIFT,
                              FMT, BITS, PER, HAS_ZERO, POW2_GROUP)
            x = _x_tile(x_ptr, rm, m_in, stride_xm, k0 + tl.arange(0, BLOCK_K), K, EVEN_K)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            acc = _dot(w_even, x_even, acc, SWAP, False)
            acc = _dot(w_odd, x_odd, acc, SWAP, False)
        else:
            words = _load_words(w_ptr, rn, n_in, k0 // PER + ri, KW, EVEN_K and EVEN_N)
            w = _weight_tile(words, a, b_lo, b_hi, one_bits, FMT, BITS, EXACT, DTYPE)
            a, b_lo, b_hi = _tile_factors(s_ptr, z_ptr, gs, rn, n_in, k0 + BLOCK_K, K, KW, G,
                                          GROUP, GROUP_SHIFT, FMT, BITS, PER, HAS_ZERO, SCALES,
                                          WPG, POW2_GROUP, EXACT, BLOCK_K // PER)
            x = _x_tile(x_ptr, rm, m_in, stride_xm, k0 + tl.arange(0, BLOCK_K), K, EVEN_K)
            if IEEE:
                x = x.to(tl.float32)
            acc = _dot(w, x, acc, SWAP, IEEE)
    if FMT != 0 and not EXACT:
        acc = acc * 67108864.0   # 2^26: FP4 weights were value * scale * 2^-26 (_fp4_pair)
    if SWAP:
        acc = tl.trans(acc)
    if SPLIT:
        C.finish_split(acc, b_ptr, out_ptr, ws_ptr, cnt_ptr, rm, rn, m_in, n_in, M, N, pid_k,
                       HAS_BIAS)
    else:
        C.finish_tile(acc, b_ptr, out_ptr, rm, rn, m_in, n_in, N, HAS_BIAS)


@triton.jit
def _tc_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, gs_ptr, N, K, KW, G, GROUP, GROUP_SHIFT,
                       one_bits, FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                       HAS_ZERO: tl.constexpr, SCALES: tl.constexpr, WPG: tl.constexpr,
                       POW2_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PACKED: tl.constexpr = False):
    """The whole weight [N, K] in out_ptr's dtype, with the matmul's tile decoder."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    ri = tl.arange(0, BLOCK_K // PER)
    n_in = rn < N
    gs = _nvfp4_gs(gs_ptr, FMT)
    if PACKED:
        s, z = _row_scale(s_ptr, z_ptr, gs, rn, n_in, k0, K, G, GROUP, GROUP_SHIFT, FMT, BITS,
                          PER, HAS_ZERO, POW2_GROUP)
        w_even, w_odd = _int4_packed(w_ptr, rn, n_in, k0, KW, s, z, out_ptr.dtype.element_ty,
                                     BLOCK_K, False)
        w = tl.interleave(w_even, w_odd)   # K order (memory-bound: the re-pairing is free here)
    else:
        a, b_lo, b_hi = _tile_factors(s_ptr, z_ptr, gs, rn, n_in, k0, K, KW, G, GROUP,
                                      GROUP_SHIFT, FMT, BITS, PER, HAS_ZERO, SCALES, WPG,
                                      POW2_GROUP, True, BLOCK_K // PER)
        words = _load_words(w_ptr, rn, n_in, k0 // PER + ri, KW, False)
        w = _weight_tile(words, a, b_lo, b_hi, one_bits, FMT, BITS, True,
                         out_ptr.dtype.element_ty)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w,
             mask=n_in[:, None] & (rk[None, :] < K))


# ---------------------------------------------------------------------------------------------
# Host wrappers (arguments already checked by the format's wrapper, w4a16.py / fp4.py)

ONE_BITS = 0x3F800000   # float32 1.0 as a runtime value: kept in a register (_code_mantissas)
# The packed INT4 decode in K order: None follows the launch config (Config.k_order); True /
# False force it (kernels/bench_kernels.py "@k-order" / "@no-k-order": an A/B in one run). Not
# named K_ORDER: the kernel's constexpr is, and Triton checks the globals a kernel reads.
FORCE_K_ORDER: bool | None = None
# The packed INT4 decode as eight code-slot dots (_int4_planes_dot, Config.planes): None
# follows the launch config; True / False force it (bench_kernels "@planes" / "@no-planes").
# Built after the M = 128 profile (2026-12-05), not yet timed: no shipped config asks for it.
FORCE_PLANES: bool | None = None


def check_config(cfg: C.Config, per: int) -> None:
    C.check(cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k >= max(32, per)
            and cfg.block_k & (cfg.block_k - 1) == 0,
            f"config {cfg}: the tc path needs block_m, block_n >= 16 and block_k a power of two "
            f">= 32")


def swap(cfg: C.Config, ieee: bool, scales: int) -> bool:
    """Compute y^T = W x^T (weight rows on the MMA's 64-row side)? The config's choice, else
    when block_m < 64 (fewer activation rows than a Hopper wgmma's row block). Always for
    float32 activations (their CUDA-core dot x @ w^T spills: ptxas, sm_90, 64x64 tiles), and
    where triton 3.6 cannot compile x @ w^T for sm_90 ("Illegal shared layout" in
    OptimizeDotOperands, found by kernels/compile_check.py --all): per-word scales (SCALES 2),
    and per-row scales with block_n = 32 * num_warps."""
    if ieee or scales == 2 or (scales == 0 and cfg.block_n == 32 * cfg.num_warps):
        return True
    return cfg.block_m < 64 if cfg.swap is None else cfg.swap


def packed_int4(fmt: int, bits: int, dtype: torch.dtype, scale_dtype: torch.dtype,
                scales: int) -> bool:
    """Decode with _int4_packed? INT4, 16-bit weights out, scales stored in that dtype (so the
    packed multiply rounds as the reference), one group a tile (SCALES 0); compiled only (the
    interpreter cannot run PTX: it checks the plain decode)."""
    return (fmt == FMT_INT and bits == 4 and dtype in (torch.bfloat16, torch.float16)
            and scale_dtype == dtype and scales == 0 and os.environ.get("TRITON_INTERPRET") != "1")


def _scale_args(groups: int, group: int, k: int, block_k: int, per: int) -> tuple[dict, int]:
    """(constexprs, GROUP_SHIFT) of the scale lookup (_tile_factors): SCALES 0 when per channel
    or block_k divides the group, 1 when the tile holds whole groups of whole words, else 2;
    the group index by a shift when the group is a power of two (per channel: any power of two
    >= K, so the index is 0)."""
    size = C.next_pow2(k) if groups == 1 else group
    pow2 = size & (size - 1) == 0
    if groups == 1 or group % block_k == 0:
        mode = 0
    elif block_k % group == 0 and group % per == 0 and group // per <= 16:   # _spread's limit
        mode = 1
    else:
        mode = 2
    return (dict(SCALES=mode, WPG=max(1, group // per), POW2_GROUP=pow2),
            size.bit_length() - 1 if pow2 else 0)


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
    ieee = C.dot_in_f32(x2.dtype)
    split, k_per_split = C.split_of(k, cfg)
    grid = (-(-m // cfg.block_m), -(-n // cfg.block_n), split)
    out = C.alloc((m, n), out_dtype, x2.device)
    # split-K: float32 partials, summed by the last program of each tile (C.finish_split)
    ws, counters = C.split_buffers(split, m * n, grid[0] * grid[1], out)
    scale_consts, group_shift = _scale_args(groups, group, k, cfg.block_k, per)
    _tc_matmul_kernel[grid](
        x2, words, scale, zero if zero is not None else words,
        bias if bias is not None else x2, out,
        global_scale if fmt == FMT_NVFP4 else scale, ws, counters,
        m, n, k, words.shape[1], groups, group, group_shift, x2.stride(0), k_per_split,
        ONE_BITS, FMT=fmt, BITS=bits, PER=per, HAS_ZERO=zero is not None,
        SWAP=swap(cfg, ieee, scale_consts["SCALES"]),
        HAS_BIAS=bias is not None, IEEE=ieee, SPLIT=split > 1,
        **scale_consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % k_per_split == 0, EVEN_N=n % cfg.block_n == 0,
        PACKED=packed_int4(fmt, bits, x2.dtype, scale.dtype, scale_consts["SCALES"]),
        K_ORDER=cfg.k_order if FORCE_K_ORDER is None else FORCE_K_ORDER,
        PLANES=cfg.planes if FORCE_PLANES is None else FORCE_PLANES,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **C.pdl_args(x2.device))
    return out


def tc_dequantize(fmt: int, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  global_scale: torch.Tensor | None, n: int, k: int, bits: int, group: int,
                  dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight decoded to dtype, [N, K] (the prefill path, then cuBLAS), into out
    (contiguous [N, K] of dtype) where given."""
    cfg = C.CONFIGS["dequant_words"]
    out = C.alloc((n, k), dtype, words.device) if out is None else out
    scale_consts, group_shift = _scale_args(scale.shape[1], group, k, cfg.block_k, 32 // bits)
    _tc_dequant_kernel[(-(-n // cfg.block_n), -(-k // cfg.block_k))](
        words, scale, zero if zero is not None else words, out,
        global_scale if fmt == FMT_NVFP4 else scale,
        n, k, words.shape[1], scale.shape[1], group, group_shift, ONE_BITS,
        FMT=fmt, BITS=bits, PER=32 // bits, HAS_ZERO=zero is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, **scale_consts,
        PACKED=packed_int4(fmt, bits, dtype, scale.dtype, scale_consts["SCALES"]))
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
