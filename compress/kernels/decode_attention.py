"""Attention of one query token over a KV cache, split along the keys (flash-decoding), in one
launch.

At batch-1 decode each layer attends one token's query heads to the whole cache. SDPA runs
that as a prefill-shaped problem: a program per (batch, head, query block), so Llama-3-8B's
packed heads (8 key/value heads, runtime/attention.py) make 8 programs on 132 SMs, each walking
the whole cache alone (~7 us a layer on the H200 at a 256-token cache, 0.22 ms of a step,
kernels/NOTES.md), and longer caches take proportionally longer. Here program (b, h, split)
takes S_PER keys of key/value head h for all R query heads that share it (one tl.dot of
[R_PAD, D] x [D, BLOCK_S] a block), keeps a running max, sum and weighted values (the online
softmax), and stores them; the last split of (b, h) to arrive (_common.last_to_arrive, as
_common.split_total) rescales and adds the splits' partials in order and stores the output:
no second launch, and the same result whichever split finished last.

The mask is SDPA's additive float mask of one query row, [B, 1, 1, S] (a static cache's
positions past the current token are -inf), added to the scores as SDPA adds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels import _common as C

BLOCK_S = 64     # keys a dot
PROGRAMS = 132   # splits so that B x H_kv x splits is about one program an SM (H200)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, cnt_ptr, S, HKV,
                             scale, sq_b, sq_h, sq_r, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b,
                             so_b, so_h, so_r, S_PER,
                             R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr,
                             IEEE: tl.constexpr, PDL: tl.constexpr = False):
    C.wait_for_producer(PDL)   # q, k, v were written by the kernels just before
    bh, sp = tl.program_id(0), tl.program_id(1)
    b, h = bh // HKV, bh % HKV
    rr = tl.arange(0, R_PAD)
    rd = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rr[:, None] * sq_r + rd[None, :],
                mask=rr[:, None] < R, other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    m = tl.full([R_PAD], float("-inf"), tl.float32)
    l = tl.zeros([R_PAD], dtype=tl.float32)
    acc = tl.zeros([R_PAD, D], dtype=tl.float32)
    first = sp * S_PER
    for s0 in range(first, tl.minimum(first + S_PER, S), BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)
        s_in = rs < S
        k = tl.load(k_ptr + b * sk_b + h * sk_h + rs[:, None] * sk_s + rd[None, :],
                    mask=s_in[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * scale
        if HAS_MASK:
            bias = tl.load(mask_ptr + b * sm_b + rs, mask=s_in, other=0.0).to(tl.float32)
            scores += bias[None, :]
        scores = tl.where(s_in[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row masked so far: no NaN
        p = tl.exp(scores - m_use[:, None])
        alpha = tl.exp(m - m_use)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + rs[:, None] * sv_s + rd[None, :],
                    mask=s_in[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = out_ptr + b * so_b + h * so_h + rr[:, None] * so_r + rd[None, :]
    if SPLIT:
        # partials [B H_kv, splits, R_PAD, D + 2]: acc, then m and l
        part = ws_ptr + (bh * tl.num_programs(1) + sp) * (R_PAD * (D + 2))
        tl.store(part + rr[:, None] * D + rd[None, :], acc)
        tl.store(part + R_PAD * D + rr, m)
        tl.store(part + R_PAD * (D + 1) + rr, l)
        splits = tl.num_programs(1)
        if C.last_to_arrive(cnt_ptr, bh, splits):
            top = tl.full([R_PAD], float("-inf"), tl.float32)
            for i in range(splits):
                at = ws_ptr + (bh * splits + i) * (R_PAD * (D + 2))
                top = tl.maximum(top, tl.load(at + R_PAD * D + rr, cache_modifier=".cg"))
            top_use = tl.where(top == float("-inf"), 0.0, top)
            total = tl.zeros([R_PAD], dtype=tl.float32)
            o = tl.zeros([R_PAD, D], dtype=tl.float32)
            for i in range(splits):   # in split order: the sum does not depend on arrival
                at = ws_ptr + (bh * splits + i) * (R_PAD * (D + 2))
                w = tl.exp(tl.load(at + R_PAD * D + rr, cache_modifier=".cg") - top_use)
                total += w * tl.load(at + R_PAD * (D + 1) + rr, cache_modifier=".cg")
                o += w[:, None] * tl.load(at + rr[:, None] * D + rd[None, :],
                                          cache_modifier=".cg")
            tl.store(out, (o / total[:, None]).to(out_ptr.dtype.element_ty),
                     mask=rr[:, None] < R)
            tl.atomic_xchg(cnt_ptr + bh, 0)
    else:
        tl.store(out, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=rr[:, None] < R)


def handles(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None) -> bool:
    """The shapes the kernel takes: query [B, H, 1, D], key and value [B, H_kv, S, D] with H a
    multiple of H_kv, D a power of two from 16 to 256, 16- or 32-bit floats of one dtype; mask
    None or a float [B or 1, 1, 1, S] with unit stride along the keys."""
    b, h, length, d = query.shape
    return (length == 1 and key.shape[0] == b and h % key.shape[1] == 0
            and key.shape == value.shape and key.shape[3] == d and 16 <= d <= 256
            and d & (d - 1) == 0 and query.dtype == key.dtype == value.dtype
            and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and query.stride(3) == key.stride(3) == value.stride(3) == 1
            and (mask is None or (mask.dim() == 4 and mask.shape[1:3] == (1, 1)
                                  and mask.shape[0] in (1, b) and mask.shape[3] == key.shape[2]
                                  and mask.dtype.is_floating_point
                                  and (mask.stride(3) == 1 or mask.shape[3] == 1))))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scale: float | None = None,
                     splits: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for one query token -> [B, 1, H, D] (transformers'
    attention output layout); query [B, H, 1, D], key / value [B, H_kv, S, D], query head h
    reading key/value head h // (H / H_kv) (as repeat_kv lays them). Shapes as handles();
    splits: key splits (default: about one program an SM)."""
    C.check(handles(query, key, value, mask), "decode_attention: unsupported shapes or dtypes "
            f"(query {list(query.shape)}, key {list(key.shape)}); see handles()")
    b, h, _, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    r = h // hkv
    scale = d ** -0.5 if scale is None else scale
    blocks = -(-s // BLOCK_S)
    splits = max(1, min(splits or -(-PROGRAMS // (b * hkv)), blocks))
    s_per = -(-blocks // splits) * BLOCK_S
    splits = -(-s // s_per)
    r_pad = max(16, C.next_pow2(r))
    out = C.alloc((b, 1, h, d), query.dtype, query.device)
    # partials [B H_kv, splits, R_PAD, D + 2] and a counter per (b, h), as split-K's
    ws, counters = C.split_buffers(splits, b * hkv * r_pad * (d + 2), b * hkv, out)
    _decode_attention_kernel[(b * hkv, splits)](
        query, key, value, mask if mask is not None else query, out, ws, counters, s, hkv,
        scale, query.stride(0), r * query.stride(1), query.stride(1), *key.stride()[:3],
        *value.stride()[:3], 0 if mask is None or mask.shape[0] == 1 else mask.stride(0),
        h * d, r * d, d, s_per,
        R=r, R_PAD=r_pad, D=d, BLOCK_S=BLOCK_S, HAS_MASK=mask is not None, SPLIT=splits > 1,
        IEEE=C.dot_in_f32(query.dtype), num_warps=4, **C.pdl_args(query.device))
    return out


# ---------------------------------------------------------------------------------------------
# Reference

def decode_attention_ref(query, key, value, mask, scale=None) -> torch.Tensor:
    """What decode_attention computes, by repeat_kv and SDPA in float32, cast to query's dtype,
    in [B, 1, H, D]."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = (t.float().repeat_interleave(n_rep, dim=1) for t in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), k, v, attn_mask=None if mask is None else mask.float(), scale=scale)
    return out.transpose(1, 2).to(query.dtype)
