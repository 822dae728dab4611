"""Gather rows of a precomputed per-token table and apply RoPE to the q and k parts.

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
