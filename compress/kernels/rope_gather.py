"""RoPE kernels: rope_qk, q and k of an attention layer rotated in one launch (every layer of
the decode step: transformers' apply_rotary_pos_emb is ~12 small kernels a layer); and
rope_gather, rows of a precomputed per-token table gathered with RoPE applied to their q and k
parts.

rope_gather:

For the precomputed first layer (compress/passes/precompute.py): each table row is
    [ embedding (d) | q (dq) | k (e) | v (e) ]        q and k before RoPE
but the kernel only needs where the rotated segments are: `rope_segments` = ((offset, width),
...), each width a whole number of heads of `head_dim`. Every other column is copied.
RoPE is transformers' rotate-half form: for i < head_dim/2, out_i = x_i cos_i - x_{i+h/2} sin_i;
for i >= head_dim/2, out_i = x_i cos_i + x_{i-h/2} sin_i, with cos/sin [positions, head_dim]
(the halves repeated, as LlamaRotaryEmbedding returns them).
Float tables only (an int8 table is decoded by its module first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C

MAX_SEGMENTS = 2


@triton.jit
def _rope_gather_kernel(ids_ptr, pos_ptr, table_ptr, cos_ptr, sin_ptr, out_ptr, W,
                        off0, end0, off1, end1, HEAD_DIM: tl.constexpr, BLOCK_W: tl.constexpr):
    tok = tl.program_id(0)
    row = tl.load(ids_ptr + tok).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    for c0 in range(0, W, BLOCK_W):
        cols = c0 + tl.arange(0, BLOCK_W)
        inside = cols < W
        x = tl.load(table_ptr + row * W + cols, mask=inside, other=0.0).to(tl.float32)
        seg0 = (cols >= off0) & (cols < end0)
        seg1 = (cols >= off1) & (cols < end1)
        rot = (seg0 | seg1) & inside
        i = (cols - tl.where(seg0, off0, off1)) % HEAD_DIM          # index within the head
        partner = tl.where(i < HALF, cols + HALF, cols - HALF)
        other = tl.load(table_ptr + row * W + partner, mask=rot, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + pos * HEAD_DIM + i, mask=rot, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HEAD_DIM + i, mask=rot, other=0.0).to(tl.float32)
        rotated = x * cos + tl.where(i < HALF, -other, other) * sin
        y = tl.where(rot, rotated, x)
        tl.store(out_ptr + tok * W + cols, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, L, H,
                    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sc_b, sc_l,
                    HALF: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    """Program (b * L + l, head): head < H rotates q's head, else k's head - H. Outputs have
    the inputs' strides (torch.empty_like of a dense tensor)."""
    C.wait_for_producer(PDL)   # launched with programmatic dependent launch: see _common.PDL
    bl, head = tl.program_id(0), tl.program_id(1)
    b, l = bl // L, bl % L
    i = tl.arange(0, BLOCK_H)
    inside = i < HALF
    c = cos_ptr + b * sc_b + l * sc_l
    c1 = tl.load(c + i, mask=inside, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF + i, mask=inside, other=0.0).to(tl.float32)
    s = sin_ptr + b * sc_b + l * sc_l
    s1 = tl.load(s + i, mask=inside, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF + i, mask=inside, other=0.0).to(tl.float32)
    if head < H:
        offset = b * sq_b + head * sq_h + l * sq_l
        src, dst = q_ptr + offset, qo_ptr + offset
    else:
        offset = b * sk_b + (head - H) * sk_h + l * sk_l
        src, dst = k_ptr + offset, ko_ptr + offset
    x1 = tl.load(src + i, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=inside, other=0.0).to(tl.float32)
    # rotate-half: out = x cos + (-x2, x1) sin, in float32, rounded once
    tl.store(dst + i, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty), mask=inside)
    tl.store(dst + HALF + i, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=inside)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """transformers' apply_rotary_pos_emb(q, k, cos, sin) (rotate-half, unsqueeze_dim 1) in one
    launch: q [B, H, L, D], k [B, Hk, L, D] (any strides with a contiguous last dimension),
    cos/sin [B, L, D]. None where this layout is not the one it handles (the caller falls back)."""
    if not (q.dim() == k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
            and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2] and q.shape[3] == k.shape[3]
            and cos.shape[1:] == (q.shape[2], q.shape[3]) and cos.shape[0] in (1, q.shape[0])
            and cos.stride() == sin.stride() and q.shape[3] % 2 == 0
            and q.stride(3) == k.stride(3) == cos.stride(2) == 1):
        return None
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if qo.stride() != q.stride() or ko.stride() != k.stride():
        return None
    b, h, length, d = q.shape
    if q.numel() and k.numel():
        _rope_qk_kernel[(b * length, h + k.shape[1])](
            q, k, cos, sin, qo, ko, length, h, q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2), 0 if cos.shape[0] == 1 else cos.stride(0),
            cos.stride(1), HALF=d // 2, BLOCK_H=C.next_pow2(d // 2),
            num_warps=1 if d <= 256 else 4,   # a head is 64 pairs: one warp's work
            **C.pdl_args(q.device))
    return qo, ko


def rope_qk_ref(q, k, cos, sin):
    """transformers' rotate-half RoPE in float32 (cos/sin [B, L, D] broadcast over heads)."""
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    return ((q.float() * c + rotate_half(q.float()) * s).to(q.dtype),
            (k.float() * c + rotate_half(k.float()) * s).to(k.dtype))


def _check(ids, positions, table, cos, sin, segments, head_dim):
    C.check(table.dim() == 2 and table.is_floating_point(),
            f"table must be a 2-D float tensor, got {table.dtype} {list(table.shape)}")
    C.check(ids.shape == positions.shape, "ids and positions must have the same shape")
    C.check(cos.shape == sin.shape and cos.dim() == 2 and cos.shape[1] == head_dim,
            f"cos/sin must be [positions, {head_dim}], got {list(cos.shape)}")
    C.check(head_dim % 2 == 0, f"head_dim must be even, got {head_dim}")
    C.check(len(segments) <= MAX_SEGMENTS, f"at most {MAX_SEGMENTS} rotated segments")
    for off, width in segments:
        C.check(0 <= off and off + width <= table.shape[1] and width % head_dim == 0,
                f"segment ({off}, {width}) must lie in the row and hold whole heads of "
                f"{head_dim}")


def rope_gather(ids: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, rope_segments: list[tuple[int, int]],
                head_dim: int) -> torch.Tensor:
    """ids, positions: [...] -> rows [..., W] of table [V, W], rope_segments rotated."""
    _check(ids, positions, table, cos, sin, rope_segments, head_dim)
    segs = list(rope_segments) + [(0, 0)] * (MAX_SEGMENTS - len(rope_segments))
    width = table.shape[1]
    flat_ids = ids.reshape(-1).contiguous()
    out = C.alloc((flat_ids.numel(), width), table.dtype, table.device)
    if flat_ids.numel():
        _rope_gather_kernel[(flat_ids.numel(),)](
            flat_ids, positions.reshape(-1).contiguous(), table.contiguous(), cos.contiguous(),
            sin.contiguous(), out, width, segs[0][0], sum(segs[0]), segs[1][0], sum(segs[1]),
            HEAD_DIM=head_dim, BLOCK_W=min(1024, C.next_pow2(width)))
    return out.reshape(*ids.shape, width)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_gather_ref(ids, positions, table, cos, sin, rope_segments, head_dim) -> torch.Tensor:
    """Gather, then transformers' apply_rotary_pos_emb on each segment (in float32)."""
    rows = table[ids].float()
    c, s = cos[positions].float().unsqueeze(-2), sin[positions].float().unsqueeze(-2)
    for off, width in rope_segments:
        seg = rows[..., off:off + width].unflatten(-1, (width // head_dim, head_dim))
        rows[..., off:off + width] = (seg * c + rotate_half(seg) * s).flatten(-2)
    return rows.to(table.dtype)
