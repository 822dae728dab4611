"""INT4/INT8 kernel against its reference, on odd shapes, every path and dtype."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from kernel_checks import DTYPES, TOLERANCE, assert_matmul_close, record_launches

from compress.kernels import _common as C
from compress.kernels import decode
from compress.kernels.w4a16 import int_dequantize, int_dequantize_ref, int_matmul, int_matmul_ref

PATHS = ["decode", "tc", "dequant"]
# one rounding to the dtype (the interpreter truncates to bfloat16: a full ulp)
ONE_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -7}


def make_int_weight(n, k, group, symmetric, bits, rng, scale_dtype=torch.float32):
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    groups = k // group if group else 1
    codes = torch.randint(lo, hi, (n, k), generator=rng, dtype=torch.int8)
    scale = (torch.rand(n, groups, generator=rng) * 0.1 + 0.01).to(scale_dtype)
    zero = None
    if not symmetric:
        zero = pack_to_int32(torch.randint(lo, hi, (n, groups), generator=rng, dtype=torch.int8),
                             bits, packed_dim=0).contiguous()
    return pack_to_int32(codes, bits), scale, zero


# (M, N, K, group, symmetric, bits): N and K not multiples of any block; K not a multiple of 8
# where the format allows it (per-channel); M = 1, 3, 17, 33 cover every path's edges.
CASES = [
    (1, 37, 256, 32, True, 4),
    (3, 45, 200, 8, False, 4),
    (17, 29, 192, 64, False, 4),
    (5, 33, 100, None, True, 4),     # per channel, K % 8 != 0
    (33, 21, 96, 16, False, 8),      # INT8 with zero points
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}-n{}-k{}-g{}-{}-int{}".format(
    c[0], c[1], c[2], c[3], "sym" if c[4] else "asym", c[5]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int_matmul_matches_reference_on_every_path(case, dtype, rng):
    m, n, k, group, symmetric, bits = case
    packed, scale, zero = make_int_weight(n, k, group, symmetric, bits, rng)
    x = torch.randn(m, k, generator=rng).to(dtype)
    ref = int_matmul_ref(x, packed, scale, zero, (n, k), bits)
    w = int_dequantize_ref(packed, scale, zero, (n, k), bits)
    for path in PATHS:
        y = int_matmul(x, packed, scale, zero, (n, k), bits, path=path)
        assert_matmul_close(y, ref, x, w, (path, rng.initial_seed()))


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_and_bias_and_batch_dims(split_k, rng):
    n, k = 19, 320
    packed, scale, zero = make_int_weight(n, k, 32, False, 4, rng, torch.bfloat16)
    bias = torch.randn(n, generator=rng)
    x = torch.randn(2, 3, k, generator=rng)          # [B, S, K]: leading dims are kept
    y = int_matmul(x, packed, scale, zero, (n, k), 4, bias=bias, path="tc", split_k=split_k,
                   config=C.Config(16, 16, 64))
    ref = int_matmul_ref(x, packed, scale, zero, (n, k), 4, bias=bias)
    assert y.shape == (2, 3, n)
    w = int_dequantize_ref(packed, scale, zero, (n, k), 4)
    assert_matmul_close(y.reshape(6, n), ref.reshape(6, n), x.reshape(6, k), w, bias=bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_kernel_within_one_rounding(dtype, rng):
    packed, scale, zero = make_int_weight(27, 136, 8, False, 4, rng)
    w = int_dequantize(packed, scale, zero, (27, 136), 4, dtype)
    assert w.dtype == dtype
    torch.testing.assert_close(w.float(), int_dequantize_ref(packed, scale, zero, (27, 136), 4),
                               rtol=ONE_ROUNDING[dtype], atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequant_path_in_row_chunks(bits, monkeypatch, rng):
    """The dequant path decoding W 128 rows at a time into one buffer (C.DEQUANT_CHUNK_MIB):
    3 chunks of N = 300 (the last one short, zero-point words split between chunks), every
    column of y written (outputs start as NaN), bias sliced with them."""
    from compress.kernels import tc

    n, k = 300, 64
    packed, scale, zero = make_int_weight(n, k, 32, False, bits, rng)
    bias = torch.randn(n, generator=rng)
    x = torch.randn(5, k, generator=rng)
    launches = record_launches(monkeypatch, tc, "_tc_dequant_kernel", "BITS")
    monkeypatch.setattr(C, "DEQUANT_CHUNK_MIB", 128 * k * 4 / 2 ** 20)   # 128 float32 rows
    y = int_matmul(x, packed, scale, zero, (n, k), bits, bias=bias, path="dequant")
    assert launches == [bits] * 3
    assert_matmul_close(y, int_matmul_ref(x, packed, scale, zero, (n, k), bits, bias=bias), x,
                        int_dequantize_ref(packed, scale, zero, (n, k), bits), bias=bias)
    monkeypatch.setattr(C, "DEQUANT_CHUNK_MIB", 0)   # 0: the whole weight, one launch
    whole = int_matmul(x, packed, scale, zero, (n, k), bits, bias=bias, path="dequant")
    assert len(launches) == 4
    torch.testing.assert_close(y, whole, rtol=1e-6, atol=1e-6)


def test_the_chunk_size_comes_from_the_gpu_table(tmp_path, monkeypatch):
    """"paths": {"dequant_chunk_mib": ..} sets the rows a chunk (a multiple of 64, at least
    64, at most N); without it, or with C.DEQUANT_CHUNK_MIB = 0, the whole weight."""
    cpu = torch.device("cpu")
    assert C.dequant_chunk_rows(14336, 4096, 2, cpu) == 14336
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"paths": {"dequant_chunk_mib": 16}}))
    monkeypatch.setenv(C.CONFIG_ENV, str(path))
    assert C.dequant_chunk_rows(14336, 4096, 2, cpu) == 2048      # 16 MiB of bf16 rows
    assert C.dequant_chunk_rows(14336, 4096 * 3, 2, cpu) == 640    # 682 rounded down to 64s
    assert C.dequant_chunk_rows(1000, 4096, 2, cpu) == 1000
    assert C.dequant_chunk_rows(14336, 10 ** 6, 2, cpu) == 64
    monkeypatch.setattr(C, "DEQUANT_CHUNK_MIB", 0)
    assert C.dequant_chunk_rows(14336, 4096, 2, cpu) == 14336


def test_reference_equals_intq_codec(rng):
    """The kernel's reference reads the tensors exactly as compress.formats.intq writes them."""
    from compress.formats import WeightFormat, codec

    for fmt in (WeightFormat(group_size=32, symmetric=False),
                WeightFormat(bits=8, group_size=None)):
        w = torch.randn(24, 96, generator=rng)
        q = codec(fmt).quantize(w, fmt)
        t = codec(fmt).pack(q)
        ours = int_dequantize_ref(t["weight_packed"], t["weight_scale"],
                                  t.get("weight_zero_point"), (24, 96), fmt.bits)
        torch.testing.assert_close(ours, q.dequantize(), rtol=0, atol=0)


def test_path_choice_by_m():
    assert [C.choose_path(m) for m in (1, 2, 16, 17, 256, C.DEQUANT_MIN_M)] == \
        ["gemv", "splitk", "splitk", "tile", "tile", "dequant"]
    ms = (1, C.DECODE_MAX_M, C.DECODE_MAX_M + 1, 16, 256, C.DEQUANT_MIN_M - 1, C.DEQUANT_MIN_M)
    assert [C.choose_path(m, decode=True) for m in ms] == \
        ["decode", "decode", "tc", "tc", "tc", "tc", "dequant"]
    assert [C.m_bucket(m) for m in (1, 2, 16, 17, 64, 65, 128, 129, 256, 511)] == \
        ["m1", "m16", "m16", "m64", "m64", "m128", "m128", "m256", "m256", "m256"]


# Decode-kernel configs the autotuner may pick: CUDA-core M=1 (words loaded a tile ahead or not),
# tensor-core tiles, split-K, block_k spanning several groups or part of one.
DECODE_CONFIGS = [C.Config(1, 8, 64), C.Config(1, 16, 256, split_k=3), C.Config(1, 8, 64, 4, 3, 2),
                  C.Config(1, 8, 64, 2, 1), C.Config(1, 4, 128, 1, 1, 2),
                  C.Config(16, 16, 128), C.Config(32, 32, 256, split_k=2)]


DECODE_CASES = [(1, 37, 512, 128, False, 4), (3, 29, 384, 64, True, 4),
                (1, 23, 264, 8, False, 8), (18, 21, 300, None, True, 8),
                (1, 19, 200, 8, False, 4)]   # INT4, K not a multiple of any tile: masked x


def _applies(cfg, case):
    """block_m 1 is the M=1 kernel; a tensor-core tile needs >= 16 words along K."""
    m, bits = case[0], case[5]
    return (m == 1) if cfg.block_m == 1 else cfg.block_k // (32 // bits) >= 16


@pytest.mark.parametrize("cfg,case,x8", [(c, s, x8) for c in DECODE_CONFIGS for s in DECODE_CASES
                                         if _applies(c, s)
                                         for x8 in ([False, True] if c.block_m == 1
                                                    and s[5] == 4 else [False])],
                         ids=lambda v: str(v) if isinstance(v, C.Config) else
                         ("x8" if v else "x-slots") if isinstance(v, bool) else
                         "m{}-n{}-k{}-g{}-{}-int{}".format(*v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_kernel_every_config_shape(cfg, case, x8, dtype, rng, monkeypatch):
    """x8: M = 1 INT4 reads x of a word column in one load (decode._int4_x8_dot, the default)."""
    monkeypatch.setattr(decode, "X8_LOADS", x8)
    m, n, k, group, symmetric, bits = case
    packed, scale, zero = make_int_weight(n, k, group, symmetric, bits, rng, torch.bfloat16)
    bias = torch.randn(n, generator=rng)
    x = torch.randn(m, k, generator=rng).to(dtype)
    y = int_matmul(x, packed, scale, zero, (n, k), bits, bias=bias, path="decode", config=cfg)
    ref = int_matmul_ref(x, packed, scale, zero, (n, k), bits, bias=bias)
    w = int_dequantize_ref(packed, scale, zero, (n, k), bits)
    assert_matmul_close(y, ref, x, w, rng.initial_seed(), bias)



# decode.PAIR_WORDS: words 2p and 2p + 1 of a row read as one int64 (one scale for both); N odd,
# K with a masked tail, group 128 and 32, zero points, split-K, the next tile's words loaded
# ahead, INT8 too (per-channel scales).
PAIR_CASES = [(37, 512, 128, True, 4), (29, 512, 128, False, 4), (23, 992, 32, False, 4),
              (31, 384, 32, True, 4), (19, 264, None, True, 8), (17, 200, 8, False, 8)]
PAIR_CONFIGS = [C.Config(1, 8, 256), C.Config(1, 4, 128, 1, 1, 2), C.Config(1, 8, 256, 2, 2, 3),
                C.Config(1, 8, 64, 4, 3, 2),
                C.Config(1, 4, 4096, 4, 1)]   # one tile longer than every row (masked)


@pytest.mark.parametrize("cfg", PAIR_CONFIGS, ids=str)
@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: "n{}-k{}-g{}-sym{}-int{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_pair_words_match_the_reference(cfg, case, dtype, rng, monkeypatch):
    monkeypatch.setattr(decode, "PAIR_WORDS", True)
    n, k, group, symmetric, bits = case
    packed, scale, zero = make_int_weight(n, k, group, symmetric, bits, rng, torch.bfloat16)
    assert decode.pairs_apply(packed, 32 // bits, group or k, cfg.block_k)   # int32 words
    bias = torch.randn(n, generator=rng)
    x = torch.randn(1, k, generator=rng).to(dtype)
    y = int_matmul(x, packed, scale, zero, (n, k), bits, bias=bias, path="decode", config=cfg)
    ref = int_matmul_ref(x, packed, scale, zero, (n, k), bits, bias=bias)
    w = int_dequantize_ref(packed, scale, zero, (n, k), bits)
    assert_matmul_close(y, ref, x, w, rng.initial_seed(), bias)


@pytest.mark.parametrize("forced", [None, True, False])
@pytest.mark.parametrize("cfg_pair", [True, False])
def test_decode_pair_words_follow_the_config_unless_forced(cfg_pair, forced, rng, monkeypatch):
    """PAIR_WORDS None (the default): the launch config's `pair` (tuned per format and shape)
    decides; True / False override it (bench_kernels "@pair" / "@no-pair")."""
    monkeypatch.setattr(decode, "PAIR_WORDS", forced)
    launched = record_launches(monkeypatch, decode, "_gemv_kernel", "PAIR")
    n, k = 24, 512
    packed, scale, zero = make_int_weight(n, k, 128, False, 4, rng, torch.bfloat16)
    x = torch.randn(1, k, generator=rng)
    cfg = C.Config(1, 8, 256, 2, 1, 1, None, cfg_pair)
    y = int_matmul(x, packed, scale, zero, (n, k), 4, path="decode", config=cfg)
    assert launched == [cfg_pair if forced is None else forced]
    ref = int_matmul_ref(x, packed, scale, zero, (n, k), 4)
    w = int_dequantize_ref(packed, scale, zero, (n, k), 4)
    assert_matmul_close(y, ref, x, w, rng.initial_seed(), None)


# N and K multiples of the blocks: the M=1 kernel (decode._gemv_kernel) reads without bounds
# checks and decodes codes as float mantissas (decode._int_slot_dot): every code slot, zero
# points, groups longer and shorter than a tile, split-K in 2 and 3 slices, with and without
# the words of the next tile loaded ahead.
@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 128), (4, False, 128), (4, False, 32),
                                                  (8, True, None), (8, False, 64)])
@pytest.mark.parametrize("cfg", [C.Config(1, 16, 256, 1), C.Config(1, 32, 256, 1, 2, 2),
                                 C.Config(1, 16, 256, 1, 3, 3), C.Config(1, 8, 512, 2, 1)],
                         ids=str)   # num_stages > 1: the next tile's words loaded ahead
def test_m1_decode_inside_the_matrix(bits, symmetric, group, cfg, rng, dtype=torch.float32):
    n, k = 64, 1024
    packed, scale, zero = make_int_weight(n, k, group, symmetric, bits, rng, torch.bfloat16)
    x = (torch.randn(1, k, generator=rng) * 3).to(dtype)
    y = int_matmul(x, packed, scale, zero, (n, k), bits, path="decode", config=cfg)
    ref = int_matmul_ref(x, packed, scale, zero, (n, k), bits)
    w = int_dequantize_ref(packed, scale, zero, (n, k), bits)
    assert_matmul_close(y, ref, x, w, rng.initial_seed())


def test_m1_decode_inside_the_matrix_bfloat16(rng):
    test_m1_decode_inside_the_matrix(4, False, 128, C.Config(1, 32, 256, 1, 3, 2), rng,
                                     torch.bfloat16)

def test_decode_config_table_lookup(tmp_path, monkeypatch):
    """Exact shape first, then the bucket default, then the family "*"; the env file wins, and
    what it lacks (a bucket, the whole moe table of a file tuned before it existed) comes from
    the shipped default."""

    table = {"decode": {"int4/m1": {"default": C.Config(1, 8, 256).to_dict(),
                                    "64x128": C.Config(1, 4, 128, split_k=2).to_dict()},
                        "*/m1": {"default": C.Config(1, 32, 64).to_dict()},
                        "*/m16": {"default": C.Config(16, 16, 128).to_dict()}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(C.CONFIG_ENV, str(path))
    cpu = torch.device("cpu")
    assert C.decode_config("int4", 1, 64, 128, cpu) == C.Config(1, 4, 128, split_k=2)
    assert C.decode_config("int4-asym", 1, 64, 256, cpu) == C.Config(1, 8, 256)
    assert C.decode_config("nvfp4", 1, 64, 128, cpu) == C.Config(1, 32, 64)
    assert C.decode_config("int8", 9, 64, 128, cpu) == C.Config(16, 16, 128)
    shipped = json.loads((C.CONFIG_DIR / "default.json").read_text())
    assert C.decode_config("int8", 100, 64, 128, cpu) == \
        C.Config(**shipped["decode"]["*/m128"]["default"])
    assert C.kernel_config("moe", "int4", 1, 64, 128, cpu) == \
        C.Config(**shipped["moe"]["*/m1"]["default"])
    with pytest.raises(ValueError, match="no nope config for int4/m1"):
        C.kernel_config("nope", "int4", 1, 64, 128, cpu)
    monkeypatch.delenv(C.CONFIG_ENV)
    default = shipped["decode"]
    for bucket in C.M_BUCKETS:  # the shipped default covers every bucket of every format
        assert f"*/m{bucket}" in default
    tc = json.loads((C.CONFIG_DIR / "default.json").read_text())["tc"]
    for bucket in C.M_BUCKETS:  # and so does the tc table
        assert f"*/m{bucket}" in tc
    assert C.kernel_config("tc", "int4", 100, 64, 128, cpu) == C.Config(**tc["*/m128"]["default"])


@pytest.mark.parametrize("name", sorted(p.name for p in C.CONFIG_DIR.glob("*.json")))
def test_every_shipped_config_file_holds_valid_configs(name, monkeypatch):
    """Each configs/*.json entry of every kernel table is a Config a kernel accepts (block_k a
    power of two, at least 32), and lookups through the file find them: the exact shape where
    tuned, the format's bucket default elsewhere (2:4's table keyed by value kind)."""
    data = json.loads((C.CONFIG_DIR / name).read_text())
    monkeypatch.setenv(C.CONFIG_ENV, str(C.CONFIG_DIR / name))
    cpu = torch.device("cpu")
    for table in C.TABLES:
        for key, entry in data.get(table, {}).items():
            family, bucket = key.split("/m")
            for shape, fields in entry.items():
                cfg = C.Config(**fields)
                assert cfg.block_k >= 32 and cfg.block_k & (cfg.block_k - 1) == 0, (key, cfg)
                assert cfg.block_m >= 1 and cfg.block_n >= 1 and cfg.split_k >= 1, (key, cfg)
                if family != "*" and shape != "default":
                    n, k = map(int, shape.split("x"))
                    assert C.kernel_config(table, family, int(bucket), n, k, cpu) == cfg
    assert C.kernel_config("sparse24", "16bit", 1, 96, 96, cpu) == C.Config(
        **(data.get("sparse24", {}).get("16bit/m1") or json.loads(
            (C.CONFIG_DIR / "default.json").read_text())["sparse24"]["*/m1"])["default"])


def test_a_config_table_moves_the_path_limits(tmp_path, monkeypatch):
    """configs/<gpu>.json may name where the decode kernel stops, where dequantize + matmul
    starts (the tc kernel in between), and where 2:4 starts dequantizing (the H200's does);
    without a device or a "paths" entry the built-in limits hold."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"decode": {}, "paths": {"decode_max_m": 8, "dequant_min_m": 300,
                                                        "sparse24_dequant_min_m": 17}}))
    monkeypatch.setenv(C.CONFIG_ENV, str(path))
    cpu = torch.device("cpu")
    assert [C.choose_path(m, True, cpu) for m in (1, 8, 9, 299, 300)] == \
        ["decode", "decode", "tc", "tc", "dequant"]
    assert [C.choose_path(m, False, cpu) for m in (1, 16, 17)] == ["gemv", "splitk", "dequant"]
    assert C.choose_path(64, True) == "tc" and C.choose_path(300, False) == "tile"
    other = tmp_path / "u.json"
    other.write_text(json.dumps({"decode": {}, "paths": {"dequant_min_m": 17}}))
    monkeypatch.setenv(C.CONFIG_ENV, str(other))
    assert C.choose_path(C.DECODE_MAX_M, True, cpu) == "decode"     # the built-in decode limit
    assert C.choose_path(16, True, cpu) == "tc" and C.choose_path(17, True, cpu) == "dequant"
    assert C.choose_path(17, False, cpu) == "dequant"   # 2:4 follows dequant_min_m by default


def test_bad_shapes_raise_one_clear_error(rng):
    packed, scale, zero = make_int_weight(16, 64, 32, True, 4, rng)
    with pytest.raises(ValueError, match="activations have 63 features"):
        int_matmul(torch.randn(1, 63), packed, scale, zero, (16, 64))
    with pytest.raises(ValueError, match="weight_packed must be int32"):
        int_matmul(torch.randn(1, 64), packed.float(), scale, zero, (16, 64))
    with pytest.raises(ValueError, match="activations must be"):
        int_matmul(torch.randn(1, 64).double(), packed, scale, zero, (16, 64))


# The M = 1 kernel's SiLU-gated epilogue (decode._gemv_kernel GATED): W stacks gate and up;
# configs with and without the next tile loaded ahead, split-K (the last K-slice runs the
# epilogue), 2 rows a program (one output); odd and even halves, zero points.
GATED_CONFIGS = [C.Config(1, 8, 64), C.Config(1, 16, 256, split_k=3), C.Config(1, 8, 64, 4, 3, 2),
                 C.Config(1, 4, 128, 1, 1, 2), C.Config(1, 2, 64, 1)]


@pytest.mark.parametrize("cfg", GATED_CONFIGS, ids=str)
@pytest.mark.parametrize("half, k, group, symmetric, bits",
                         [(37, 512, 128, False, 4), (16, 256, 32, True, 4), (21, 264, 8, False, 8)],
                         ids=["f37-asym-int4", "f16-sym-int4", "f21-asym-int8-k264"])
@pytest.mark.parametrize("pair", [False, True], ids=["int32-words", "int64-pairs"])
def test_gated_decode_is_silu_of_gate_times_up(cfg, half, k, group, symmetric, bits, pair, rng,
                                               monkeypatch):
    monkeypatch.setattr(decode, "PAIR_WORDS", pair)   # words read one or two at a time
    packed, scale, zero = make_int_weight(2 * half, k, group, symmetric, bits, rng,
                                          torch.bfloat16)
    bias = torch.randn(2 * half, generator=rng)
    x = torch.randn(1, k, generator=rng)
    args = (packed, scale, zero, (2 * half, k), bits)
    y = int_matmul(x, *args, bias=bias, path="decode", config=cfg, gated=True)
    assert y.shape == (1, half)
    assert_gated_close(y, x, int_dequantize_ref(*args), bias, rng.initial_seed())


# Split-K in one launch (_common.split_total): the M = 1 kernel plain and gated (its epilogue
# runs in the last K-slice), and the few-row tensor-core kernel; 2, 3 and 5 slices in a row.
@pytest.mark.parametrize("cfg,gated", [(C.Config(1, 8, 64, 2, 1, 1), False),
                                       (C.Config(1, 8, 64, 2, 1, 1), True),
                                       (C.Config(16, 16, 128, 4, 2, 1), False)],
                         ids=["m1", "m1-gated", "tensor-core-tiles"])
def test_decode_split_k_sums_in_the_last_slice_and_leaves_counters_zero(cfg, gated, rng):
    """Each launch's last K-slice of a tile sums the partials, runs the epilogue (bias, the gated
    product) and resets the tile's counter: the next launch, with another split, starts from
    zero counters (the host never clears them) and the output is fully written (poisoned)."""
    n, k, m = 42, 640, 1 if cfg.block_m == 1 else 18
    packed, scale, zero = make_int_weight(n, k, 64, False, 4, rng, torch.bfloat16)
    bias = torch.randn(n, generator=rng)
    x = torch.randn(m, k, generator=rng)
    args = (packed, scale, zero, (n, k), 4)
    w = int_dequantize_ref(*args)
    for split in (2, 3, 5):
        y = int_matmul(x, *args, bias=bias, path="decode", config=cfg, split_k=split,
                       gated=gated)
        if gated:
            assert_gated_close(y, x, w, bias, (rng.initial_seed(), split))
        else:
            assert_matmul_close(y, int_matmul_ref(x, *args, bias=bias), x, w,
                                (rng.initial_seed(), split), bias)
        assert not C.tile_counters(1, x.device).any()


def test_pdl_stays_off_where_no_ptx_runs(rng, monkeypatch):
    """Programmatic dependent launch (_common.PDL, COMPRESS_PDL=1) needs Hopper and PTX: on the
    CPU and under the interpreter the kernels launch without it, and still compute the same."""
    monkeypatch.setattr(C, "PDL", True)
    assert not C.pdl_on("cpu")
    launched = record_launches(monkeypatch, decode, "_gemv_kernel", "PDL")
    args = make_int_weight(24, 256, 128, True, 4, rng, torch.bfloat16) + ((24, 256), 4)
    x = torch.randn(1, 256, generator=rng)
    y = int_matmul(x, *args, path="decode", config=C.Config(1, 8, 128, 2, 2))
    assert launched == [None]   # the PDL constexpr not passed: its default, off
    assert_matmul_close(y, int_matmul_ref(x, *args), x, int_dequantize_ref(*args),
                        rng.initial_seed())


def assert_gated_close(y, x, w, bias, seed):
    """y [M, F] against silu(g) * u of the float32 matmul: the errors of g and u (bounded as
    in assert_matmul_close, for x's dtype) through silu (slope at most 1.1) and the product,
    and y's own rounding; and not the product of the halves swapped (gate and up really taken
    apart)."""
    tol = TOLERANCE[x.dtype]
    lin = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    bound = x.float().abs() @ w.abs().T + (bias.float().abs() if bias is not None else 0)
    (g, u), (bg, bu) = lin.chunk(2, -1), (tol * bound).chunk(2, -1)
    want = C.silu_mul(lin)
    limit = (1.1 * u.abs() * bg + torch.nn.functional.silu(g).abs() * bu + 1.1 * bg * bu
             + tol * want.abs() + 1e-6)
    assert ((y.float() - want).abs() - limit).max() <= 0, f"gated product off (seed={seed})"
    swapped = C.silu_mul(torch.cat([u, g], -1))
    assert (y.float() - swapped).abs().max() > 0.05 * want.abs().max()


@pytest.mark.parametrize("path", ["decode", "tc", "dequant"])
def test_gated_on_every_path_and_in_16_bits(path, rng):
    """bfloat16 activations (the epilogue rounds once, the reference in float32); M = 3 runs
    the tc kernel or dequantize + matmul, then silu(gate) * up after the matmul."""
    packed, scale, zero = make_int_weight(2 * 40, 256, 128, False, 4, rng, torch.bfloat16)
    x = torch.randn(1 if path == "decode" else 3, 256, generator=rng).to(torch.bfloat16)
    args = (packed, scale, zero, (80, 256), 4)
    y = int_matmul(x, *args, path=path, gated=True)
    want = C.silu_mul(int_matmul_ref(x.float(), *args))
    assert y.shape == (x.shape[0], 40) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
