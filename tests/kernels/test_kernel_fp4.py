"""NVFP4 / MXFP4 kernel against its reference; the reference against compressed-tensors."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from compressed_tensors.compressors.mx_utils import decompress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from kernel_checks import DTYPES, assert_matmul_close

from compress.kernels import _common as C
from compress.kernels import decode
from compress.kernels.fp4 import (
    E2M1_VALUES,
    FORMATS,
    fp4_dequantize,
    fp4_dequantize_ref,
    fp4_matmul,
    fp4_matmul_ref,
)

PATHS = ["decode", "tc", "dequant"]


def make_fp4_weight(fmt, n, k, rng):
    """Values on the E2M1 grid packed with compressed-tensors' own packer, random scales."""
    mags = torch.tensor(E2M1_VALUES)[torch.randint(0, 8, (n, k), generator=rng)]
    signs = torch.randint(0, 2, (n, k), generator=rng) * 2 - 1
    e2m1 = mags * signs
    packed = pack_fp4_to_uint8(e2m1)
    groups = k // FORMATS[fmt]
    if fmt == "nvfp4":
        # include subnormal E4M3 scales (below 2^-6)
        scale = (torch.rand(n, groups, generator=rng) * 300 + 0.001).to(torch.float8_e4m3fn)
        global_scale = torch.tensor([448.0 * 6.0 / 2.7])
    else:
        scale = torch.randint(115, 135, (n, groups), generator=rng, dtype=torch.uint8)
        global_scale = None
    return e2m1, packed, scale, global_scale


CASES = [(1, 37, 96), (3, 45, 160), (17, 29, 224)]  # K % 64 != 0, N odd


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}-n{}-k{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x8", [False, True], ids=["x-slots", "x8"])
def test_fp4_matmul_matches_reference_on_every_path(fmt, case, dtype, x8, rng, monkeypatch):
    """x8: the M = 1 kernel reads x of a word column in one load (decode._fp4_x8_dot), and
    words two at a time as one int64 (decode.PAIR_WORDS; K masked here)."""
    monkeypatch.setattr(decode, "X8_LOADS_FP4", x8)
    monkeypatch.setattr(decode, "PAIR_WORDS", x8)
    m, n, k = case
    _, packed, scale, gs = make_fp4_weight(fmt, n, k, rng)
    bias = torch.randn(n, generator=rng).to(dtype)
    x = torch.randn(m, k, generator=rng).to(dtype)
    ref = fp4_matmul_ref(x, fmt, packed, scale, gs, (n, k), bias=bias)
    w = fp4_dequantize_ref(fmt, packed, scale, gs, (n, k))
    for path in PATHS:
        y = fp4_matmul(x, fmt, packed, scale, gs, (n, k), bias=bias, path=path)
        assert_matmul_close(y, ref, x, w, (fmt, path, rng.initial_seed()), bias)



@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("cfg", [C.Config(1, 16, 256, 1), C.Config(1, 32, 512, 2, 3, 2)], ids=str)
@pytest.mark.parametrize("scale_x", [1.0, 1e-6], ids=["x~1", "x~1e-6"])
@pytest.mark.parametrize("x8", [False, True], ids=["x-slots", "x8"])
@pytest.mark.parametrize("pair", [False, True], ids=["int32-words", "int64-pairs"])
def test_m1_decode_inside_the_matrix(fmt, cfg, scale_x, x8, pair, rng, monkeypatch):
    """N, K multiples of the blocks (no bounds masks): E2M1 decoded as float32 denormal bits
    (decode._fp4_as_f32) times 2^64 x; tiny activations must not lose their products; x read
    by slot or in one load a word column (decode.X8_LOADS_FP4); words read one by one or two
    at a time as one int64 (decode.PAIR_WORDS: one scale a pair)."""
    monkeypatch.setattr(decode, "X8_LOADS_FP4", x8)
    monkeypatch.setattr(decode, "PAIR_WORDS", pair)
    n, k = 64, 1024
    _, packed, scale, gs = make_fp4_weight(fmt, n, k, rng)
    x = torch.randn(1, k, generator=rng) * scale_x
    ref = fp4_matmul_ref(x, fmt, packed, scale, gs, (n, k))
    w = fp4_dequantize_ref(fmt, packed, scale, gs, (n, k))
    y = fp4_matmul(x, fmt, packed, scale, gs, (n, k), path="decode", config=cfg)
    bound = x.abs() @ w.abs().T        # relative only: no absolute floor to hide tiny x
    assert ((y - ref).abs() <= 2e-6 * bound).all(), ((y - ref).abs() / bound).max()

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_reference_decodes_like_compressed_tensors(fmt, rng):
    """E2M1 codes via compressed-tensors' unpacker; E8M0 via its scale decoder; E4M3 by torch."""
    n, k = 8, 64
    e2m1, packed, scale, gs = make_fp4_weight(fmt, n, k, rng)
    values = unpack_fp4_from_uint8(packed, n, k, dtype=torch.float32)
    assert torch.equal(values, e2m1)
    group = FORMATS[fmt]
    if fmt == "mxfp4":
        dense_scale = decompress_mx_scale(scale).float()
    else:
        dense_scale = scale.float() / gs
    expected = values * dense_scale.repeat_interleave(group, dim=1)
    torch.testing.assert_close(fp4_dequantize_ref(fmt, packed, scale, gs, (n, k)), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequantize_kernel_exact_in_float32(fmt, rng):
    """MXFP4 exactly; NVFP4 within two float32 roundings (the kernel multiplies by 2^14 /
    global scale, computed once, where the reference divides each scale)."""
    _, packed, scale, gs = make_fp4_weight(fmt, 19, 96, rng)
    w = fp4_dequantize(fmt, packed, scale, gs, (19, 96), torch.float32)
    torch.testing.assert_close(w, fp4_dequantize_ref(fmt, packed, scale, gs, (19, 96)),
                               rtol=0 if fmt == "mxfp4" else 2.4e-7, atol=0)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequant_path_in_row_chunks(fmt, monkeypatch, rng):
    """The dequant path 64 rows at a time (C.DEQUANT_CHUNK_MIB): every column of y written
    (outputs start as NaN), each chunk with its own rows' scales, the NVFP4 global scale
    shared."""
    n, k = 150, 64
    _, packed, scale, gs = make_fp4_weight(fmt, n, k, rng)
    bias = torch.randn(n, generator=rng)
    x = torch.randn(3, k, generator=rng)
    monkeypatch.setattr(C, "DEQUANT_CHUNK_MIB", 64 * k * 4 / 2 ** 20)   # 64 float32 rows
    y = fp4_matmul(x, fmt, packed, scale, gs, (n, k), bias=bias, path="dequant")
    assert_matmul_close(y, fp4_matmul_ref(x, fmt, packed, scale, gs, (n, k), bias=bias), x,
                        fp4_dequantize_ref(fmt, packed, scale, gs, (n, k)), bias=bias)


def test_fp4_bad_input():
    packed = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="nvfp4 weight_scale must be"):
        fp4_matmul(torch.randn(1, 32), "nvfp4", packed, torch.zeros(4, 2), torch.ones(1), (4, 32))
    with pytest.raises(ValueError, match="mxfp4 needs in_features divisible by 32"):
        fp4_matmul(torch.randn(1, 48), "mxfp4", torch.zeros(4, 24, dtype=torch.uint8),
                   torch.zeros(4, 1, dtype=torch.uint8), None, (4, 48))


@triton.jit
def _e4m3_kernel(b_ptr, out_ptr):
    r = tl.arange(0, 256)
    tl.store(out_ptr + r, C.e4m3_to_f32(tl.load(b_ptr + r).to(tl.int32)))


def test_e4m3_scales_decode_exactly():
    """Every E4M3 code (both signs, the subnormals, zero) as torch decodes it; NaN codes are not
    produced by quantizers."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256)
    _e4m3_kernel[(1,)](codes, out)
    ref = codes.view(torch.float8_e4m3fn).float()
    finite = ~ref.isnan()
    assert finite.sum() == 254
    assert torch.equal(out[finite], ref[finite])
