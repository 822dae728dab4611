"""Weights asked of L2 ahead of their matmul: one launch that prefetches byte ranges.

A batch-1 decode step reads every weight once from DRAM, in ~130 matmuls, each of which ramps
up, streams and drains; between the q/k/v matmul and o_proj the step runs RoPE, the cache
update and the attention, small kernels that leave DRAM nearly idle for ~10 us a layer
(kernels/NOTES.md). Launched right after q/k/v (runtime/fused.py, L2_PREFETCH_MIB), this kernel
asks L2 for o_proj's weights and the head of the gate/up weights meanwhile, so those matmuls
find part of their bytes in L2 (60 MB on the H200). Each lane issues one bulk prefetch
(`cp.async.bulk.prefetch.L2`, sm_90: the TMA unit's copy engine, no registers, nothing waited
for) and the program ends: the bytes arrive while the next kernels run. A prefetch is only a
hint to the memory system: no result changes, whatever it does.

The ranges: an int64 table [R, 2] of (address, bytes) on the device, made once
(prefetch_ranges); program (r, c) asks for chunk c of range r, a lane a 16-byte-aligned piece.
The reference (prefetch_plan) is the list of (address, bytes) pieces the kernel asks for; the
kernel writes its own list instead of prefetching where PLAN is set (the interpreter, which
runs no PTX, and the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LANES = 32            # one warp a program, a piece a lane
CHUNK = 64 * 1024     # bytes a program asks for: 2 KiB a lane

# $1 the address, $3 the bytes (a multiple of 16 from a 16-byte aligned address), issued where
# $2 != 0; $0 is a dummy output (inline asm must have one). The PTX the ninth session's M = 1
# kernel ran on the H200 (kernels/NOTES.md).
PREFETCH_L2_ASM: tl.constexpr = tl.constexpr("""{
.reg .pred p;
setp.ne.b32 p, $2, 0;
@p cp.async.bulk.prefetch.L2.global [$1], $3;
mov.b32 $0, 0;
}""")


@triton.jit
def _prefetch_l2_kernel(table_ptr, plan_ptr, CHUNK: tl.constexpr, LANES: tl.constexpr,
                        PLAN: tl.constexpr):
    r, c = tl.program_id(0), tl.program_id(1)
    base = tl.load(table_ptr + 2 * r)                  # int64 address, 16-byte aligned
    size = tl.load(table_ptr + 2 * r + 1)              # bytes, a multiple of 16
    PIECE: tl.constexpr = CHUNK // LANES
    start = c.to(tl.int64) * CHUNK + tl.arange(0, LANES).to(tl.int64) * PIECE
    piece = tl.minimum(tl.maximum(size - start, 0), PIECE)
    if PLAN:   # what would be prefetched: [R, chunks, LANES, 2] of (address, bytes)
        out = plan_ptr + ((r * tl.num_programs(1) + c) * LANES + tl.arange(0, LANES)) * 2
        tl.store(out, base + start)
        tl.store(out + 1, piece)
    else:
        tl.inline_asm_elementwise(PREFETCH_L2_ASM, "=r,l,r,r",
                                  [base + start, (piece > 0).to(tl.int32), piece.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@dataclass(frozen=True)
class Ranges:
    """Byte ranges to prefetch: table int64 [R, 2] of (address, bytes) on the device, and the
    programs a range takes (the longest range's chunks), known on the host: reading it from
    the table at each launch would be a host sync, which a CUDA graph capture refuses."""
    table: torch.Tensor
    chunks: int


def prefetch_ranges(ranges: list[tuple[torch.Tensor, int]], device) -> Ranges | None:
    """Ranges of (tensor, bytes from its start), the bytes clipped to the tensor and rounded
    down to 16; a range that does not start 16-byte aligned or holds under 16 bytes is left
    out. None when none is left. The addresses are the tensors' now: a caller whose tensors
    may move keeps their data_ptr()s and makes the ranges again when they change."""
    rows = []
    for t, nbytes in ranges:
        nbytes = min(nbytes, t.numel() * t.element_size()) // 16 * 16
        if nbytes >= 16 and t.data_ptr() % 16 == 0:
            rows.append((t.data_ptr(), nbytes))
    if not rows:
        return None
    return Ranges(torch.tensor(rows, dtype=torch.int64).to(device),
                  -(-max(n for _, n in rows) // CHUNK))


def prefetch_l2(ranges: Ranges, plan: bool = False) -> torch.Tensor | None:
    """Ask L2 for ranges' bytes (one launch, nothing waits for the bytes). plan: prefetch
    nothing, return what the kernel would ask for instead: int64 [pieces, 2] of (address,
    bytes), empty pieces dropped, in prefetch_plan's order."""
    r, chunks = ranges.table.shape[0], ranges.chunks
    out = (torch.empty((r, chunks, LANES, 2), dtype=torch.int64, device=ranges.table.device)
           if plan else ranges.table)
    _prefetch_l2_kernel[(r, chunks)](ranges.table, out, CHUNK=CHUNK, LANES=LANES, PLAN=plan,
                                     num_warps=1)
    if plan:
        pieces = out.reshape(-1, 2)
        return pieces[pieces[:, 1] > 0]
    return None


# ---------------------------------------------------------------------------------------------
# Reference

def prefetch_plan(ranges: Ranges) -> list[tuple[int, int]]:
    """(address, bytes) of every piece the kernel asks L2 for: each range cut into pieces of
    CHUNK / LANES bytes from its start, the last one short."""
    piece = CHUNK // LANES
    plan = []
    for base, size in ranges.table.tolist():
        plan += [(base + s, min(piece, size - s)) for s in range(0, size, piece)]
    return plan
