"""The split-key decode attention kernel against repeat_kv + SDPA: grouped and plain heads,
caches of uneven length, a static cache's -inf tail and random additive masks, one split and
many, every dtype."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES

from compress.kernels import _common as C
from compress.kernels.decode_attention import decode_attention, decode_attention_ref, handles

# (B, H, H_kv, S, D)
CASES = [(1, 8, 2, 37, 64), (2, 6, 6, 200, 32), (1, 4, 1, 130, 16)]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def inputs(case, dtype, mask_kind, rng):
    b, h, hkv, s, d = case
    q = torch.randn(b, h, 1, d, generator=rng).to(dtype)
    k, v = (torch.randn(b, hkv, s, d, generator=rng).to(dtype) for _ in range(2))
    mask = None
    if mask_kind == "static":   # a static cache: the positions past the current token
        length = torch.randint(1, s + 1, (b, 1, 1, 1), generator=rng)
        mask = torch.where(torch.arange(s) < length, 0.0, float("-inf")).to(dtype)
    elif mask_kind == "random":
        mask = (torch.randn(b, 1, 1, s, generator=rng) * 2).to(dtype)
    return q, k, v, mask


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "static", "random"])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_decode_attention_is_sdpa(case, dtype, mask_kind, splits, rng):
    q, k, v, mask = inputs(case, dtype, mask_kind, rng)
    assert handles(q, k, v, mask)
    got = decode_attention(q, k, v, mask, 0.3, splits=splits)
    want = decode_attention_ref(q, k, v, mask, 0.3)
    assert got.shape == (case[0], 1, case[1], case[4]) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype])


def test_splits_leave_their_counters_zero_and_a_strided_query_works(rng):
    """Query as transformers lays it ([B, 1, H, D] transposed), the mask a slice of a longer
    one (a batch stride of its own), several launches in a row on the shared counters."""
    q, k, v, _ = inputs((2, 8, 2, 150, 32), torch.float32, "none", rng)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)           # strides of [B, 1, H, D]
    mask = torch.randn(2, 1, 1, 170, generator=rng)[..., :150]
    for splits in (2, 3, 2):
        got = decode_attention(q, k, v, mask, None, splits=splits)
        torch.testing.assert_close(got, decode_attention_ref(q, k, v, mask), rtol=1e-5,
                                   atol=1e-5)
    assert not C.tile_counters(1, "cpu")[:4].any()


def test_what_it_does_not_take_goes_back_to_the_caller(rng):
    q, k, v, _ = inputs((1, 4, 2, 20, 24), torch.float32, "none", rng)   # D not a power of 2
    assert not handles(q, k, v, None)
    q, k, v, _ = inputs((1, 4, 2, 20, 32), torch.float32, "none", rng)
    assert not handles(q, k, v, torch.zeros(1, 1, 2, 20))               # two query rows
    assert not handles(q, k, v, torch.zeros(1, 1, 1, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="decode_attention: unsupported"):
        decode_attention(q.expand(1, 4, 2, 32), k, v, None)
