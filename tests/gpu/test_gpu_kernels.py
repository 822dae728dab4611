"""The Triton kernels on the GPU against their PyTorch references (on the GPU too), on the odd
shapes of tests/kernels and on Llama-3-8B shapes, every path and dtype. Inputs are built by the
CPU kernel tests' own builders, then moved to CUDA."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES, assert_matmul_close
from test_kernel_fp4 import CASES as FP4_CASES
from test_kernel_fp4 import make_fp4_weight
from test_kernel_sparse24 import CASES as SPARSE_CASES
from test_kernel_sparse24 import KINDS, make_sparse
from test_kernel_sparse24 import PATHS as SPARSE_PATHS
from test_kernel_tc import FP4_CASES as TC_FP4_CASES
from test_kernel_tc import INT_CASES as TC_INT_CASES
from test_kernel_w4a16 import CASES as INT_CASES
from test_kernel_w4a16 import PATHS, assert_gated_close, make_int_weight

from compress.kernels import _common as C
from compress.kernels import decode
from compress.kernels.fp4 import fp4_dequantize_ref, fp4_matmul, fp4_matmul_ref
from compress.kernels.sparse24 import sparse24_matmul, sparse24_matmul_ref
from compress.kernels.w4a16 import int_dequantize_ref, int_matmul, int_matmul_ref

LLAMA_SHAPES = [(1, 4096, 4096), (16, 14336, 4096), (128, 4096, 14336)]   # (M, N, K)


def cuda(x):
    if isinstance(x, dict):
        return {k: cuda(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(cuda(v) for v in x)
    return None if x is None else x.cuda()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("case", INT_CASES + [(m, n, k, 128, False, 4) for m, n, k in LLAMA_SHAPES],
                         ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int_kernel_on_gpu(case, dtype, rng):
    m, n, k, group, symmetric, bits = case
    packed, scale, zero = cuda(make_int_weight(n, k, group, symmetric, bits, rng))
    x = torch.randn(m, k, generator=rng).to(dtype).cuda()
    ref = int_matmul_ref(x, packed, scale, zero, (n, k), bits)
    w = int_dequantize_ref(packed, scale, zero, (n, k), bits)
    for path in PATHS + [None]:                  # None: the path chosen by the tuned plan
        y = int_matmul(x, packed, scale, zero, (n, k), bits, **({"path": path} if path else {}))
        assert_matmul_close(y, ref, x, w, (path, case))


@pytest.mark.parametrize("fmt", ["int4", "int4-asym", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
                         ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pair_words_on_gpu(fmt, n, k, dtype, rng, monkeypatch):
    """decode.PAIR_WORDS (words 2p and 2p + 1 read as one int64, one scale load a pair) on the
    Llama shapes with their shipped M = 1 configs, against the reference."""
    monkeypatch.setattr(decode, "PAIR_WORDS", True)
    x = torch.randn(1, k, generator=rng).to(dtype).cuda()
    if fmt.startswith("int4"):
        packed, scale, zero = cuda(make_int_weight(n, k, 128, fmt == "int4", 4, rng))
        y = int_matmul(x, packed, scale, zero, (n, k), 4, path="decode")
        ref = int_matmul_ref(x, packed, scale, zero, (n, k), 4)
        w = int_dequantize_ref(packed, scale, zero, (n, k), 4)
    else:
        _, packed, scale, gs = cuda(make_fp4_weight(fmt, n, k, rng))
        y = fp4_matmul(x, fmt, packed, scale, gs, (n, k), path="decode")
        ref = fp4_matmul_ref(x, fmt, packed, scale, gs, (n, k))
        w = fp4_dequantize_ref(fmt, packed, scale, gs, (n, k))
    assert_matmul_close(y, ref, x, w, (fmt, n, k))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("case", FP4_CASES + LLAMA_SHAPES[:2], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x8", [False, True], ids=["x-slots", "x8"])
def test_fp4_kernel_on_gpu(fmt, case, dtype, x8, rng, monkeypatch):
    """Every path; x8: the M = 1 kernel reads x of a word column in one load
    (decode.X8_LOADS_FP4)."""
    monkeypatch.setattr(decode, "X8_LOADS_FP4", x8)
    m, n, k = case
    _, packed, scale, gs = make_fp4_weight(fmt, n, k, rng)
    packed, scale, gs = cuda(packed), cuda(scale), cuda(gs)
    x = torch.randn(m, k, generator=rng).to(dtype).cuda()
    ref = fp4_matmul_ref(x, fmt, packed, scale, gs, (n, k))
    w = fp4_dequantize_ref(fmt, packed, scale, gs, (n, k))
    for path in PATHS:
        y = fp4_matmul(x, fmt, packed, scale, gs, (n, k), path=path)
        assert_matmul_close(y, ref, x, w, (fmt, path, case))


# The tc kernel's compiled orientations (the interpreter runs bfloat16 through float32, which
# always swaps): W x^T on wgmma (16 rows), x W^T on mma.sync (16 rows) and on wgmma (64, 128
# rows), W x^T on 64 rows; split-K; scales per tile, per group, per word; packed INT4 in K order
# (Config.k_order: asynchronous wgmmas on W x^T tiles of 16 and 128 rows).
TC_CONFIGS = [C.Config(16, 64, 128, 4, 4, 4), C.Config(16, 64, 64, 4, 3, 1, swap=False),
              C.Config(64, 64, 64, 4, 3, 2), C.Config(128, 128, 64, 8, 3, 1),
              C.Config(64, 64, 128, 4, 3, 1, swap=True),
              C.Config(16, 64, 128, 4, 4, 1, k_order=True),
              C.Config(128, 64, 64, 4, 3, 2, swap=True, k_order=True)]


@pytest.mark.parametrize("cfg", TC_CONFIGS, ids=str)
@pytest.mark.parametrize("case", TC_INT_CASES + TC_FP4_CASES +
                         [(m, n, k, 128, False, 4) for m, n, k in LLAMA_SHAPES[1:]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tc_kernel_on_gpu(cfg, case, dtype, rng):
    for fmt in (["int"] if len(case) == 6 else ["nvfp4", "mxfp4"]):
        if fmt == "int":
            m, n, k, group, symmetric, bits = case
            # scales in the activations' 16-bit dtype: INT4 takes the packed decode
            # (tc.packed_int4), bfloat16 and float16 each; float32 activations the plain one
            sdt = torch.float16 if dtype == torch.float16 else torch.bfloat16
            packed, scale, zero = cuda(make_int_weight(n, k, group, symmetric, bits, rng, sdt))
            args = (packed, scale, zero, (n, k), bits)
            x = torch.randn(m, k, generator=rng).to(dtype).cuda()
            y = int_matmul(x, *args, path="tc", config=cfg)
            ref, w = int_matmul_ref(x, *args), int_dequantize_ref(*args)
        else:
            m, n, k = case
            _, packed, scale, gs = cuda(make_fp4_weight(fmt, n, k, rng))
            x = torch.randn(m, k, generator=rng).to(dtype).cuda()
            y = fp4_matmul(x, fmt, packed, scale, gs, (n, k), path="tc", config=cfg)
            ref = fp4_matmul_ref(x, fmt, packed, scale, gs, (n, k))
            w = fp4_dequantize_ref(fmt, packed, scale, gs, (n, k))
        assert_matmul_close(y, ref, x, w, (fmt, cfg, case))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", SPARSE_CASES + LLAMA_SHAPES[:2], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse24_kernel_on_gpu(kind, case, dtype, rng):
    m, n, k = case
    t, dense = make_sparse(kind, n, k, rng)
    t, dense = cuda(t), dense.cuda()
    x = torch.randn(m, k, generator=rng).to(dtype).cuda()
    ref = sparse24_matmul_ref(x, kind, t, (n, k))
    for path in SPARSE_PATHS:
        y = sparse24_matmul(x, kind, t, (n, k), path=path)
        assert_matmul_close(y, ref, x, dense, (kind, path, case))


@pytest.mark.parametrize("fmt", ["int4", "int4-asym", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("half", [1001, 14336])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x8", [False, True], ids=["x-slots", "x8"])
@pytest.mark.parametrize("pair", [False, True], ids=["int32-words", "int64-pairs"])
def test_gated_decode_on_gpu(fmt, half, dtype, x8, pair, rng, monkeypatch):
    """The M = 1 kernel's SiLU-gated epilogue (gate and up stacked, Llama's 14336 and an odd
    half) with the shipped config of the shape; x read by slot or in one load a word column
    (decode.X8_LOADS, X8_LOADS_FP4); words one at a time or two as one int64 (PAIR_WORDS)."""
    monkeypatch.setattr(decode, "X8_LOADS" if fmt.startswith("int4") else "X8_LOADS_FP4", x8)
    monkeypatch.setattr(decode, "PAIR_WORDS", pair)
    k = 4096
    x = torch.randn(1, k, generator=rng).to(dtype).cuda()
    if fmt.startswith("int4"):
        packed, scale, zero = cuda(make_int_weight(2 * half, k, 128, fmt == "int4", 4, rng,
                                                   torch.bfloat16))
        args = (packed, scale, zero, (2 * half, k), 4)
        y, w = int_matmul(x, *args, gated=True), int_dequantize_ref(*args)
    else:   # MXFP4's random scales reach 2^7: gate and up then reach ~500 for x / 64, and their
        # product (~8e4) overflows float16 in 1-4 of 14336 outputs (the reference's too); x / 256
        # keeps it below ~6e3
        x = x / 256 if fmt == "mxfp4" else x
        _, packed, scale, gs = cuda(make_fp4_weight(fmt, 2 * half, k, rng))
        args = (fmt, packed, scale, gs, (2 * half, k))
        y, w = fp4_matmul(x, *args, gated=True), fp4_dequantize_ref(*args)
    assert y.shape == (1, half)
    assert_gated_close(y, x, w, None, (fmt, half))


@pytest.mark.parametrize("kind", ["16bit", "int"])
@pytest.mark.parametrize("case", SPARSE_CASES + LLAMA_SHAPES[:2], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse24_transposed_m1_kernel_on_gpu(kind, case, dtype, rng):
    """The transposed M = 1 kernel (sparse24._sparse24_gemv_kernel): the byte-permute pick of
    16-bit activations runs as PTX only here."""
    m, n, k = case
    t, dense = make_sparse(kind, n, k, rng)
    t, dense = cuda(t), dense.cuda()
    x = torch.randn(m, k, generator=rng).to(dtype).cuda()
    y = sparse24_matmul(x, kind, t, (n, k), path="gemv")
    assert_matmul_close(y, sparse24_matmul_ref(x, kind, t, (n, k)), x, dense, (kind, case))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["llama", "weightless", "crmsnorm"])
@pytest.mark.parametrize("width", [96, 4096])
def test_norm_kernel_on_gpu(dtype, kind, width, rng):
    """The fused norm compiled for the GPU: Llama's RMSNorm after a residual add, and the
    rmsnorm pass's weightless RMSNorm and CRMSNorm (rows of dim - 1), against the reference."""
    from compress.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref

    d = width - 1 if kind == "crmsnorm" else width
    x = cuda((torch.randn(5, d, generator=rng) + 0.3).to(dtype))
    res = cuda(torch.randn(5, d, generator=rng).to(dtype))
    weight = cuda(torch.rand(d, generator=rng).to(dtype) + 0.5) if kind == "llama" else None
    crms_dim = width if kind == "crmsnorm" else None
    y, h = add_rmsnorm(x, res, weight, 1e-5, crms_dim)
    y_ref, h_ref = add_rmsnorm_ref(x, res, weight, 1e-5, crms_dim)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 256], ids=["channel", "g256"])
def test_packed_int4_decode_is_the_reference_rounding(dtype, symmetric, group, rng):
    """The packed INT4 decode (inline PTX, tc._int4_packed) makes every weight bit for bit the
    reference's float32 (code - 8 - zero) * scale rounded once to the 16-bit dtype: the
    dequantize kernel takes it whenever a tile lies in one group (per channel, g256)."""
    from compress.kernels.tc import FMT_INT, packed_int4, tc_dequantize, words_dequantize_ref

    n, k = 192, 1024
    packed, scale, zero = cuda(make_int_weight(n, k, group, symmetric, 4, rng, dtype))
    assert packed_int4(FMT_INT, 4, dtype, scale.dtype, 0)
    got = tc_dequantize(FMT_INT, packed, scale, zero, None, n, k, 4, group or k, dtype)
    want = words_dequantize_ref(FMT_INT, packed, scale, zero, None, n, k, 4, group or k)
    assert torch.equal(got, want.to(dtype)), (got.float() - want).abs().max()


@pytest.mark.parametrize("cfg", [C.Config(64, 64, 64, 4, 3, 1), C.Config(128, 128, 64, 8, 3, 1),
                                 C.Config(64, 128, 64, 8, 2, 2), C.Config(16, 64, 128, 4, 3, 4),
                                 C.Config(16, 64, 128, 4, 4, 4, k_order=True),
                                 C.Config(64, 64, 64, 4, 3, 1, k_order=True),
                                 C.Config(64, 64, 128, 4, 3, 2, swap=True, k_order=True),
                                 C.Config(128, 64, 64, 4, 3, 1, swap=True, k_order=True),
                                 C.Config(16, 64, 128, 4, 4, 4, planes=True),
                                 C.Config(16, 64, 256, 4, 3, 1, planes=True),
                                 C.Config(128, 64, 128, 4, 3, 2, swap=True, planes=True)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric,group", [(True, 128), (False, 128), (False, 0)])
def test_tc_packed_decode_in_the_matmul_is_the_reference_rounding(cfg, dtype, symmetric, group,
                                                                  rng):
    """The tc kernel's packed INT4 decode (even and odd tiles and two dots, K order and one dot:
    Config.k_order, or eight code-slot dots: Config.planes) in both orientations, split-K too:
    with x the identity every output
    is one weight times 1 (float32 sums of one product), so y = W^T bit for bit, and a code
    out of its K place shows up as a wrong weight."""
    from compress.kernels import tc

    n, k = 192, 256
    packed, scale, zero = cuda(make_int_weight(n, k, group, symmetric, 4, rng, dtype))
    args = (packed, scale, zero, (n, k), 4)
    assert tc.packed_int4(tc.FMT_INT, 4, dtype, scale.dtype, 0)
    y = int_matmul(torch.eye(k, dtype=dtype, device="cuda"), *args, path="tc", config=cfg)
    want = tc.words_dequantize_ref(tc.FMT_INT, packed, scale, zero, None, n, k, 4, group or k)
    assert torch.equal(y.t(), want.to(dtype)), (y.t().float() - want).abs().max()


@pytest.mark.parametrize("cfg", [C.Config(16, 64, 128, 4, 4, 4, planes=True),
                                 C.Config(32, 64, 128, 4, 3, 2, planes=True),
                                 C.Config(128, 64, 128, 4, 3, 2, swap=True, planes=True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
def test_tc_planes_decode_on_uneven_shapes(cfg, dtype, symmetric, rng):
    """Config.planes (eight code-slot dots, _int4_planes_dot) where tiles hang over the edges:
    rows past N, a last K-tile past K, M not a multiple of the tile; against the reference (its
    bit-exactness is in the packed-decode test above)."""
    n, k, m = 200, 4096 + 128, 23
    packed, scale, zero = cuda(make_int_weight(n, k, 128, symmetric, 4, rng, dtype))
    args = (packed, scale, zero, (n, k), 4)
    x = torch.randn(m, k, generator=rng).to(dtype).cuda()
    y = int_matmul(x, *args, path="tc", config=cfg)
    assert_matmul_close(y, int_matmul_ref(x, *args), x, int_dequantize_ref(*args),
                        (rng.initial_seed(), str(cfg)))


@pytest.mark.parametrize("s", [258, 4099])
@pytest.mark.parametrize("mask_kind", ["static", "random"])
def test_decode_attention_on_gpu(s, mask_kind, rng):
    """The split-key decode attention on Llama-3-8B's heads (32 on 8, D = 128, bf16) against
    repeat_kv + SDPA in float32; bit for bit again over repeats and a CUDA graph replay (the
    splits are combined in a fixed order), the counters left zero."""
    from test_kernel_decode_attention import inputs

    from compress.kernels.decode_attention import decode_attention, decode_attention_ref

    q, k, v, mask = cuda(inputs((1, 32, 8, s, 128), torch.bfloat16, mask_kind, rng))
    got = decode_attention(q, k, v, mask)
    want = decode_attention_ref(q, k, v, mask)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    for _ in range(2):
        assert torch.equal(decode_attention(q, k, v, mask), got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_attention(q, k, v, mask)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, got)
    assert not C.tile_counters(1, q.device)[:8].any()


def test_l2_prefetch_on_gpu(rng):
    """The bulk prefetch (inline PTX cp.async.bulk.prefetch.L2, compress/kernels/prefetch.py)
    on Llama's gate/up INT4 tensors, eager and replayed from a CUDA graph: it runs, changes
    nothing it reads, and asks for what the reference says (its plan, on the GPU)."""
    from compress.kernels import prefetch

    packed, scale, _ = cuda(make_int_weight(14336, 4096, 128, True, 4, rng, torch.bfloat16))
    kept = packed.clone(), scale.clone()
    ranges = prefetch.prefetch_ranges([(packed, 2 ** 40), (scale, 2 ** 40)], packed.device)
    assert [tuple(p) for p in prefetch.prefetch_l2(ranges, plan=True).tolist()] == \
        prefetch.prefetch_plan(ranges)
    prefetch.prefetch_l2(ranges)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prefetch.prefetch_l2(ranges)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(packed, kept[0]) and torch.equal(scale, kept[1])


def test_l2_prefetch_in_a_decode_step_on_gpu(monkeypatch):
    """A tiny INT4 Llama fused as compress.load fuses it, a one-token step with the L2 prefetch
    after each q/k/v (fused.L2_PREFETCH_MIB): bit for bit the logits of the step without it
    (a prefetch is a hint to the memory system, the same kernels compute)."""
    from test_kernel_fused_projections import FORMATS, quantized_llama

    from compress.runtime import fused

    model = quantized_llama(FORMATS["int4"]).cuda()
    for p in model.parameters():   # bf16 activations; the packed buffers keep their dtypes
        p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        assert fused.fuse_projections(model) == 2 * 2
        want = model(ids).logits
        monkeypatch.setattr(fused, "L2_PREFETCH_MIB", 1)
        got = model(ids).logits
    group = model.model.layers[0].self_attn.q_proj.fused_group
    assert group.prefetch is not None and group.prefetch.ranges is not None
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["int4-asym", "int8-asym", "nvfp4", "2:4-int4", "2:4-bf16"])
@pytest.mark.parametrize("mib", [4, 16])
def test_dequant_path_in_row_chunks_on_gpu(kind, mib, rng, monkeypatch):
    """The dequant path in row chunks (C.DEQUANT_CHUNK_MIB: one reused buffer, cuBLAS writing
    each chunk's column slice of y in place) on Llama's gate/up shape with a bias, N not a
    multiple of the chunk; against the reference, then inside a CUDA graph."""
    n, k, m = 14336 + 64, 4096, 256
    monkeypatch.setattr(C, "DEQUANT_CHUNK_MIB", mib)
    x = torch.randn(m, k, generator=rng).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=rng).to(torch.bfloat16).cuda()
    if kind.startswith("2:4"):
        value_kind = "int" if kind == "2:4-int4" else "16bit"
        t, w = make_sparse(value_kind, n, k, rng)
        t, w = cuda(t), w.cuda()
        def run():
            return sparse24_matmul(x, value_kind, t, (n, k), bias=bias, path="dequant")
        ref = sparse24_matmul_ref(x, value_kind, t, (n, k), bias=bias)
    elif kind.startswith("int"):
        bits = int(kind[3])
        args = cuda(make_int_weight(n, k, 128, False, bits, rng, torch.bfloat16)) + ((n, k), bits)
        def run():
            return int_matmul(x, *args, bias=bias, path="dequant")
        ref, w = int_matmul_ref(x, *args, bias=bias), int_dequantize_ref(*args)
    else:
        _, packed, scale, gs = cuda(make_fp4_weight("nvfp4", n, k, rng))
        args = ("nvfp4", packed, scale, gs, (n, k))
        def run():
            return fp4_matmul(x, *args, bias=bias, path="dequant")
        ref, w = fp4_matmul_ref(x, *args, bias=bias), fp4_dequantize_ref(*args)
    assert C.dequant_chunk_rows(n, k, 2, x.device) < n
    y = run()
    assert_matmul_close(y, ref, x, w, (kind, mib), bias=bias)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    assert_matmul_close(captured, ref, x, w, (kind, mib, "graph"), bias=bias)


@pytest.mark.parametrize("kind", ["int4", "int4-gated", "nvfp4", "nvfp4-gated", "2:4-int4",
                                  "int4-m16", "2:4-int4-m16"])
@pytest.mark.parametrize("split", [2, 7])
def test_split_k_in_one_launch_on_gpu(kind, split, rng, monkeypatch):
    """Split-K without a zero fill or a cast (_common.split_total: partials in a workspace, the
    last K-slice of a tile sums them after an acq_rel counter) on Llama's stacked gate/up shape,
    thousands of programs a slice in flight: the M = 1 kernel plain and gated, FP4, the 2:4
    transposed kernel, the few-row tensor-core kernels (decode's and 2:4's "splitk" path).
    Against the reference, then bit for bit the same over two more calls and a CUDA graph
    replay (the slices are summed in a fixed order, and every launch leaves the counters
    zero)."""
    from compress.kernels import sparse24

    n, k, gated = 28672, 4096, kind.endswith("gated")
    m = 16 if kind.endswith("m16") else 1
    cfg = C.Config(16, 64, 256, 4, 3, split) if m == 16 else C.Config(1, 8, 1024, 2, 1, split)
    x = torch.randn(m, k, generator=rng).to(torch.bfloat16).cuda()
    if kind.startswith("2:4"):
        monkeypatch.setattr(sparse24, "GEMV_CONFIG", cfg)
        t, w = make_sparse("int", n, k, rng)
        t, w = cuda(t), w.cuda()
        def run():
            return sparse24_matmul(x, "int", t, (n, k), path="splitk" if m == 16 else "gemv",
                                   split_k=split)
        ref = sparse24_matmul_ref(x, "int", t, (n, k))
    elif kind.startswith("int4"):
        args = cuda(make_int_weight(n, k, 128, True, 4, rng, torch.bfloat16)) + ((n, k), 4)
        def run():   # m = 16 on the decode path: its tensor-core kernel (_words_matmul_kernel)
            return int_matmul(x, *args, path="decode", config=cfg, gated=gated)
        ref, w = int_matmul_ref(x, *args), int_dequantize_ref(*args)
    else:
        _, packed, scale, gs = cuda(make_fp4_weight("nvfp4", n, k, rng))
        args = ("nvfp4", packed, scale, gs, (n, k))
        def run():
            return fp4_matmul(x, *args, path="decode", config=cfg, gated=gated)
        ref, w = fp4_matmul_ref(x, *args), fp4_dequantize_ref(*args)
    y = run()
    if gated:
        assert_gated_close(y, x, w, None, (kind, split))
    else:
        assert_matmul_close(y, ref, x, w, (kind, split))
    for _ in range(2):
        assert torch.equal(run(), y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, y)
    assert not C.tile_counters(1, x.device).any()


def test_pdl_chain_is_bit_for_bit_the_chain_without_it_on_gpu(rng, monkeypatch):
    """Programmatic dependent launch (_common.PDL): a decode step's chain of our launches, each
    reading what the one before wrote (add + RMSNorm, q/k/v, RoPE, the static cache update,
    o_proj, add + RMSNorm, the gated gate/up, down; three layers; then the tc kernel on 16
    rows), with PDL eagerly and replayed from a CUDA graph: bit for bit the chain without PDL,
    outputs and cache alike (a launch that read its input before its producer finished would
    not be)."""
    from compress.kernels.kv_cache import static_cache_write
    from compress.kernels.rmsnorm import add_rmsnorm
    from compress.kernels.rope_gather import rope_qk

    k, half, heads, kv_heads, d = 4096, 14336, 32, 8, 128

    def weight(n, kk):
        return cuda(make_int_weight(n, kk, 128, True, 4, rng, torch.bfloat16)) + ((n, kk), 4)

    qkv_w, o_w = weight(6144, k), weight(k, k)
    gate_up, down = weight(2 * half, k), weight(k, half)
    norm = (torch.rand(k, generator=rng) + 0.5).to(torch.bfloat16).cuda()
    x = torch.randn(1, k, generator=rng).to(torch.bfloat16).cuda()
    angle = torch.rand(1, 1, d, generator=rng).cuda() * 6
    cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)

    def chain():
        keys = torch.zeros(1, kv_heads, 16, d, dtype=torch.bfloat16, device="cuda")
        values, length = torch.zeros_like(keys), torch.zeros((), dtype=torch.int64, device="cuda")
        arrivals = torch.zeros(1, dtype=torch.int32, device="cuda")
        y, h = add_rmsnorm(x, x, norm, 1e-5)
        for _ in range(3):
            qkv = int_matmul(y, *qkv_w).view(1, 1, heads + 2 * kv_heads, d).transpose(1, 2)
            q, kk, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
            q, kk = rope_qk(q.contiguous(), kk.contiguous(), cos, sin)
            static_cache_write(keys, values, kk, v, length, arrivals)
            y, h = add_rmsnorm(int_matmul(q.transpose(1, 2).reshape(1, k), *o_w), h, norm, 1e-5)
            a = int_matmul(y, *gate_up, gated=True)
            y, h = add_rmsnorm(int_matmul(a, *down), h, norm, 1e-5)
        return y, keys, values, length, int_matmul(torch.cat([y] * 16), *o_w)   # 16 rows: tc

    monkeypatch.setattr(C, "PDL", False)   # whatever the default: the chain without PDL first
    want = chain()
    monkeypatch.setattr(C, "PDL", True)
    assert C.pdl_on(x.device)
    assert all(torch.equal(a, b) for a, b in zip(chain(), want))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rope_qk_on_gpu(dtype, rng):
    """The one-launch RoPE of q and k (runtime/rope.py wires it into every attention layer) on
    LlamaAttention's layout, Llama-3-8B heads, against transformers' function."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from compress.kernels.rope_gather import rope_qk

    b, length, h, hk, d = 2, 3, 32, 8, 128
    q = torch.randn(b, length, h * d, generator=rng).to(dtype).cuda().view(b, length, h, d)
    k = torch.randn(b, length, hk * d, generator=rng).to(dtype).cuda().view(b, length, hk, d)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    angle = (torch.rand(b, length, d // 2, generator=rng) * 100).cuda()
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    got = rope_qk(q, k, cos, sin)
    want = apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_residual_add_in_the_norm_kernel_on_gpu(family):
    """fuse_residual_norms on a bf16 model on the GPU, with the transformers installed there
    (5.17 on the H200 machine: its layers' arguments differ from the CPU machine's): every
    layer fused; the greedy tokens those of the model with only the norms fused, the logits
    within bf16 rounding (the same float32 add rounded to bf16 as torch's, so expected equal;
    the CPU test checks float32 bit for bit)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.runtime.norms import fuse_residual_norms, fuse_rmsnorms

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=256, hidden_size=512,
                                  intermediate_size=1024, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 16), device="cuda")

    def run():
        steps = model.generate(ids[:1], max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=0)
        return model(ids).logits, steps.sequences, torch.stack(steps.logits)

    with torch.no_grad():
        assert fuse_rmsnorms(model) > 0
        want = run()
        assert fuse_residual_norms(model) == 3
        got = run()
    assert torch.equal(got[1], want[1])
    for g, w in (got[0], want[0]), (got[2], want[2]):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2,
                                   atol=2e-2 * w.abs().max().item())


@pytest.mark.parametrize("name", ["int4", "nvfp4"])
def test_mlp_residual_in_down_projs_epilogue_on_gpu(name):
    """A bf16 model with compressed linears on the GPU: after fuse_residual_norms the MLP's
    residual add of a decode step is the bias of down_proj's M = 1 kernel; greedy decode logits
    match the model without it up to that one bf16 rounding."""
    from test_kernel_fused_projections import FORMATS, quantized_llama

    from compress.runtime.fused import fuse_projections
    from compress.runtime.norms import fuse_residual_norms, fuse_rmsnorms

    model = quantized_llama(FORMATS[name]).cuda()
    for p in model.parameters():   # bf16 activations; the packed buffers keep their dtypes
        p.data = p.data.to(torch.bfloat16)   # (.to(bf16) would turn E4M3 scales into bf16)
    ids = torch.randint(0, 128, (1, 8), device="cuda")

    def decode():
        steps = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(steps.logits).float()

    with torch.no_grad():
        fuse_rmsnorms(model)
        fuse_projections(model)
        want = decode()
        assert fuse_residual_norms(model) == 2
        got = decode()
    down = model.model.layers[0].mlp.down_proj
    assert any(path.endswith("+residual") for path in down.kernel_calls), down.kernel_calls
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_static_cache_update_in_one_launch_on_gpu():
    """fuse_static_cache on a bf16 model on the GPU: greedy decode through a static cache gives
    transformers' tokens and logits bit for bit, and the step replayed from a CUDA graph gives
    the eager step's tokens (the kernel reads the cache's length at replay, as index_copy_
    does)."""
    from transformers import AutoConfig, AutoModelForCausalLM, StaticCache
    from transformers.cache_utils import StaticLayer

    from compress.evaluation.bench import _as_cuda_graph
    from compress.runtime.kv_cache import fuse_static_cache

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=512,
                                  intermediate_size=1024, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 12), device="cuda")

    def generate():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0,
                             cache_implementation="static")
        return out.sequences, torch.stack(out.logits)

    original = StaticLayer.update
    try:
        with torch.no_grad():
            want = generate()
            assert fuse_static_cache(model)
            got = generate()
            cache = StaticCache(config=model.config, max_cache_len=40)
            tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
            pos = torch.zeros(1, dtype=torch.long, device="cuda")

            def prefill():
                cache.reset()
                out = model(ids, past_key_values=cache, use_cache=True,
                            cache_position=torch.arange(12, device="cuda"))
                tok.copy_(out.logits[:, -1:].argmax(-1))
                pos.fill_(12)

            def step():
                logits = model(tok, past_key_values=cache, cache_position=pos,
                               use_cache=True).logits
                tok.copy_(logits[:, -1:].argmax(-1))

            def decode(run):
                prefill()
                tokens = [tok.item()]
                for _ in range(7):
                    run()
                    pos.add_(1)
                    tokens.append(tok.item())
                return tokens

            eager = decode(step)
            method, replay = _as_cuda_graph(step)
            assert method == "cuda graph + static cache", method
            replayed = decode(replay)
    finally:
        StaticLayer.update = original
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert replayed == eager   # the same cache and shapes: the same numbers
