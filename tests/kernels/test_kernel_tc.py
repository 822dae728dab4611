"""The tc kernel (compress/kernels/tc.py, M = 17 .. 511) against the format references: INT4
sym/asym, INT8, NVFP4, MXFP4; odd M, N and K, bias, float32/bfloat16/float16, split-K, one scale
per tile and per word, inside the matrix (no bounds masks) and at its edges; outputs poisoned."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_checks import assert_matmul_close, record_launches
from test_kernel_fp4 import make_fp4_weight
from test_kernel_w4a16 import make_int_weight

from compress.kernels import _common as C
from compress.kernels.decode import FMT_INT, FMT_MXFP4, FMT_NVFP4
from compress.kernels.fp4 import FORMATS, _words, fp4_dequantize_ref, fp4_matmul, fp4_matmul_ref
from compress.kernels.tc import words_dequantize_ref
from compress.kernels.w4a16 import int_dequantize_ref, int_matmul, int_matmul_ref

# block_k 32: one scale per tile for groups >= 32 and per channel; 64/128: one per word for
# groups < block_k; split_k 2-3 adds K-slices with atomics (K-slices past K read nothing).
CONFIGS = [C.Config(16, 16, 32), C.Config(32, 32, 64, split_k=2),
           C.Config(16, 64, 128, 4, 3, split_k=3)]
# (M, N, K, group, symmetric, bits): N not a multiple of any block, K not one of block_k;
# INT8 per channel with K % 4 != 0 (a partial last word); group 96: not a power of two, one
# scale per tile for block_k 32 (found by a division), per word for 64 and 128 (neither
# divides the other)
INT_CASES = [(2, 37, 224, 32, True, 4), (17, 29, 160, 32, False, 4), (33, 21, 198, None, True, 8),
             (65, 19, 96, 16, False, 8), (18, 27, 288, 96, False, 4)]
FP4_CASES = [(2, 37, 96), (33, 29, 224), (65, 19, 160)]
DTYPES = [torch.float32, torch.bfloat16]


def _int_id(c):
    return "m{}-n{}-k{}-g{}-{}-int{}".format(c[0], c[1], c[2], c[3], "sym" if c[4] else "asym",
                                           c[5])


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("case", INT_CASES, ids=_int_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tc_int_matches_reference(cfg, case, dtype, rng):
    m, n, k, group, symmetric, bits = case
    packed, scale, zero = make_int_weight(n, k, group, symmetric, bits, rng, torch.bfloat16)
    bias = torch.randn(n, generator=rng)
    x = torch.randn(m, k, generator=rng).to(dtype)
    y = int_matmul(x, packed, scale, zero, (n, k), bits, bias=bias, path="tc", config=cfg)
    ref = int_matmul_ref(x, packed, scale, zero, (n, k), bits, bias=bias)
    w = int_dequantize_ref(packed, scale, zero, (n, k), bits)
    assert_matmul_close(y, ref, x, w, (cfg, rng.initial_seed()), bias)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("case", FP4_CASES, ids=lambda c: "m{}-n{}-k{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tc_fp4_matches_reference(fmt, cfg, case, dtype, rng):
    m, n, k = case
    _, packed, scale, gs = make_fp4_weight(fmt, n, k, rng)
    bias = torch.randn(n, generator=rng).to(dtype)
    x = torch.randn(m, k, generator=rng).to(dtype)
    y = fp4_matmul(x, fmt, packed, scale, gs, (n, k), bias=bias, path="tc", config=cfg)
    ref = fp4_matmul_ref(x, fmt, packed, scale, gs, (n, k), bias=bias)
    w = fp4_dequantize_ref(fmt, packed, scale, gs, (n, k))
    assert_matmul_close(y, ref, x, w, (cfg, rng.initial_seed()), bias)


@pytest.mark.parametrize("swap", [False, True], ids=["x@wT", "w@xT"])
@pytest.mark.parametrize("family", ["int4", "int4-asym", "int8", "nvfp4", "mxfp4"])
def test_tc_inside_the_matrix_float16_and_batch_dims(family, swap, rng):
    """N and K multiples of the blocks and split (loads without bounds masks), float16
    activations (the interpreter runs their dot in float16, and float16 FP4 decodes exactly)
    with leading batch dims, the shipped default config of the M=64 bucket in both
    orientations of the dot."""
    n, k, dtype = 64, 256, torch.float16
    x = torch.randn(3, 11, k, generator=rng).to(dtype)      # M = 33 rows
    cfg = dataclasses.replace(C.kernel_config("tc", family, 33, n, k, torch.device("cpu")),
                              swap=swap)
    if family.startswith("int"):
        bits = 8 if family == "int8" else 4
        packed, scale, zero = make_int_weight(n, k, 128, family != "int4-asym", bits, rng)
        y = int_matmul(x, packed, scale, zero, (n, k), bits, path="tc", config=cfg)
        ref = int_matmul_ref(x, packed, scale, zero, (n, k), bits)
        w = int_dequantize_ref(packed, scale, zero, (n, k), bits)
    else:
        _, packed, scale, gs = make_fp4_weight(family, n, k, rng)
        y = fp4_matmul(x, family, packed, scale, gs, (n, k), path="tc", config=cfg)
        ref = fp4_matmul_ref(x, family, packed, scale, gs, (n, k))
        w = fp4_dequantize_ref(family, packed, scale, gs, (n, k))
    assert y.shape == (3, 11, n)
    assert_matmul_close(y.reshape(-1, n), ref.reshape(-1, n), x.reshape(-1, k), w,
                        rng.initial_seed())


def test_tc_rejects_configs_it_cannot_run(rng):
    packed, scale, zero = make_int_weight(16, 64, 32, True, 4, rng)
    with pytest.raises(ValueError, match="the tc path needs"):
        int_matmul(torch.randn(20, 64), packed, scale, zero, (16, 64), path="tc",
                   config=C.Config(16, 16, 16))
    with pytest.raises(ValueError, match="no 'tile' path for INT weights"):
        int_matmul(torch.randn(20, 64), packed, scale, zero, (16, 64), path="tile")


def test_word_view_reference_equals_the_format_references(rng):
    """What the kernel reads (int32 words) decodes to the stored formats' own references."""
    for group, symmetric, bits in ((32, False, 4), (None, True, 8)):
        packed, scale, zero = make_int_weight(24, 96, group, symmetric, bits, rng)
        ours = words_dequantize_ref(FMT_INT, packed, scale, zero, None, 24, 96, bits,
                                    96 // scale.shape[1])
        torch.testing.assert_close(ours, int_dequantize_ref(packed, scale, zero, (24, 96), bits),
                                   rtol=0, atol=0)
    for fmt, code in (("nvfp4", FMT_NVFP4), ("mxfp4", FMT_MXFP4)):
        _, packed, scale, gs = make_fp4_weight(fmt, 24, 96, rng)
        ours = words_dequantize_ref(code, _words(packed), scale.view(torch.uint8), None, gs, 24,
                                    96, 4, FORMATS[fmt])
        torch.testing.assert_close(ours, fp4_dequantize_ref(fmt, packed, scale, gs, (24, 96)),
                                   rtol=0, atol=0)


def test_split_k_leaves_its_tile_counters_zero(rng):
    """The last K-slice of each tile sums the partials and resets the tile's counter, so the
    next launch starts from zero (tile_counters are never cleared by the host)."""
    packed, scale, zero = make_int_weight(40, 256, 32, False, 4, rng, torch.bfloat16)
    x = torch.randn(20, 256, generator=rng)
    for split in (2, 3, 2):
        y = int_matmul(x, packed, scale, zero, (40, 256), 4, path="tc",
                       config=C.Config(16, 16, 32, split_k=split))
        assert_matmul_close(y, int_matmul_ref(x, packed, scale, zero, (40, 256), 4), x,
                            int_dequantize_ref(packed, scale, zero, (40, 256), 4), split)
        assert not C.tile_counters(6, x.device)[:6].any()


def test_tile_counters_grow_without_freeing_what_a_graph_may_hold():
    """A launch needing more tile counters gets a larger zeroed buffer; the outgrown one stays
    allocated (a CUDA graph captured with it replays at its address) and zero."""
    small = C.tile_counters(8, "cpu")
    address = small.data_ptr()
    del small
    large = C.tile_counters(C.tile_counters(8, "cpu").numel() + 1, "cpu")
    assert large.numel() > 8 and not large.any()
    held = C._COUNTERS[torch.device("cpu")]
    assert any(t.data_ptr() == address for t in held[:-1])
    assert not any(t.any() for t in held)
    assert C.tile_counters(8, "cpu") is large   # the largest serves every later launch


def _run_ptx(asm: str, regs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Emulates the packed INT4 decodes' PTX (shr, prmt, lop3 0xEA, sub/mul .rn on 16-bit
    pairs) on int64 tensors holding 32-bit registers, one element per lane. The interpreter
    cannot run inline PTX, so this is how the CPU checks what the selectors and magic numbers
    put where; tests/gpu runs the real instructions."""
    def halves(r):   # a register's two 16-bit halves as float32 (low half first)
        pair = torch.stack([r & 0xFFFF, r >> 16], -1).to(torch.int16)
        return pair.view(dtype).float()

    def pack(f):     # float32 [.., 2] -> one register, each half rounded once to dtype
        bits = f.to(dtype).view(torch.int16).long() & 0xFFFF
        return bits[..., 0] | (bits[..., 1] << 16)

    def val(tok):
        return regs[tok] if tok in regs else torch.tensor(int(tok, 0))   # or an immediate

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32":   # a register's 16-bit halves {lo, hi}: split or joined
            if args.startswith("{"):   # mov.b32 {lo, hi}, r
                pair, r = args[1:].split("}")
                lo, hi = [t.strip() for t in pair.split(",")]
                r = val(r.strip(" ,"))
                regs[lo], regs[hi] = r & 0xFFFF, (r >> 16) & 0xFFFF
            else:                      # mov.b32 r, {lo, hi}
                dst, pair = [t.strip() for t in args.split(",", 1)]
                lo, hi = [val(t.strip()) for t in pair.strip(" {}").split(",")]
                regs[dst] = (lo & 0xFFFF) | ((hi & 0xFFFF) << 16)
            continue
        dst, *src = [a.strip() for a in args.split(",")]
        a = [val(t) for t in src]
        if op == "shr.b32":
            out = a[0] >> a[1]
        elif op == "prmt.b32":   # bytes of {b, a}, selector nibble i picks output byte i
            both = a[0] | (a[1] << 32)
            sel = int(src[2], 16)
            out = sum(((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i)
                      for i in range(4))
        elif op == "lop3.b32":
            assert src[3] == "0xEA", line   # (a & b) | c
            out = (a[0] & a[1]) | a[2]
        elif op.startswith(("sub.rn.", "mul.rn.")):
            x, y = halves(a[0]), halves(a[1])
            out = pack(x - y if op.startswith("sub") else x * y)
        else:
            raise AssertionError(f"no emulation of {op}")
        regs[dst] = out & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k_order", [False, True], ids=["even-odd", "k-order"])
def test_packed_int4_ptx_puts_each_code_where_the_dot_reads_it(k_order, dtype, rng):
    """tc's inline-PTX INT4 decodes on 4 packed bytes (8 codes, pack=4): even/odd gives the
    low nibbles (inputs 0, 2, 4, 6) then the high ones; K order gives codes 0..7 as
    _int4_packed_k_order joins them. Each weight is (code - 8 - zero) * scale rounded once to
    dtype, as the reference."""
    from compress.kernels import tc

    lanes = 4096
    b = torch.randint(0, 256, (lanes, 4), generator=rng)
    zero = torch.randint(0, 16, (lanes, 1), generator=rng).float()
    scale = (torch.rand(lanes, 1, generator=rng) * 0.1 + 1e-3).to(dtype).float()
    magic, text = (136.0, "bf16") if dtype == torch.bfloat16 else (1032.0, "f16")
    asm = (tc._INT4_K_ORDER_ASM if k_order else tc._INT4_PACKED_ASM).format(
        magic="0x43004300" if dtype == torch.bfloat16 else "0x64006400", t=text)

    def reg(f):   # the same value in both halves (a per-row scale or offset)
        bits = f.to(dtype).view(torch.int16).long()[:, 0] & 0xFFFF
        return bits | (bits << 16)

    regs = {"$4": b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24),
            "$5": reg(scale), "$6": reg(scale), "$7": reg(magic + zero),
            "$8": reg(magic + zero)}
    regs = _run_ptx(asm, regs, dtype)
    out = torch.stack([torch.stack([regs[f"${i}"] & 0xFFFF, regs[f"${i}"] >> 16], -1)
                       for i in range(4)], 1).reshape(lanes, 8).to(torch.int16).view(dtype)
    low, high = b & 0xF, b >> 4
    codes = (torch.stack([low, high], -1).reshape(lanes, 8) if k_order
             else torch.cat([low, high], 1))
    want = ((codes - 8 - zero) * scale).to(dtype)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_planes_ptx_gives_code_j_of_each_word_to_plane_j(dtype, rng):
    """tc's one-word INT4 decode for _int4_planes_dot (Config.planes, pack=1): output j is code j
    (bits 4j..4j+3) of the word, (code - 8 - zero) * scale rounded once to dtype."""
    from compress.kernels import tc

    lanes = 4096
    codes = torch.randint(0, 16, (lanes, 8), generator=rng)
    zero = torch.randint(0, 16, (lanes, 1), generator=rng).float()
    scale = (torch.rand(lanes, 1, generator=rng) * 0.1 + 1e-3).to(dtype).float()
    magic, text = (136.0, "bf16") if dtype == torch.bfloat16 else (1032.0, "f16")
    asm = tc._INT4_PLANES_ASM.format(magic="0x43004300" if dtype == torch.bfloat16
                                     else "0x64006400", t=text)

    def half(f):   # a 16-bit register
        return f.to(dtype).view(torch.int16).long()[:, 0] & 0xFFFF

    word = sum(codes[:, j] << (4 * j) for j in range(8))
    regs = _run_ptx(asm, {"$8": word, "$9": half(scale), "$10": half(magic + zero)}, dtype)
    out = torch.stack([regs[f"${j}"] for j in range(8)], 1).to(torch.int16).view(dtype)
    want = ((codes - 8 - zero) * scale).to(dtype)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("forced", [None, True, False])
@pytest.mark.parametrize("in_config", [True, False])
@pytest.mark.parametrize("field,switch,constexpr", [("k_order", "FORCE_K_ORDER", "K_ORDER"),
                                                    ("planes", "FORCE_PLANES", "PLANES")])
def test_tc_decode_choice_follows_the_config_unless_forced(field, switch, constexpr, in_config,
                                                           forced, rng, monkeypatch):
    """tc.FORCE_K_ORDER / tc.FORCE_PLANES None (the default): the launch config's `k_order` /
    `planes` (tuned per format and shape) decides; True / False override it (bench_kernels
    "@k-order" / "@no-k-order", "@planes" / "@no-planes"). The interpreter runs the plain decode
    whatever they say (no inline PTX), so the product is checked too."""
    from compress.kernels import tc

    monkeypatch.setattr(tc, switch, forced)
    launched = record_launches(monkeypatch, tc, "_tc_matmul_kernel", constexpr)
    n, k = 24, 256
    packed, scale, zero = make_int_weight(n, k, 128, True, 4, rng, torch.bfloat16)
    x = torch.randn(20, k, generator=rng).to(torch.bfloat16)
    cfg = C.Config(16, 16, 128, **{field: in_config})
    y = int_matmul(x, packed, scale, zero, (n, k), 4, path="tc", config=cfg)
    assert launched == [in_config if forced is None else forced]
    assert_matmul_close(y, int_matmul_ref(x, packed, scale, zero, (n, k), 4), x,
                        int_dequantize_ref(packed, scale, zero, (n, k), 4), rng.initial_seed())
