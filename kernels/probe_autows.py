"""Does Triton's Hopper warp specialization (`tl.range(..., warp_specialize=True)`) give the tc
kernel the producer / consumer split its M = 128 profile asks for? A compile-only probe (no GPU):
a reduced copy of tc.py's packed INT4 loop in K order (x and the packed bytes through TMA
descriptors, the K-order PTX decode, a scale per row loaded a tile ahead, one dot on the
swapped tile, y^T = W x^T) is compiled for sm_90 over the tiles the tc tables use, and its
TTGIR read: the warps a program gets, the partitions Triton made, and each partition's dot.

A useful split has a producer partition (the loads) and consumer partitions that share the
tile (data partitioning: each consumer a part of the weight rows). If every consumer's dot is
the whole tile, the consumers each decode and multiply the whole tile and store the same
output: twice the work of the plain kernel, not a split of it. kernels/NOTES.md ("Twentieth
session") has the table and what it means.

    PYTHONPATH=/tmp/t36 python kernels/probe_autows.py   # /tmp/t36: pip install --target
                                                         # /tmp/t36 --no-deps triton==3.6.0
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError

from compress.kernels.tc import INT4_K_ORDER_BF16

# (rows of x, weight rows, block_k, warps, stages): the swapped tc tiles of the M = 16..128
# tables and autotune lists, and wider weight tiles (where two consumers could share the rows)
TILES = [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 3), (128, 64, 64, 4, 3),
         (16, 128, 128, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 4, 3), (16, 64, 128, 8, 4),
         (16, 128, 128, 8, 4), (128, 128, 64, 8, 3)]


@triton.jit
def _packed_k_order_loop(x_desc, w_desc, s_ptr, out_ptr, N, K, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    groups = K // 128
    s = tl.load(s_ptr + rn[:, None] * groups).to(tl.float32)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, warp_specialize=WS):
        b = w_desc.load([pid_n * BN, k0 // 2])                    # [BN, BK / 2] packed bytes
        lo, hi = tl.inline_asm_elementwise(INT4_K_ORDER_BF16, "=&r,=&r,=&r,=&r,r,r,r,r,r",
                                           [b, s.to(tl.bfloat16), tl.full(s.shape, 136.0, tl.bfloat16)],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                           pack=4)
        lo = tl.reshape(lo, (BN, BK // 8, 4))
        hi = tl.reshape(hi, (BN, BK // 8, 4))
        w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (BN, BK))
        s = tl.load(s_ptr + rn[:, None] * groups + (k0 + BK) // 128,
                    mask=k0 + BK < K, other=1.0).to(tl.float32)
        x = x_desc.load([pid_m * BM, k0])                          # [BM, BK]
        acc = tl.dot(w, tl.trans(x), acc)
    rm = pid_m * BM + tl.arange(0, BM)
    tl.store(out_ptr + rm[None, :] * N + rn[:, None], acc.to(tl.bfloat16))


def probe(bm: int, bn: int, bk: int, warps: int, stages: int) -> str:
    sig = {"x_desc": f"tensordesc<bf16[{bm}, {bk}]>", "w_desc": f"tensordesc<u8[{bn}, {bk // 2}]>",
           "s_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "WS": "constexpr"}
    consts = {"BM": bm, "BN": bn, "BK": bk, "WS": True}
    src = ASTSource(_packed_k_order_loop, sig,
                    {(_packed_k_order_loop.arg_names.index(c),): v for c, v in consts.items()})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages})
    except (RuntimeError, CompilationError) as exc:   # the MLIR reproducer names the pass
        return f"does not compile ({type(exc).__name__})"
    ttgir = k.asm["ttgir"]
    parts = len(re.findall(r"^\s*partition\d+\(", ttgir, re.MULTILINE))
    if not parts:
        return f"{k.metadata.num_warps} warps, not specialized"
    # the weight operand of each partition's wgmma: [weight rows, block_k] when it is whole
    dots = re.findall(r"warp_group_dot .*?\} : tensor<(\d+x\d+)x\w+", ttgir)
    whole = bool(dots) and all(d == f"{bn}x{bk}" for d in dots)
    return (f"{k.metadata.num_warps} warps, {parts} partitions, consumer dots "
            f"{', '.join(dots)}: {'each the whole tile (replicated)' if whole else 'split'}")


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, packed INT4 K-order loop, warp_specialize=True")
    print("| x rows | weight rows | block_k | warps | stages | result |")
    print("|---|---|---|---|---|---|")
    for tile in TILES:
        print("| " + " | ".join(map(str, tile)) + f" | {probe(*tile)} |")


if __name__ == "__main__":
    main()
