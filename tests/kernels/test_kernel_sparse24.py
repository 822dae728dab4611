"""2:4 kernel (16-bit, INT4, NVFP4, MXFP4 kept values) against its reference and dense math."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from kernel_checks import DTYPES, assert_matmul_close

from compress.kernels import _common as C
from compress.kernels.fp4 import E2M1_VALUES
from compress.kernels.sparse24 import (
    gather_kept,
    kept_positions,
    pack_meta,
    sparse24_dequantize,
    sparse24_dequantize_ref,
    sparse24_matmul,
    sparse24_matmul_ref,
)

PATHS = ["gemv", "splitk", "tile", "dequant"]


def mask_24(n, k, rng):
    """A 2:4 mask with some groups holding fewer than 2 non-zeros (padding is exercised)."""
    order = torch.rand(n, k // 4, 4, generator=rng).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter(-1, order, True)
    return (mask & (torch.rand(n, k // 4, 4, generator=rng) > 0.15)).reshape(n, k)


def make_sparse(kind, n, k, rng, group=32, symmetric=False, dtype=torch.bfloat16):
    """(tensors in the compressed layout, dense weight they stand for); group, symmetric: INT's
    scale group and zero points; dtype: 16-bit values'."""
    mask = mask_24(n, k, rng)
    if kind == "16bit":
        dense = (torch.randn(n, k, generator=rng) * mask).to(dtype)
        pos = kept_positions(dense)
        return {"weight_values": gather_kept(dense, pos), "weight_meta": pack_meta(pos)}, dense
    if kind == "int":
        g = group
        zero = torch.randint(-8, 8, (n, k // g), generator=rng, dtype=torch.int8)
        if symmetric:
            zero.zero_()
        codes = torch.randint(-8, 8, (n, k), generator=rng, dtype=torch.int8)
        codes = torch.where(mask, codes, zero.repeat_interleave(g, 1))  # pruned -> value 0
        scale = torch.rand(n, k // g, generator=rng) + 0.1
        dense = (codes.float() - zero.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)
        pos = kept_positions(dense)
        t = {"weight_packed": pack_to_int32(gather_kept(codes, pos), 4),
             "weight_meta": pack_meta(pos), "weight_scale": scale}
        if not symmetric:
            t["weight_zero_point"] = pack_to_int32(zero, 4, packed_dim=0).contiguous()
        return t, dense
    mags = torch.tensor(E2M1_VALUES)[torch.randint(1, 8, (n, k), generator=rng)]
    e2m1 = mags * (torch.randint(0, 2, (n, k), generator=rng) * 2 - 1) * mask
    pos = kept_positions(e2m1)
    t = {"weight_packed": pack_fp4_to_uint8(gather_kept(e2m1, pos)), "weight_meta": pack_meta(pos)}
    if kind == "nvfp4":
        t["weight_scale"] = (torch.rand(n, k // 16, generator=rng) * 300 + 1).to(
            torch.float8_e4m3fn)
        t["weight_global_scale"] = torch.tensor([120.0])
        scale = t["weight_scale"].float().repeat_interleave(16, 1) / 120.0
    else:
        t["weight_scale"] = torch.randint(118, 132, (n, k // 32), generator=rng,
                                          dtype=torch.uint8)
        scale = torch.exp2(t["weight_scale"].float() - 127).repeat_interleave(32, 1)
    return t, e2m1 * scale


KINDS = ["16bit", "int", "nvfp4", "mxfp4"]
CASES = [(1, 37, 96), (3, 21, 160), (17, 29, 224)]


@pytest.mark.parametrize("kind", KINDS)
def test_reference_reconstructs_the_dense_weight(kind, rng):
    t, dense = make_sparse(kind, 13, 96, rng)
    torch.testing.assert_close(sparse24_dequantize_ref(kind, t, (13, 96)), dense.float(),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}-n{}-k{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse24_matmul_matches_reference_on_every_path(kind, case, dtype, rng):
    m, n, k = case
    t, dense = make_sparse(kind, n, k, rng)
    x = torch.randn(m, k, generator=rng).to(dtype)
    ref = sparse24_matmul_ref(x, kind, t, (n, k))
    for path in PATHS:
        y = sparse24_matmul(x, kind, t, (n, k), path=path)
        assert_matmul_close(y, ref, x, dense, (kind, path, rng.initial_seed()))


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_dequantize_kernel_exact_in_float32(kind, rng):
    t, dense = make_sparse(kind, 11, 160, rng)
    w = sparse24_dequantize(kind, t, (11, 160), 4, torch.float32)
    torch.testing.assert_close(w, dense.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_dequant_path_in_row_chunks(kind, monkeypatch, rng):
    """2:4's dequant path 64 rows at a time (C.DEQUANT_CHUNK_MIB): each chunk with its own
    rows of values, metadata, scales and zero-point words; every column of y written."""
    n, k = 150, 64
    t, dense = make_sparse(kind, n, k, rng)
    bias = torch.randn(n, generator=rng)
    x = torch.randn(3, k, generator=rng)
    monkeypatch.setattr(C, "DEQUANT_CHUNK_MIB", 64 * k * 4 / 2 ** 20)   # 64 float32 rows
    y = sparse24_matmul(x, kind, t, (n, k), bias=bias, path="dequant")
    assert_matmul_close(y, sparse24_matmul_ref(x, kind, t, (n, k), bias=bias), x, dense,
                        bias=bias)


def test_layout_rejects_dense_weights_and_bad_shapes():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        kept_positions(torch.ones(2, 8))
    with pytest.raises(ValueError, match="divisible by 8"):
        sparse24_matmul(torch.randn(1, 12), "16bit", {"weight_meta": torch.zeros(
            2, 1, dtype=torch.uint8)}, (2, 12))


def test_views_are_refused_not_misread(rng):
    """compressed-tensors 0.19 packs zero points (packed_dim=0) into a transposed view; the
    kernel reads raw memory, so a view must be refused, never read in the wrong order."""
    t, _ = make_sparse("int", 21, 160, rng)
    t["weight_zero_point"] = t["weight_zero_point"].T.contiguous().T
    with pytest.raises(ValueError, match="contiguous"):
        sparse24_matmul(torch.randn(1, 160), "int", t, (21, 160))


M1_VARIANTS = ["16bit-bf16", "16bit-fp16", "int-g4", "int-g8-sym", "int-g16", "int-g128-sym"]
TRANSPOSED_CONFIGS = {   # the shipped one; whole tiles (no masks); split-K; N not a tile multiple
    "shipped": None, "even": C.Config(1, 8, 64, 2), "split3": C.Config(1, 4, 64, 1, split_k=3),
    "n16-split2": C.Config(1, 16, 128, 4, split_k=2)}


@pytest.mark.parametrize("variant", M1_VARIANTS)
@pytest.mark.parametrize("config", list(TRANSPOSED_CONFIGS))
@pytest.mark.parametrize("m, k, dtype", [(1, 256, torch.float32), (2, 256, torch.float32),
                                         (2, 384, torch.bfloat16), (1, 384, torch.float16)],
                         ids=["m1-k256-fp32", "m2-k256-fp32", "m2-k384-bf16", "m1-k384-fp16"])
def test_m1_transposed_kernel_picks_x_at_the_kept_positions(variant, config, m, k, dtype, rng,
                                                           monkeypatch):
    """The transposed M = 1 kernel (_sparse24_gemv_kernel: x loaded once for a tile's rows, the
    kept positions picked by selects) on every value kind and scale group it serves, every
    config shape, K a multiple of the tile or of a K-slice or neither, one and two rows;
    float32 activations (selects), 16-bit ones (pairs and a byte permute)."""
    from compress.kernels import sparse24

    if config != "shipped":
        monkeypatch.setattr(sparse24, "GEMV_CONFIG", TRANSPOSED_CONFIGS[config])
    check_m1_path(variant, m, k, rng, dtype)


def check_m1_path(variant, m, k, rng, dtype=torch.float32):
    kind, opt = variant.split("-", 1)
    n = 40
    if kind == "16bit":
        t, _ = make_sparse(kind, n, k, rng, dtype=getattr(torch, {"bf16": "bfloat16",
                                                                   "fp16": "float16"}[opt]))
    else:
        t, _ = make_sparse(kind, n, k, rng, group=int(opt.split("-")[0][1:]),
                           symmetric=opt.endswith("sym"))
    x = torch.randn(m, k, generator=rng).to(dtype)
    bias = torch.randn(n, generator=rng).to(dtype)
    ref = sparse24_matmul_ref(x, kind, t, (n, k), bias=bias)
    y = sparse24_matmul(x, kind, t, (n, k), bias=bias, path="gemv")
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    else:
        assert_matmul_close(y, ref, x, sparse24_dequantize_ref(kind, t, (n, k)),
                            rng.initial_seed(), bias)


@pytest.mark.parametrize("path", ["gemv", "splitk"])
def test_split_k_leaves_its_tile_counters_zero(path, rng, monkeypatch):
    """The transposed M = 1 kernel and the tile kernel in 2, 3 and 5 K-slices a launch: the last
    slice of a tile sums the partials (_common.split_total) and resets the tile's counter, so
    the next launch starts from zero; the output is fully written (poisoned)."""
    from compress.kernels import sparse24

    n, k, m = 40, 512, 1 if path == "gemv" else 5
    t, _ = make_sparse("int", n, k, rng, group=128, symmetric=False)
    x = torch.randn(m, k, generator=rng)
    bias = torch.randn(n, generator=rng)
    for split in (2, 3, 5):
        monkeypatch.setattr(sparse24, "GEMV_CONFIG", C.Config(1, 8, 64, 2, split_k=split))
        y = sparse24_matmul(x, "int", t, (n, k), bias=bias, path=path, split_k=split)
        torch.testing.assert_close(y, sparse24_matmul_ref(x, "int", t, (n, k), bias=bias),
                                   rtol=1e-5, atol=1e-4)
        assert not C.tile_counters(1, x.device).any()
