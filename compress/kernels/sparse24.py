"""2:4 sparse weights times activations, read straight from the compressed layout.

Layout (the sparsify pass writes it; weight [N, K], at most 2 non-zeros in every 4 inputs,
K % 8 == 0):
    weight_meta    uint8 [N, K/8]   per group of 4 inputs two positions p0 < p1 as p0 | p1 << 2
                                    (a nibble); group 2j in the low nibble of byte j
    16-bit:  weight_values [N, K/2] float16/bfloat16, the kept values in order
    INT:     weight_packed int32 [N, K/16] (the kept codes [N, K/2] packed by pack_to_int32),
             weight_scale [N, K/g], weight_zero_point int32 [ceil(N/8), K/g] (optional)
    FP4:     weight_packed uint8 [N, K/4] (kept codes packed two a byte, low nibble first),
             weight_scale and weight_global_scale as the dense format
Scales are indexed by ORIGINAL input position (g counts original inputs, a multiple of 4), so a
kept value in group i uses scale column (4 i) // g.

At M = 1 (the "gemv" path) of 16-bit and INT4 kept values, each kept value is multiplied by x at
its position (_sparse24_gemv_kernel, on decode.py's transposed tile: x loaded once for all the
rows of a tile, each kept value's x picked in registers): the pruned half costs nothing.
Otherwise each tile of kept values is expanded to a dense [BLOCK_N, BLOCK_K] tile in registers
and multiplied as in the dense kernels: the bytes read are the compressed ones (values + meta),
the arithmetic is dense (Triton exposes no sparse tensor-core instruction).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C
from compress.kernels._common import apply_int_scale, mac_tile
from compress.kernels.decode import _group_scale, _load_or_zero, _load_x
from compress.kernels.fp4 import FORMATS as FP4_GROUPS
from compress.kernels.fp4 import (
    e2m1_table,
    fp4_scale_ref,
    unpack_fp4_ref,
)
from compress.kernels.w4a16 import _unpack_ref

VALUE_KINDS = {"16bit": 0, "int": 1, "nvfp4": 2, "mxfp4": 3}
# The M = 1 kernel's launch config: None takes the device's "sparse24" table
# (configs/<gpu>.json, per value kind and shape; written by probe_sparse24_m1.py --out);
# a Config forces one (the probe, tests).
GEMV_CONFIG: C.Config | None = None


@triton.jit
def _unpack_words(words, BITS: tl.constexpr, PER: tl.constexpr, ROWS: tl.constexpr,
                  COLS: tl.constexpr):
    """int32 words [ROWS, COLS // PER] -> signed codes [ROWS, COLS] (element j at bits j*BITS)."""
    shifts = tl.arange(0, PER) * BITS
    vals = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(vals, (ROWS, COLS)) - (1 << (BITS - 1))


@triton.jit
def _unpack_nibbles(bytes_, ROWS: tl.constexpr, COLS: tl.constexpr):
    """uint8 [ROWS, COLS // 2] -> int32 codes [ROWS, COLS]; element 2j is the low nibble."""
    shifts = tl.arange(0, 2) * 4
    vals = (bytes_.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 0xF
    return tl.reshape(vals, (ROWS, COLS))


@triton.jit
def _kept_int(v_ptr, s_ptr, z_ptr, rn, rj, grp, inside, k0, N, K, G, BITS: tl.constexpr,
              PER: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
              HALF: tl.constexpr):
    """Kept INT codes (packed like the dense format, along the kept slots) decoded."""
    rw = k0 // 2 // PER + tl.arange(0, HALF // PER)
    words = tl.load(v_ptr + rn[:, None] * (K // 2 // PER) + rw[None, :],
                    mask=(rn[:, None] < N) & (rw[None, :] < K // 2 // PER), other=0)
    q = _unpack_words(words, BITS, PER, BLOCK_N, HALF).to(tl.float32)
    return apply_int_scale(q, s_ptr, z_ptr, rn, grp, inside, G, BITS, PER, HAS_ZERO)


@triton.jit
def _kept_fp4(v_ptr, s_ptr, lut_ptr, gscale, rn, grp, inside, k0, N, K, G, MX: tl.constexpr,
              BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """Kept E2M1 codes (two a byte) decoded with their group scales."""
    rb = k0 // 4 + tl.arange(0, HALF // 2)
    bytes_ = tl.load(v_ptr + rn[:, None] * (K // 4) + rb[None, :],
                     mask=(rn[:, None] < N) & (rb[None, :] < K // 4), other=0)
    values = tl.load(lut_ptr + _unpack_nibbles(bytes_, BLOCK_N, HALF))
    sbits = tl.load(s_ptr + rn[:, None] * G + grp[None, :], mask=inside, other=0).to(tl.int32)
    if MX:
        s = C.e8m0_to_f32(sbits)
    else:
        s = C.e4m3_to_f32(sbits) / gscale
    return tl.where(inside, values * s, 0.0)


@triton.jit
def _kept_values(v_ptr, s_ptr, z_ptr, lut_ptr, gscale, rn, k0, N, K, G, GROUP,
                 KIND: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                 HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The kept values of inputs k0 .. k0+BLOCK_K as float32 [BLOCK_N, BLOCK_K // 2]."""
    HALF: tl.constexpr = BLOCK_K // 2
    rj = k0 // 2 + tl.arange(0, HALF)                    # kept slot index
    inside = (rn[:, None] < N) & (rj[None, :] < K // 2)
    grp = (4 * (rj // 2)) // GROUP                       # scale column of the original input
    if KIND == 0:
        kept = tl.load(v_ptr + rn[:, None] * (K // 2) + rj[None, :], mask=inside,
                       other=0.0).to(tl.float32)
    elif KIND == 1:
        kept = _kept_int(v_ptr, s_ptr, z_ptr, rn, rj, grp, inside, k0, N, K, G, BITS, PER,
                         HAS_ZERO, BLOCK_N, HALF)
    else:
        kept = _kept_fp4(v_ptr, s_ptr, lut_ptr, gscale, rn, grp, inside, k0, N, K, G, KIND == 3,
                         BLOCK_N, HALF)
    return kept


@triton.jit
def _dense_tile(kept, m_ptr, rn, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scatter kept values [BLOCK_N, BLOCK_K/2] to their positions: dense [BLOCK_N, BLOCK_K]."""
    rb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    meta = tl.load(m_ptr + rn[:, None] * (K // 8) + rb[None, :],
                   mask=(rn[:, None] < N) & (rb[None, :] < K // 8), other=0)
    nib = _unpack_nibbles(meta, BLOCK_N, BLOCK_K // 4)  # one nibble per group of 4
    v0, v1 = tl.split(tl.reshape(kept, (BLOCK_N, BLOCK_K // 4, 2)))
    col = tl.arange(0, 4)[None, None, :]
    dense = (tl.where((nib & 3)[:, :, None] == col, v0[:, :, None], 0.0)
             + tl.where(((nib >> 2) & 3)[:, :, None] == col, v1[:, :, None], 0.0))
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


@triton.jit
def _sparse24_matmul_kernel(x_ptr, v_ptr, m_ptr, s_ptr, z_ptr, lut_ptr, gs_ptr, b_ptr, out_ptr,
                            ws_ptr, cnt_ptr, M, N, K, G, GROUP, stride_xm, K_PER_SPLIT,
                            KIND: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                            HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                            USE_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gscale = 1.0
    if KIND == 2:
        gscale = tl.load(gs_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + kk
        rk = k0 + tl.arange(0, BLOCK_K)
        kept = _kept_values(v_ptr, s_ptr, z_ptr, lut_ptr, gscale, rn, k0, N, K, G, GROUP,
                            KIND, BITS, PER, HAS_ZERO, BLOCK_N, BLOCK_K)
        w = _dense_tile(kept, m_ptr, rn, k0, N, K, BLOCK_N, BLOCK_K)
        acc = mac_tile(acc, x_ptr, w, rm, rk, M, K, stride_xm, USE_DOT, IEEE)
    if SPLIT:
        C.finish_split(acc, b_ptr, out_ptr, ws_ptr, cnt_ptr, rm, rn, rm < M, rn < N, M, N, pid_k,
                       HAS_BIAS)
    else:
        C.finish_tile(acc, b_ptr, out_ptr, rm, rn, rm < M, rn < N, N, HAS_BIAS)


@triton.jit
def _half_as_f32(bits16, FP16: tl.constexpr):
    """The 16-bit float in the low half of int32 `bits16` (the high half zero) as float32."""
    if FP16:
        return bits16.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (bits16 << 16).to(tl.float32, bitcast=True)   # bfloat16: float32's top half


@triton.jit
def _pick(x0, x1, x2, x3, p):
    """x_p, for 2-bit positions p [E, BN] and x0..x3 [E, 1]: three selects on p's two bits."""
    odd = (p & 1) != 0
    return tl.where((p & 2) != 0, tl.where(odd, x3, x2), tl.where(odd, x1, x0))


@triton.jit
def _prmt(a, b, sel, ASM: tl.constexpr):
    """PTX prmt.b32: byte i of the result is byte (sel >> 4 i) & 7 of the 8 bytes b:a (a the
    low four). ASM False: the same in integer ops (the interpreter runs no PTX)."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel],
                                         dtype=tl.int32, is_pure=True, pack=1)
    out = tl.zeros_like(sel)
    for i in tl.static_range(4):
        idx = (sel >> (4 * i)) & 7
        out |= ((tl.where(idx >= 4, b, a) >> ((idx & 3) * 8)) & 0xFF) << (8 * i)
    return out


@triton.jit
def _pick_pair16(x01, x23, nib, X_FP16: tl.constexpr, ASM: tl.constexpr):
    """(x_p0, x_p1) as float32 for a group of four 16-bit activations held as two int32 pairs
    x01, x23 [E, 1] and its meta nibble p0 | p1 << 2 [E, BN]: one byte permute puts x_p0 in the
    low and x_p1 in the high half of a register (the selector's nibbles are the byte indices
    2 p0, 2 p0 + 1, 2 p1, 2 p1 + 1: two multiply-adds), each half then a float32 in one op.
    _pick's three selects a value cost more, and x is loaded a pair at a time."""
    sel = (nib & 3) * 0x22 + ((nib & 0xC) * 0x880 + 0x1010)
    both = _prmt(tl.broadcast_to(x01, sel.shape), tl.broadcast_to(x23, sel.shape), sel, ASM)
    if X_FP16:
        return _half_as_f32(both & 0xFFFF, True), _half_as_f32((both >> 16) & 0xFFFF, True)
    return (both << 16).to(tl.float32, bitcast=True), \
        (both & -65536).to(tl.float32, bitcast=True)   # bfloat16: float32's top half


@triton.jit
def _sparse24_gemv_kernel(x_ptr, v_ptr, m_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N,
                          stride_xm, K: tl.constexpr, G: tl.constexpr, GROUP: tl.constexpr,
                          E_PER_SPLIT: tl.constexpr, KIND: tl.constexpr, FP16: tl.constexpr,
                          HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, EVEN_N: tl.constexpr,
                          X16: tl.constexpr = False, X_FP16: tl.constexpr = False,
                          ASM: tl.constexpr = True):
    """y [N] = W x for activation row program_id(2), 16-bit (KIND 0) or INT4 (KIND 1) kept values:
    each kept value costs its decode, two meta bits, its pick of x and one FMA; the pruned half
    nothing. An "element" of a row is what one thread takes per step: 16-bit, an int64 of 4 kept
    values (2 groups, 8 inputs) and the meta byte of those groups; INT4, an int32 word of 8 kept
    codes (4 groups, 16 inputs) and its 16 meta bits.

    The tile is transposed (as decode._gemv_kernel's): [BLOCK_E, BLOCK_N], a thread owns element
    columns with all BLOCK_N rows of each in registers. x of a column's inputs is loaded once for
    all its rows (the gather kernel this replaced loaded x per kept value and row: 8 of its 11
    loads an INT4 element, and the 64-bit address of each; H200, 2026-12-04: 16-bit 1.08-1.32x
    -> 1.47-1.55x cuBLAS bf16, INT4 1.42-1.57x -> 1.76-2.00x), and each kept value takes x at
    its position: X16 (16-bit activations, 4-byte aligned rows) two at a time by a byte permute
    (_pick_pair16), else by three selects (_pick). Program axes: rows, K-slices (E_PER_SPLIT
    elements), activation row."""
    GPE: tl.constexpr = 2 if KIND == 0 else 4          # groups of 4 inputs per element
    IPE: tl.constexpr = 4 * GPE
    EW: tl.constexpr = K // IPE                         # elements per row
    EVEN_K: tl.constexpr = EW % E_PER_SPLIT == 0        # (E_PER_SPLIT: whole BLOCK_Es)
    MASKED: tl.constexpr = not (EVEN_K and EVEN_N)
    PER_ELEMENT: tl.constexpr = GROUP % IPE == 0        # an element's inputs share one scale
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, BLOCK_N)
    rn = pid_n * BLOCK_N + rows
    n_in = rn < N
    ri = tl.arange(0, BLOCK_E)
    e_first = pid_k * E_PER_SPLIT
    # scalar base pointers, small per-element offsets (the reason is in decode._gemv_kernel)
    v_prog = v_ptr + pid_n * BLOCK_N * EW + e_first
    m_prog = m_ptr + pid_n * BLOCK_N * EW + e_first
    x_prog = x_ptr + row * stride_xm + e_first * IPE
    offs = tl.max_contiguous(ri[:, None] + rows[None, :] * EW, [1, 1])
    acc = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    for ee in range(0, E_PER_SPLIT, BLOCK_E):
        e = e_first + ee + ri                             # this tile's elements of the row
        inside = (e[:, None] < EW) & n_in[None, :]
        v = _load_or_zero(v_prog + ee + offs, inside, MASKED)
        meta = _load_or_zero(m_prog + ee + offs, inside, MASKED).to(tl.int32)
        x_at = x_prog + tl.max_contiguous(((ee + ri) * IPE)[:, None], [1, 1])   # input 0
        if KIND == 1 and PER_ELEMENT:
            s, z = _group_scale(s_ptr, z_ptr, 1.0, rows[None, :], ((e * IPE) // GROUP)[:, None],
                                inside, G, 0, 4, 8, HAS_ZERO, MASKED, True, pid_n * BLOCK_N)
            t = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        for gi in tl.static_range(GPE):
            nib = meta >> (4 * gi)
            if X16:   # the group's 4 inputs as two int32 pairs
                pair_at = x_at.to(tl.pointer_type(tl.int32)) + 2 * gi
                x01 = _load_or_zero(pair_at, e[:, None] < EW, not EVEN_K)
                x23 = _load_or_zero(pair_at + 1, e[:, None] < EW, not EVEN_K)
                xa, xb = _pick_pair16(x01, x23, nib, X_FP16, ASM)
            else:
                x0 = _load_x(x_at + 4 * gi, e[:, None], EW, EVEN_K)
                x1 = _load_x(x_at + 4 * gi + 1, e[:, None], EW, EVEN_K)
                x2 = _load_x(x_at + 4 * gi + 2, e[:, None], EW, EVEN_K)
                x3 = _load_x(x_at + 4 * gi + 3, e[:, None], EW, EVEN_K)
                xa = _pick(x0, x1, x2, x3, nib)
                xb = _pick(x0, x1, x2, x3, nib >> 2)
            if KIND == 0:
                word = (v >> (32 * gi)).to(tl.int32)    # kept values 2 gi, 2 gi + 1
                acc += _half_as_f32(word & 0xFFFF, FP16) * xa
                acc += _half_as_f32((word >> 16) & 0xFFFF, FP16) * xb
            else:
                if not PER_ELEMENT:   # groups of 4 or 8 inputs: a scale per group
                    s, z = _group_scale(s_ptr, z_ptr, 1.0, rows[None, :],
                                        ((e * IPE + 4 * gi) // GROUP)[:, None], inside, G, 0,
                                        4, 8, HAS_ZERO, MASKED, True, pid_n * BLOCK_N)
                # a code as a float without a conversion: (c | 0x4B000000) is 2^23 + c; the
                # subtraction of 2^23 + 8 + zero is exact, so q is the integer code - 8 - zero
                off = 8388616.0 + z
                qa = (((v >> (8 * gi)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - off
                qb = (((v >> (8 * gi + 4)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - off
                if PER_ELEMENT:
                    t += qa * xa
                    t += qb * xb
                else:
                    acc += s * (qa * xa + qb * xb)
        if KIND == 1 and PER_ELEMENT:
            acc += s * t
    y = tl.sum(acc, axis=0)
    last = True
    if SPLIT:   # the K-slices' sums added by the last to finish (as decode._gemv_kernel)
        last, y = C.row_split_total(y, ws_ptr, cnt_ptr, pid_n, pid_k, row, BLOCK_N)
    if last:
        rm = row + tl.arange(0, 1)
        C.finish_tile(tl.reshape(y, (1, BLOCK_N)), b_ptr, out_ptr, rm, rn, rm >= 0, n_in, N,
                      HAS_BIAS)


@triton.jit
def _sparse24_dequant_kernel(v_ptr, m_ptr, s_ptr, z_ptr, lut_ptr, gs_ptr, out_ptr,
                             N, K, G, GROUP, KIND: tl.constexpr, BITS: tl.constexpr,
                             PER: tl.constexpr, HAS_ZERO: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    gscale = 1.0
    if KIND == 2:
        gscale = tl.load(gs_ptr).to(tl.float32)
    kept = _kept_values(v_ptr, s_ptr, z_ptr, lut_ptr, gscale, rn, k0, N, K, G, GROUP,
                        KIND, BITS, PER, HAS_ZERO, BLOCK_N, BLOCK_K)
    w = _dense_tile(kept, m_ptr, rn, k0, N, K, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rk[None, :] < K))


# ---------------------------------------------------------------------------------------------
# Host wrapper

def _check(kind, t, n, k, bits):
    C.check(kind in VALUE_KINDS, f"unknown 2:4 value kind {kind!r}; use {sorted(VALUE_KINDS)}")
    C.check(k % 8 == 0, f"2:4 storage needs in_features divisible by 8, got {k}")
    meta = t["weight_meta"]
    C.check(all(v.is_contiguous() for v in t.values()),  # the kernel reads raw memory
            "2:4 tensors must be contiguous (call .contiguous() on views)")
    C.check(meta.dtype == torch.uint8 and meta.shape == (n, k // 8),
            f"weight_meta must be uint8 [{n}, {k // 8}], got {meta.dtype} {list(meta.shape)}")
    if kind == "16bit":
        v = t["weight_values"]
        C.check(v.dtype in (torch.float16, torch.bfloat16) and v.shape == (n, k // 2),
                f"weight_values must be float16/bfloat16 [{n}, {k // 2}], got {v.dtype} "
                f"{list(v.shape)}")
        return
    v, s = t["weight_packed"], t["weight_scale"]
    if kind == "int":
        per = 32 // bits
        C.check(k // 2 % per == 0, f"2:4 int{bits} needs in_features divisible by {2 * per}")
        C.check(v.dtype == torch.int32 and v.shape == (n, k // 2 // per),
                f"weight_packed must be int32 [{n}, {k // 2 // per}], got {v.dtype} "
                f"{list(v.shape)}")
        C.check(s.shape[0] == n and k % s.shape[1] == 0 and (k // s.shape[1]) % 4 == 0,
                f"weight_scale must be [{n}, K/g] with g a multiple of 4, got {list(s.shape)}")
    else:
        group = FP4_GROUPS[kind]
        C.check(k % group == 0, f"{kind} needs in_features divisible by {group}, got {k}")
        C.check(v.dtype == torch.uint8 and v.shape == (n, k // 4),
                f"weight_packed must be uint8 [{n}, {k // 4}], got {v.dtype} {list(v.shape)}")
        C.check(s.shape == (n, k // group), f"weight_scale must be [{n}, {k // group}]")
        if kind == "nvfp4":
            C.check("weight_global_scale" in t, "nvfp4 needs weight_global_scale")


def _launch_args(kind, t, bits, device):
    """(values, scale, zero, lut, global scale, scale columns) as kernel arguments; tensors a
    kind does not read are passed as placeholders."""
    meta = t["weight_meta"]
    if kind == "16bit":
        v = t["weight_values"]
        return v, meta, meta, meta, meta, 1
    v, s = t["weight_packed"], t["weight_scale"]
    z = t.get("weight_zero_point", v)
    gs = t["weight_global_scale"].float() if kind == "nvfp4" else s
    scale = s.view(torch.uint8) if s.dtype == torch.float8_e4m3fn else s
    return v, scale, z, e2m1_table(device), gs, s.shape[1]


def sparse24_matmul(x: torch.Tensor, kind: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int], bits: int = 4, bias: torch.Tensor | None = None,
                    path: str | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) for a 2:4 weight W [N, K] in compressed storage; kind is
    "16bit", "int", "nvfp4" or "mxfp4"."""
    n, k = shape
    _check(kind, tensors, n, k, bits)
    x2 = C.activation_2d(x, k)
    m = x2.shape[0]
    path = path or C.choose_path(m, device=x.device)
    if path == "dequant":
        def decode_rows(n0, n1, out):
            return _dequantize_rows(kind, _rows(tensors, n0, n1, bits), n1 - n0, k, bits,
                                    x.dtype, out)

        return C.dequant_linear(x2, decode_rows, n, k, bias).reshape(*x.shape[:-1], n)
    if path == "gemv" and m1_serves(kind, bits):
        return _m1_matmul(x2, kind, tensors, n, k, bias).reshape(*x.shape[:-1], n)
    v, s, z, lut, gs, groups = _launch_args(kind, tensors, bits, x.device)
    cfg, grid, k_per_split = C.launch_plan(path, m, n, k, split_k, x.device)
    out = C.alloc((m, n), x.dtype, x.device)
    ws, counters = C.split_buffers(grid[2], m * n, grid[0] * grid[1], out)
    _sparse24_matmul_kernel[grid](
        x2, v, tensors["weight_meta"], s, z, lut, gs, bias if bias is not None else x2, out,
        ws, counters, m, n, k, groups, k // groups, x2.stride(0), k_per_split,
        KIND=VALUE_KINDS[kind], BITS=bits, PER=32 // bits,
        HAS_ZERO="weight_zero_point" in tensors, HAS_BIAS=bias is not None, SPLIT=grid[2] > 1,
        USE_DOT=path != "gemv", IEEE=C.dot_in_f32(x.dtype), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out.reshape(*x.shape[:-1], n)


def m1_serves(kind: str, bits: int) -> bool:
    """Does the M = 1 kernel (_sparse24_gemv_kernel) run the "gemv" path of this value kind?
    (FP4 and INT8 kept values still take the dense-tile kernel.)"""
    return kind == "16bit" or (kind == "int" and bits == 4)


def _m1_matmul(x2: torch.Tensor, kind: str, t: dict[str, torch.Tensor], n: int, k: int,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x2 [M, K] @ W^T, one program axis per activation row (_sparse24_gemv_kernel): the 16-bit
    values read as int64 (4 a load), INT4's meta as int16 (the 4 groups of a code word); split-K
    in one launch (the last K-slice of each program's rows sums the slices' partials:
    C.split_total)."""
    meta = t["weight_meta"]
    if kind == "16bit":
        v, ipe = t["weight_values"].view(torch.int64), 8
        s = z = meta   # placeholders: 16-bit values have no scale
        groups = group = 1
    else:
        v, meta, ipe = t["weight_packed"], meta.view(torch.int16), 16
        s, z = t["weight_scale"], t.get("weight_zero_point", t["weight_packed"])
        groups = s.shape[1]
        group = k // groups
    cfg = GEMV_CONFIG or C.kernel_config("sparse24", kind, 1, n, k, x2.device)
    m = x2.shape[0]
    C.check(cfg.block_k % ipe == 0 and m <= 65535,
            f"config {cfg}: block_k must be a multiple of {ipe} and at most 65535 rows, got {m}")
    split, k_per_split = C.split_of(k, cfg)
    grid_n = -(-n // cfg.block_n)
    out = C.alloc((m, n), x2.dtype, x2.device)
    ws, counters = C.split_buffers(split, m * grid_n * cfg.block_n, m * grid_n, out)
    if m:
        _sparse24_gemv_kernel[(grid_n, split, m)](
            x2, v, meta, s, z, bias if bias is not None else x2, out, ws, counters, n,
            x2.stride(0),
            K=k, G=groups, GROUP=group, E_PER_SPLIT=k_per_split // ipe,
            KIND=0 if kind == "16bit" else 1,
            FP16=kind == "16bit" and t["weight_values"].dtype == torch.float16,
            HAS_ZERO="weight_zero_point" in t, HAS_BIAS=bias is not None, SPLIT=split > 1,
            BLOCK_N=cfg.block_n, BLOCK_E=cfg.block_k // ipe, EVEN_N=n % cfg.block_n == 0,
            # pairs of 16-bit activations as int32: rows 4-byte aligned
            X16=(x2.dtype in (torch.float16, torch.bfloat16) and x2.stride(0) % 2 == 0
                 and x2.data_ptr() % 4 == 0),
            X_FP16=x2.dtype == torch.float16, ASM=os.environ.get("TRITON_INTERPRET") != "1",
            num_warps=cfg.num_warps, num_stages=1)
    return out


def sparse24_dequantize(kind: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int],
                        bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in dtype (the prefill path, then cuBLAS)."""
    n, k = shape
    _check(kind, tensors, n, k, bits)
    return _dequantize_rows(kind, tensors, n, k, bits, dtype, None)


def _rows(t: dict[str, torch.Tensor], n0: int, n1: int, bits: int) -> dict[str, torch.Tensor]:
    """Rows n0..n1 of a 2:4 weight's tensors (zero points: 32 / bits rows a word, n0 a multiple
    of that; the NVFP4 global scale is the whole weight's)."""
    per = 32 // bits
    return {name: v if name == "weight_global_scale" else
            v[n0 // per:-(-n1 // per)] if name == "weight_zero_point" else v[n0:n1]
            for name, v in t.items()}


def _dequantize_rows(kind: str, tensors: dict[str, torch.Tensor], n: int, k: int, bits: int,
                     dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """sparse24_dequantize's launch, its arguments checked by the caller; into out if given."""
    device = tensors["weight_meta"].device
    v, s, z, lut, gs, groups = _launch_args(kind, tensors, bits, device)
    cfg = C.CONFIGS["dequant"]
    out = C.alloc((n, k), dtype, device) if out is None else out
    _sparse24_dequant_kernel[(-(-n // cfg.block_n), -(-k // cfg.block_k))](
        v, tensors["weight_meta"], s, z, lut, gs, out, n, k, groups, k // groups,
        KIND=VALUE_KINDS[kind], BITS=bits, PER=32 // bits,
        HAS_ZERO="weight_zero_point" in tensors, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps)
    return out


# ---------------------------------------------------------------------------------------------
# Reference and layout builders (the sparsify pass owns the real writer; tests build with these)

def kept_positions(dense: torch.Tensor) -> torch.Tensor:
    """int64 [N, K/4, 2]: per group of 4 the non-zero positions, padded with zero positions,
    ascending. Raises if a group has more than 2 non-zeros."""
    n, k = dense.shape
    nonzero = (dense != 0).reshape(n, k // 4, 4)
    if (nonzero.sum(-1) > 2).any():
        raise ValueError("weight is not 2:4 sparse (a group of 4 inputs has > 2 non-zeros)")
    key = (~nonzero).long() * 4 + torch.arange(4)  # non-zeros first, then by position
    return key.argsort(-1)[..., :2].sort(-1).values


def pack_meta(positions: torch.Tensor) -> torch.Tensor:
    """[N, K/4, 2] positions -> uint8 [N, K/8] (group 2j in the low nibble of byte j)."""
    nib = (positions[..., 0] | positions[..., 1] << 2).to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def gather_kept(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The entries of t [N, K] at the kept positions, in order: [N, K/2]."""
    n, k = t.shape
    return t.reshape(n, k // 4, 4).gather(-1, positions).reshape(n, k // 2)


def meta_positions_ref(meta: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/8] -> original input index of every kept slot, int64 [N, K/2]."""
    nib = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1).long()
    pos = torch.stack([nib & 3, (nib >> 2) & 3], dim=-1)              # [N, K/4, 2]
    base = 4 * torch.arange(pos.shape[1], device=meta.device)[None, :, None]
    return (base + pos).reshape(meta.shape[0], -1)


def sparse24_dequantize_ref(kind: str, tensors: dict[str, torch.Tensor], shape, bits: int = 4):
    """float32 [N, K]: kept values decoded with the scale of their original position, placed."""
    n, k = shape
    orig = meta_positions_ref(tensors["weight_meta"])
    if kind == "16bit":
        kept = tensors["weight_values"].float()
    elif kind == "int":
        s = tensors["weight_scale"].float()
        group = k // s.shape[1]
        q = _unpack_ref(tensors["weight_packed"], bits, k // 2).float()
        if "weight_zero_point" in tensors:
            z = _unpack_ref(tensors["weight_zero_point"].T.contiguous(), bits, n).T.float()
            q = q - z.gather(1, orig // group)
        kept = q * s.gather(1, orig // group)
    else:
        scale = fp4_scale_ref(kind, tensors["weight_scale"], tensors.get("weight_global_scale"))
        values = e2m1_table(orig.device)[unpack_fp4_ref(tensors["weight_packed"])]
        kept = values * scale.gather(1, orig // FP4_GROUPS[kind])
    return torch.zeros(n, k, device=orig.device).scatter(1, orig, kept)


def sparse24_matmul_ref(x, kind, tensors, shape, bits: int = 4, bias=None) -> torch.Tensor:
    w = sparse24_dequantize_ref(kind, tensors, shape, bits)
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)
