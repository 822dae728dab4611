"""Grouped MoE decode matmul (compress/kernels/moe.py) against its reference: INT4 sym/asym,
INT8, NVFP4 (with per-segment global scales), MXFP4; odd shapes, an expert routed to several
rows, experts routed to none, masked slots (id >= E)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, assert_matmul_close
from test_kernel_fp4 import make_fp4_weight
from test_kernel_w4a16 import make_int_weight

from compress.kernels import _common as C
from compress.kernels.moe import expert_weights_ref, grouped_matmul, grouped_matmul_ref

E = 5
# ids of 8 rows: expert 3 three times, experts 2 and 4 never, one masked slot (E)
IDS = [3, 0, 3, E, 1, 3, 0, 1]


def stacked_int(n, k, group, symmetric, bits, rng, experts=E):
    experts = [make_int_weight(n, k, group, symmetric, bits, rng) for _ in range(experts)]
    packed, scale, zero = (torch.stack(t) if t[0] is not None else None for t in zip(*experts))
    return dict(fmt="int", packed=packed, scale=scale, zero=zero, bits=bits)


def stacked_fp4(fmt, n, k, segments, rng, experts=E):
    experts = [make_fp4_weight(fmt, n, k, rng) for _ in range(experts)]
    packed = torch.stack([p for _, p, _, _ in experts])
    scale = torch.stack([s for _, _, s, _ in experts])
    gs = None
    if fmt == "nvfp4":   # a global scale per expert and row segment, all different
        gs = torch.rand(len(experts), segments, generator=rng) * 2000 + 100
    return dict(fmt=fmt, packed=packed, scale=scale, global_scale=gs)


# name, weights (n, k odd where the format allows), config overrides exercising one scale per
# tile (block_k divides the group) and one per word, several K blocks and N blocks
CASES = {
    "int4-sym-g32": (lambda rng: stacked_int(37, 96, 32, True, 4, rng), 96),
    "int4-asym-g24-k72": (lambda rng: stacked_int(45, 72, 24, False, 4, rng), 72),
    "int4-asym-channel": (lambda rng: stacked_int(29, 100, None, False, 4, rng), 100),
    "int8-asym-g16": (lambda rng: stacked_int(21, 96, 16, False, 8, rng), 96),
    "nvfp4-2seg": (lambda rng: stacked_fp4("nvfp4", 38, 96, 2, rng), 96),
    "nvfp4-1seg": (lambda rng: stacked_fp4("nvfp4", 37, 64, 1, rng), 64),
    "mxfp4": (lambda rng: stacked_fp4("mxfp4", 37, 96, 1, rng), 96),
}
# the shipped M = 1 config (block_k 512: one scale per word) and a small one (block_k 32: one
# scale per tile where the group is a multiple of 32; several K and N blocks). The interpreter
# takes ~1.5 s a launch: every combination in float32, one in the 16-bit dtypes.
SMALL = C.Config(1, 16, 32, num_warps=2)
RUNS = [(torch.float32, 1, None), (torch.float32, 2, SMALL), (torch.float32, 1, SMALL),
        (torch.float32, 2, None), (torch.float16, 2, SMALL), (torch.bfloat16, 1, None)]
assert {dtype for dtype, _, _ in RUNS} == set(DTYPES)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype, rows_per_x, config", RUNS,
                         ids=lambda v: str(v).replace("torch.", "") if v != SMALL else "small")
def test_grouped_matmul_matches_reference(name, dtype, rows_per_x, config, rng):
    make, k = CASES[name]
    w = make(rng)
    ids = torch.tensor(IDS)
    x = torch.randn(len(IDS) // rows_per_x, k, generator=rng).to(dtype)
    ref = grouped_matmul_ref(x, ids, rows_per_x=rows_per_x, **w)
    dense = expert_weights_ref(w["fmt"], w["packed"], w["scale"], w.get("zero"),
                               w.get("global_scale"), k, w.get("bits", 4))
    xr = x.repeat_interleave(rows_per_x, dim=0)
    assert (ref[ids == E] == 0).all()
    y = grouped_matmul(x, ids, rows_per_x=rows_per_x, config=config, **w)
    for r, e in enumerate(IDS):   # row r against its own expert's dense weight
        expert = dense[min(e, E - 1)] * (e < E)
        assert_matmul_close(y[r:r + 1], ref[r:r + 1], xr[r:r + 1], expert,
                            (name, rng.initial_seed()))


def test_reference_is_the_per_expert_matmul(rng):
    """Row r of the reference is x[r // k] @ W_e^T with W_e decoded by the INT reference."""
    from compress.kernels.w4a16 import int_matmul_ref

    w = stacked_int(19, 64, 32, False, 4, rng)
    x = torch.randn(4, 64, generator=rng)
    ids = torch.tensor(IDS)
    ref = grouped_matmul_ref(x, ids, rows_per_x=2, **w)
    dense = expert_weights_ref("int", w["packed"], w["scale"], w["zero"], None, 64, 4)
    for r, e in enumerate(IDS):
        if e < E:
            want = int_matmul_ref(x[r // 2], w["packed"][e], w["scale"][e], w["zero"][e],
                                  (19, 64), 4)
            # the two sum in different orders: equal up to float32 rounding, bounded by
            # |x| @ |W|^T (a fixed 1e-6 failed one seed in 10^3 in CI)
            assert_matmul_close(ref[r:r + 1], want[None], x[r // 2:r // 2 + 1], dense[e])


def test_int32_ids_and_a_strided_x(rng):
    w = stacked_int(24, 64, 32, True, 4, rng)
    x = torch.randn(4, 128, generator=rng)[:, ::2]       # rows not contiguous
    ids = torch.tensor(IDS, dtype=torch.int32)
    torch.testing.assert_close(grouped_matmul(x, ids, rows_per_x=2, **w),
                               grouped_matmul_ref(x, ids.long(), rows_per_x=2, **w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(ids=torch.tensor([0, 1, 2])), "ids must be"),
    (dict(fmt="int3"), "unknown format"),
    (dict(scale=torch.ones(E, 24, 3)), "do not divide"),
    (dict(packed=torch.zeros(E, 24, 9, dtype=torch.int32)), "INT packed must be"),
    (dict(config=C.Config(1, 12, 64)), "powers of two"),
])
def test_bad_arguments_are_one_line_errors(bad, message, rng):
    w = stacked_int(24, 64, 32, True, 4, rng)
    args = dict(x=torch.randn(4, 64), ids=torch.tensor(IDS), rows_per_x=2, **w)
    with pytest.raises(ValueError, match=message):
        grouped_matmul(**{**args, **bad})
