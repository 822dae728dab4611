"""The tc kernel's producer / consumer form, written in Gluon (Triton's explicit-layout dialect):
does it compile for sm_90, is it right, and does it beat the shipped tc kernel at M = 16..128?

The M = 128 profile (seventeenth session) found the tc kernel a latency chain with 1.9 warps a
scheduler; Triton's automatic warp specialization cannot split it (kernels/probe_autows.py).
Here the split is explicit. A program owns 128 weight rows and BM rows of x, INT4 g128
symmetric (the packed decode's PTX, tc.INT4_K_ORDER_BF16), three partitions (TILES also has
64-row programs with one MMA partition, and register caps that allow two programs an SM):
  * a load warp: per K-tile, TMA copies of the x tile [BM, BK] and of the 128 rows' packed bytes
    [128, BK / 2] into a ring of STAGES shared-memory slots, each slot's "ready" barrier
    counting the bytes in, its "empty" barrier waited on before the slot is refilled;
  * two MMA partitions of 4 warps (a warp group each), one for weight rows 0-63, one for
    64-127: wait for a slot, decode their 64 rows from shared memory in registers, wgmma with
    the decoded tile as the register operand and x^T from the slot, release the slot.
Each MMA partition's chain (decode, wgmma) overlaps the other's and the loads, with no
shared-memory round trip for the weights' codes in flight to the loads.

    PYTHONPATH=/tmp/t36 python kernels/probe_gluon_tc.py   # CPU: compile for sm_90, SASS
    python kernels/probe_gluon_tc.py --check               # GPU: against the INT4 reference
    python kernels/probe_gluon_tc.py --time                # GPU: us per call against the
                                                           # shipped tc kernel and cuBLAS bf16

A probe, not a kernel of the library: it has no split-K (o and qkv give 32-48 programs of 128
rows on 132 SMs) and takes K a multiple of 128. Whether the library gets a Gluon tc kernel is
what --time decides (kernels/NOTES.md, "Twentieth session").
"""
import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from compress.kernels.tc import INT4_K_ORDER_BF16

ROWS = 64          # weight rows an MMA partition owns (a wgmma row block)
# (x rows BM, block_k, stages, MMA partitions, registers a thread): 2 partitions own 128
# weight rows a program, 1 owns 64 (twice the programs: one warp group and the load warp).
# Registers None: ptxas's choice (168 with 2 partitions, 255 with 1: one program an SM);
# 128 / 80 (maxnreg, no spills on sm_90): two programs an SM. block_k <= 128: one scale a row
# a tile (g128), as tc's packed decode
TILES = [(16, 128, 4, 2, None), (32, 128, 4, 2, None), (64, 128, 3, 2, None),
         (128, 64, 3, 2, None), (16, 128, 4, 2, 80),
         (16, 128, 4, 1, 128), (64, 128, 3, 1, 128), (128, 64, 3, 1, 128)]


@gluon.jit
def _load_partition(x_desc, w_desc, x_smem, w_smem, ready, empty, K,
                    STAGES: gl.constexpr, BK: gl.constexpr):
    m0 = gl.program_id(0) * x_desc.block_type.shape[0]
    n0 = gl.program_id(1) * w_desc.block_type.shape[0]
    for i in range(gl.cdiv(K, BK)):
        slot = i % STAGES
        # a fresh barrier has completed the phase before its first: the first round passes
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [m0, i * BK], ready.index(slot),
                                        x_smem.index(slot))
        tma.async_copy_global_to_shared(w_desc, [n0, i * BK // 2], ready.index(slot),
                                        w_smem.index(slot))


@gluon.jit
def _mma_partition(x_smem, w_smem, ready, empty, s_ptr, out_ptr, M, N, K, HALF: gl.constexpr,
                   STAGES: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                   CONSUMERS: gl.constexpr):
    R: gl.constexpr = 64
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BM, 16])
    a_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # 4 bytes (8 codes) a thread along K: one call of the packed decode's PTX (pack=4)
    byte_layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
    groups = K // 128
    n0 = gl.program_id(1) * (CONSUMERS * R) + HALF * R
    rows = n0 + gl.arange(0, R, layout=gl.SliceLayout(1, byte_layout))
    acc = gl.zeros([R, BM], gl.float32, layout=mma)
    for i in range(gl.cdiv(K, BK)):
        slot = i % STAGES
        scale = gl.load(s_ptr + rows[:, None] * groups + (i * BK) // 128,
                        mask=rows[:, None] < N, other=0.0)
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        packed = w_smem.index(slot).slice(HALF * R, R, dim=0).load(byte_layout)
        lo, hi = gl.inline_asm_elementwise(INT4_K_ORDER_BF16, "=&r,=&r,=&r,=&r,r,r,r,r,r",
                                           [packed, scale, gl.full_like(scale, 136.0)],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True,
                                           pack=4)
        # codes 0-3 and 4-7 of each word back in K order (tc._int4_packed_k_order)
        lo = gl.reshape(lo, (R, BK // 8, 4))
        hi = gl.reshape(hi, (R, BK // 8, 4))
        w = gl.reshape(gl.permute(gl.join(lo, hi), (0, 1, 3, 2)), (R, BK))
        acc = warpgroup_mma(gl.convert_layout(w, a_operand), x_smem.index(slot).permute((1, 0)),
                            acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        mbarrier.arrive(empty.index(slot), count=1)
    out_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [4, 1], [0, 1])
    acc = gl.convert_layout(acc, out_layout)
    rn = n0 + gl.arange(0, R, layout=gl.SliceLayout(1, out_layout))
    rm = gl.program_id(0) * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, out_layout))
    gl.store(out_ptr + rm[None, :] * N + rn[:, None], acc.to(gl.bfloat16),
             mask=(rm[None, :] < M) & (rn[:, None] < N))


@gluon.jit
def _gluon_tc_kernel(x_desc, w_desc, s_ptr, out_ptr, M, N, K, STAGES: gl.constexpr,
                     CONSUMERS: gl.constexpr):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape,
                                       x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape,
                                       w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=CONSUMERS)   # every MMA partition releases a slot
    fence_async_shared()
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_mma_partition, (x_smem, w_smem, ready, empty, s_ptr, out_ptr, M, N, K, 0, STAGES,
                              BM, BK, CONSUMERS)),
            (_mma_partition, (x_smem, w_smem, ready, empty, s_ptr, out_ptr, M, N, K, 1, STAGES,
                              BM, BK, CONSUMERS)),
            (_load_partition, (x_desc, w_desc, x_smem, w_smem, ready, empty, K, STAGES, BK)),
        ], [4, 1], [232, 40])
    else:
        gl.warp_specialize([
            (_mma_partition, (x_smem, w_smem, ready, empty, s_ptr, out_ptr, M, N, K, 0, STAGES,
                              BM, BK, CONSUMERS)),
            (_load_partition, (x_desc, w_desc, x_smem, w_smem, ready, empty, K, STAGES, BK)),
        ], [1], [40])


def layouts(bm: int, bk: int, consumers: int):
    return (gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([consumers * ROWS, bk // 2], gl.uint8))


def gluon_tc_matmul(x2: torch.Tensor, words: torch.Tensor, scale: torch.Tensor,
                    bm: int, bk: int, stages: int, consumers: int,
                    maxnreg: int | None) -> torch.Tensor:
    """x2 [M, K] bf16 @ W^T -> [M, N] bf16; W INT4 g128 symmetric as stored (words int32
    [N, K / 8], scale bf16 [N, K / 128]); K a multiple of 128."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    m, k = x2.shape
    n = words.shape[0]
    assert k % 128 == 0 and x2.dtype == scale.dtype == torch.bfloat16
    rows = consumers * ROWS
    x_layout, w_layout = layouts(bm, bk, consumers)
    x_desc = TensorDescriptor.from_tensor(x2, [bm, bk], x_layout)
    w_desc = TensorDescriptor.from_tensor(words.view(torch.uint8), [rows, bk // 2], w_layout)
    out = torch.empty((m, n), dtype=torch.bfloat16, device=x2.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, rows))
    _gluon_tc_kernel[grid](x_desc, w_desc, scale, out, m, n, k, STAGES=stages,
                           CONSUMERS=consumers, num_warps=4,
                           **({"maxnreg": maxnreg} if maxnreg else {}))
    return out


def compile_sm90(bm: int, bk: int, stages: int, consumers: int, maxnreg: int | None):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    x_layout, w_layout = layouts(bm, bk, consumers)
    sig = {"x_desc": f"tensordesc<bf16[{bm}, {bk}],{x_layout!r}>",
           "w_desc": f"tensordesc<u8[{consumers * ROWS}, {bk // 2}],{w_layout!r}>",
           "s_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "STAGES": "constexpr", "CONSUMERS": "constexpr"}
    consts = {"STAGES": stages, "CONSUMERS": consumers}
    src = GluonASTSource(_gluon_tc_kernel, sig, {(_gluon_tc_kernel.arg_names.index(c),): v
                                                 for c, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, **({"maxnreg": maxnreg} if maxnreg else {})})


def name(tile) -> str:
    bm, bk, stages, consumers, maxnreg = tile
    return f"{bm}x{bk} s{stages} c{consumers}{f' r{maxnreg}' if maxnreg else ''}"


def weights(n: int, k: int, device, seed: int = 0):
    """INT4 g128 symmetric codes packed as the library stores them, and bf16 scales."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), device=device, generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, k // 128, device=device, generator=gen) * 0.01 + 1e-3).to(
        torch.bfloat16)
    return pack_to_int32(codes, 4), scale


def check() -> None:
    from compress.kernels.w4a16 import int_matmul_ref

    failures = 0
    for m, n, k in [(16, 4096, 4096), (23, 200, 4096 + 128), (128, 6144, 4096), (1, 64, 256)]:
        words, scale = weights(n, k, "cuda")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = int_matmul_ref(x, words, scale, None, (n, k), 4).float()
        for tile in TILES:
            got = gluon_tc_matmul(x, words, scale, *tile).float()
            err = (got - want).abs().max().item()
            bound = 2e-2 * want.abs().max().item() + 1e-2
            failures += err > bound
            print(f"M={m} N={n} K={k} tile {name(tile)}: max error {err:.3g} "
                  f"(bound {bound:.3g}) {'ok' if err <= bound else 'WRONG'}")
    print(f"check: {failures} wrong")
    if failures:
        sys.exit(1)


def time_all(reps: int) -> None:
    import bench_kernels

    from compress.kernels.w4a16 import int_matmul

    cuda = torch.device("cuda")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=cuda)
    print("| shape | M | cuBLAS bf16 us | shipped tc us | best Gluon us (tile) | Gluon vs tc |")
    print("|---|---|---|---|---|---|")
    for shape, (n, k) in bench_kernels.SHAPES.items():
        words, scale = weights(n, k, cuda)
        w16 = torch.randn(n, k, device=cuda, dtype=torch.bfloat16)
        contenders = {
            "bf16": lambda x, w16=w16: x @ w16.T,
            "tc": lambda x, words=words, scale=scale, n=n, k=k: int_matmul(
                x, words, scale, None, (n, k), 4, path="tc"),
            **{tile: lambda x, words=words, scale=scale, tile=tile: gluon_tc_matmul(
                x, words, scale, *tile) for tile in TILES}}
        for m in (16, 64, 128):
            x = torch.randn(m, k, device=cuda, dtype=torch.bfloat16)
            us = {c: bench_kernels.time_call(fn, x, cuda, reps, flush) * 1e6
                  for c, fn in contenders.items()}
            tile = min(TILES, key=us.get)
            print(f"| {shape} | {m} | {us['bf16']:.1f} | {us['tc']:.1f} | {us[tile]:.1f} "
                  f"({name(tile)}) | {us['tc'] / us[tile]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="GPU: against the reference")
    parser.add_argument("--time", action="store_true", help="GPU: against the shipped tc kernel")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    if args.check or args.time:
        if args.check:
            check()
        if args.time:
            time_all(args.reps)
        return
    import compile_check as cc

    print(f"triton {triton.__version__}, sm_90: the Gluon tc probe (64 weight rows a partition)")
    for bm, bk, stages, consumers, maxnreg in TILES:
        k = compile_sm90(bm, bk, stages, consumers, maxnreg)
        wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)",
                                      k.asm["ptx"])))
        print(f"ok  x rows {bm:3}, block_k {bk}, {stages} stages, {consumers} MMA partitions, "
              f"maxnreg {maxnreg}: {k.metadata.num_warps} warps, "
              f"shared memory {k.metadata.shared} B, wgmma {', '.join(wgmma)}"
              f"{cc.ptxas_info(k, 90)}{cc.loop_sass(k)}")


if __name__ == "__main__":
    main()
