"""The L2 prefetch kernel asks for exactly the bytes of its ranges: its plan (what it would
prefetch; the interpreter runs no PTX) against the reference, on ranges of uneven sizes."""

from __future__ import annotations

import itertools

import torch

from compress.kernels import prefetch


def test_the_kernel_asks_for_every_byte_of_its_ranges_once():
    a = torch.zeros(3 * prefetch.CHUNK // 4 + 37, dtype=torch.int32)   # 3 chunks and a tail
    b = torch.zeros(100, dtype=torch.bfloat16)                         # under one piece
    c = torch.zeros(5000, dtype=torch.uint8)
    ranges = prefetch.prefetch_ranges([(a, 10 ** 9), (b, 64), (c, 4000)], "cpu")
    assert ranges.chunks == 4
    want = [(a.data_ptr(), a.numel() * 4 // 16 * 16), (b.data_ptr(), 64), (c.data_ptr(), 4000)]
    assert ranges.table.tolist() == [list(r) for r in want]   # clipped to the tensor, 16s
    plan = [tuple(p) for p in prefetch.prefetch_l2(ranges, plan=True).tolist()]
    assert plan == prefetch.prefetch_plan(ranges)
    covered = {}
    for base, size in plan:   # 16-byte aligned pieces, back to back, inside their range
        assert base % 16 == 0 and size % 16 == 0 and 0 < size <= prefetch.CHUNK // prefetch.LANES
        covered.setdefault(max(s for s, _ in want if s <= base), []).append((base, size))
    for start, size in want:
        pieces = covered[start]
        assert pieces[0][0] == start and sum(n for _, n in pieces) == size
        assert all(p + n == q for (p, n), (q, _) in itertools.pairwise(pieces))


def test_ranges_it_cannot_prefetch_are_left_out():
    t = torch.zeros(64, dtype=torch.uint8)
    assert prefetch.prefetch_ranges([(t[1:], 32)], "cpu") is None     # not 16-byte aligned
    assert prefetch.prefetch_ranges([(t, 15)], "cpu") is None         # under 16 bytes
    assert prefetch.prefetch_ranges([(t, 0), (t[16:], 40)], "cpu").table.tolist() == \
        [[t.data_ptr() + 16, 32]]
