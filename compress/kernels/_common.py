"""Host-side pieces shared by the matmul kernels: path choice by M, launch configs, split-K.

The kernels (decode.py, tc.py, sparse24.py) all compute y[M, N] = x[M, K] @ W[N, K]^T with W
decoded tile by tile in registers. Paths, chosen by M (limits: DECODE_MAX_M, DEQUANT_MIN_M, or
the GPU's config table "paths"):
  INT4/INT8/NVFP4/MXFP4 (decode=True):
    decode   M <= decode_max_m        compress/kernels/decode.py: CUDA-core M=1 loop, slot-wise
                                      tensor-core dots for a few rows
    tc       decode_max_m < M < dequant_min_m   compress/kernels/tc.py: packed words decoded
                                      per K-tile to the activation dtype, one tl.dot per tile
    dequant  M >= dequant_min_m       decode W once to x.dtype (tc.py), then torch.matmul
                                      (dequant_linear: in row chunks where the table says)
  2:4 (sparse24.py, old kernels):
    gemv     M == 1        CUDA-core multiply-and-sum, split-K
    splitk   M in 2..16    tensor-core tiles of 16 rows, split-K
    tile     up to DEQUANT_MIN_M: tensor-core tiles, no split
    dequant  M >= DEQUANT_MIN_M
Launch configs of the decode and tc paths are data (configs/<gpu>.json, configs/default.json:
tables "decode" and "tc", keys "<family>/m<bucket>"), so per-GPU tuning (kernels/autotune.py)
replaces numbers, not code.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Tests set this: every buffer a kernel writes is then filled with NaN before launch, so an
# element the kernel forgets to write fails the comparison instead of passing as zero.
POISON = False

# Programmatic dependent launch (Hopper and later; Triton's launch_pdl, PTX griddepcontrol): a
# launch may start while the kernel before it in the stream drains its last programs, do the
# work that does not depend on it (the M = 1 kernel: load its first tile of weights), then wait
# for it (wait_for_producer). A decode step is ~300 launches of 2-40 us, each with a tail and a
# ramp. Measured on the H200 (2026-12-05, kernels/BENCHMARKS.md): end-to-end decode +2-3% INT4,
# +6% NVFP4; the chain test is bit for bit and the whole GPU suite passes with it on. On by
# default; COMPRESS_PDL=0 turns it off (bench_e2e's "<format>-nopdl" rows).
PDL = os.environ.get("COMPRESS_PDL", "1") != "0"

# Above this many rows the weight is decoded once and cuBLAS does the matmul (tunable).
DEQUANT_MIN_M = 512
# The dequant path in row chunks of about this many MiB of decoded weight, one buffer reused
# (dequant_linear). Decoding all of W first writes N K 2 bytes to DRAM for cuBLAS to read back:
# at M = 256 on the H200 that pass costs about as much as the matmul (kernels/BENCHMARKS.md).
# A chunk that fits in L2 (60 MB on the H200) can be read back from L2 instead, at the price of
# N-chunked matmuls (fewer tiles each). None: the GPU table's "paths": {"dequant_chunk_mib": ..},
# whole weights where it names none. bench_kernels' "@chunk<MiB>" variants set it for a call.
DEQUANT_CHUNK_MIB: float | None = None


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2  # tensor-core tiles: Triton's pipeline; M = 1 (_gemv_kernel): > 1 prefetches
    split_k: int = 1   # > 1: K-slices in one launch, summed by each tile's last (finish_split)
    swap: bool | None = None   # tc: y^T = W x^T (None: when block_m < 64, see tc.swap)
    # M = 1 (_gemv_kernel): words 2p and 2p + 1 read as one int64 (decode.PAIR_WORDS): fewer
    # loads, more registers, so the autotuner picks it per format and shape
    pair: bool = False
    # tc, packed INT4 (tc._int4_packed): the codes decoded in K order and one dot per tile, not
    # even/odd halves and two dots: x then goes from its pipelined buffer straight into the
    # dot, which Triton can then issue asynchronously (the next tile's decode overlaps it)
    k_order: bool = False
    # tc, packed INT4 on swapped tiles with block_k >= 128 (tc._int4_planes_dot): eight dots a
    # tile, one a code slot, so the decoded weights go straight from registers into the wgmma
    # (no shared-memory round trip) and x is split instead; takes precedence over k_order
    planes: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# Untuned defaults (no GPU this session). block_k must be a multiple of 32 (8 int4 codes per
# word, 2 fp4 codes per byte, 2:4 metadata: 2 groups of 4 per byte, packed int codes: 16 per word).
CONFIGS: dict[str, Config] = {
    "gemv": Config(1, 32, 128, num_warps=4),
    "splitk": Config(16, 64, 64, num_warps=4),
    "tile": Config(64, 64, 64, num_warps=4, num_stages=3),
    "dequant": Config(1, 32, 64, num_warps=4),
    # tc.py's dequantize of INT/FP4 words: 8 codes a thread along K (16-byte stores)
    "dequant_words": Config(1, 32, 256, num_warps=4),
}


# The decode kernel serves M up to this many rows (beyond, the tc kernel, then dequant).
DECODE_MAX_M = 1   # H200: the tc kernel wins from M=2 (kernels/BENCHMARKS.md, 2026-12-03)
# configs per bucket: M=1, 2..16, 17..64, 65..128, 129..256 (and beyond: the last bucket)
M_BUCKETS = (1, 16, 64, 128, 256)
# the config tables: one per kernel with tuned configs ("moe": compress/kernels/moe.py, M = 1
# bucket only, keyed by the per-expert shape)
TABLES = ("decode", "tc", "moe", "sparse24")
CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_ENV = "COMPRESS_KERNEL_CONFIGS"   # a JSON file that replaces the per-GPU one


def choose_path(m: int, decode: bool = False, device=None) -> str:
    """decode: the format has decode- and tc-path kernels (INT, FP4); 2:4 keeps gemv/splitk/
    tile. The M limits are DECODE_MAX_M and DEQUANT_MIN_M unless the device's config table
    names its own ("paths": {"decode_max_m": .., "dequant_min_m": .., and for 2:4, whose
    tile kernel is older, "sparse24_dequant_min_m": ..}, measured by kernels/bench_kernels.py)."""
    limits = config_table(device).get("paths", {}) if device is not None else {}
    dequant_min_m = limits.get("dequant_min_m", DEQUANT_MIN_M)
    if not decode:
        dequant_min_m = limits.get("sparse24_dequant_min_m", dequant_min_m)
    if decode and m <= limits.get("decode_max_m", DECODE_MAX_M):
        return "decode"
    if m >= dequant_min_m:
        return "dequant"
    if decode:
        return "tc"
    if m == 1:
        return "gemv"
    if m <= 16:
        return "splitk"
    return "tile"


def dequant_chunk_rows(n: int, k: int, itemsize: int, device) -> int:
    """Rows of W decoded per chunk on the dequant path (n: the whole weight at once). A multiple
    of 64, so a chunk starts on a word of zero points packed along N (8 INT4 or 4 INT8 a word)."""
    mib = DEQUANT_CHUNK_MIB
    if mib is None:
        mib = config_table(device).get("paths", {}).get("dequant_chunk_mib")
    if not mib:
        return n
    rows = max(64, int(mib * 2 ** 20) // (k * itemsize) // 64 * 64)
    return min(rows, n)


def dequant_linear(x2: torch.Tensor, decode_rows, n: int, k: int,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x2 [M, K] @ W^T (+ bias) -> [M, N], W [N, K] decoded by decode_rows(n0, n1, out): rows
    n0..n1 of W in x2's dtype, written into out ([n1 - n0, K], or allocated where out is None).
    In chunks of dequant_chunk_rows, cuBLAS writes each chunk's columns of y in place (a column
    slice of y is a matrix with a leading dimension of N: no copy)."""
    rows = dequant_chunk_rows(n, k, x2.element_size(), x2.device)
    if rows >= n:
        return torch.nn.functional.linear(x2, decode_rows(0, n, None), bias)
    y = alloc((x2.shape[0], n), x2.dtype, x2.device)
    buf = torch.empty((rows, k), dtype=x2.dtype, device=x2.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = decode_rows(n0, n1, buf[:n1 - n0])
        if bias is None:
            torch.mm(x2, w.T, out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x2, w.T, out=y[:, n0:n1])
    return y


def m_bucket(m: int) -> str:
    return "m" + str(next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1]))


def gpu_config_name(device) -> str:
    """File stem for a GPU: "NVIDIA H200" -> "nvidia_h200"."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


@functools.lru_cache(maxsize=8)
def _load_table(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def config_table(device) -> dict:
    """The config tables for this device: $COMPRESS_KERNEL_CONFIGS, else configs/<gpu>.json,
    else configs/default.json. Layout: {"gpu": ..., "paths": {...}, "decode": {"<family>/
    <bucket>": {"default": {...}, "<N>x<K>": {...}}}, "tc": {same keys}}"""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return _load_table(str(Path(env).resolve()))
    own = CONFIG_DIR / f"{gpu_config_name(device)}.json"
    return _load_table(str(own if own.exists() else CONFIG_DIR / "default.json"))


def kernel_config(table: str, family: str, m: int, n: int, k: int, device) -> Config:
    """Launch config of the decode or tc kernel (table): family (int4, int4-asym, int8, nvfp4,
    mxfp4) and M bucket, the exact shape if tuned, else the bucket default; family int4-asym
    falls back to int4, any family to "*". A table or bucket the device's file lacks (a file
    tuned before that table existed, passed in $COMPRESS_KERNEL_CONFIGS) comes from the shipped
    configs/default.json."""
    bucket = m_bucket(m)
    default = _load_table(str(CONFIG_DIR / "default.json"))
    for tables in (config_table(device), default):
        entries = tables.get(table, {})
        for fam in (family, family.split("-")[0], "*"):
            entry = entries.get(f"{fam}/{bucket}")
            if entry:
                cfg = entry.get(f"{n}x{k}") or entry.get("default")
                if cfg:
                    return Config(**cfg)
    raise ValueError(f"no {table} config for {family}/{bucket} (nor a '*' default)")


def decode_config(family: str, m: int, n: int, k: int, device) -> Config:
    return kernel_config("decode", family, m, n, k, device)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def config_for(path: str, m: int) -> Config:
    cfg = CONFIGS[path]
    if path == "tile":  # do not waste a 64-row tile on 17..32 rows
        return Config(max(16, min(cfg.block_m, next_pow2(m))), cfg.block_n, cfg.block_k,
                      cfg.num_warps, cfg.num_stages)
    return cfg


def split_k_for(path: str, grid_mn: int, k: int, block_k: int, device: torch.device) -> int:
    """Enough K-splits that the launch has about two programs per SM (decode sizes only)."""
    if path not in ("gemv", "splitk"):
        return 1
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 132)
    blocks_k = -(-k // block_k)
    return max(1, min(blocks_k, -(-2 * sms // grid_mn), 16))


def dot_in_f32(dtype: torch.dtype) -> bool:
    """float32 activations use an exact (IEEE) dot. So do bfloat16 ones under TRITON_INTERPRET:
    triton 3.9's interpreter returns garbage for bfloat16 tl.dot (numpy has no bfloat16); the
    compiled GPU kernel uses the bfloat16 tensor-core dot."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and
                                      os.environ.get("TRITON_INTERPRET") == "1")


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def pdl_on(device) -> bool:
    """Launch with programmatic dependent launch (PDL) on this device: on, a CUDA GPU of compute
    capability 9 or more, not the interpreter (which runs no PTX)."""
    device = torch.device(device)
    return (PDL and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and _hopper_or_later(device.index if device.index is not None
                                 else torch.cuda.current_device()))


@functools.cache
def _hopper_or_later(index: int) -> bool:
    # asked once a device: pdl_on runs at every launch of an eager (not graphed) forward
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_args(device) -> dict:
    """Launch arguments of a kernel that calls wait_for_producer(PDL): the constexpr and the
    launch option together, or nothing (the kernel's PDL default, off)."""
    return {"PDL": True, "launch_pdl": True} if pdl_on(device) else {}


@triton.jit
def wait_for_producer(ON: tl.constexpr):
    """With PDL (ON, the launch's launch_pdl): wait until the kernels before this one in the
    stream have finished and their writes are visible, then let the next launch start. A kernel
    launched so reads nothing an earlier kernel wrote, and writes nothing, before this."""
    if ON:
        gdc_wait()
        gdc_launch_dependents()


def check(cond: bool, message: str) -> None:
    """Shape/dtype errors a caller can make: one line, raised before anything is launched."""
    if not cond:
        raise ValueError(message)


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a SiLU-gated MLP from its stacked [..., 2F] gate/up output: what the
    M = 1 kernel's gated epilogue computes (decode._gemv_kernel), for every other path."""
    half = y.shape[-1] // 2
    return torch.nn.functional.silu(y[..., :half]) * y[..., half:]


def activation_2d(x: torch.Tensor, k: int) -> torch.Tensor:
    check(x.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    check(x.shape[-1] == k, f"activations have {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def split_of(k: int, cfg: Config) -> tuple[int, int]:
    """(split, K per split): cfg.split_k K-slices of whole blocks (fewer where K is short)."""
    split = max(1, min(cfg.split_k, -(-k // cfg.block_k)))
    k_per_split = -(-k // (split * cfg.block_k)) * cfg.block_k
    return -(-k // k_per_split), k_per_split


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def tile_counters(tiles: int, device) -> torch.Tensor:
    """int32 [>= tiles] zeros kept per device for finish_split: each launch leaves them zero
    again (the last program of a tile resets its counter), so no launch has to clear them.
    Launches that share them must be stream-ordered (one stream, or a CUDA graph). Outgrown
    buffers stay allocated: a CUDA graph captured with one keeps its address, and replays."""
    device = torch.device(device)
    held = _COUNTERS.setdefault(device, [])
    if not held or held[-1].numel() < tiles:
        size = max(tiles, 2 * held[-1].numel() if held else 4096)
        held.append(torch.zeros(size, dtype=torch.int32, device=device))
    return held[-1]


def split_buffers(split: int, size: int, tiles: int,
                  out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, counters) of a launch in `split` K-slices writing `out` (finish_split /
    split_total): float32 [split * size] for the slices' partials (torch.empty: from the caching
    allocator, no kernel) and tile_counters(tiles). One launch: no zero fill, no reduction, no
    cast. With one slice the kernel reads neither: `out` stands in for both (no allocation on
    the M = 1 path, one a linear)."""
    if split == 1:
        return out, out
    return (torch.empty(split * size, dtype=torch.float32, device=out.device),
            tile_counters(tiles, out.device))


def launch_plan(path: str, m: int, n: int, k: int, split_k: int | None,
                device) -> tuple[Config, tuple[int, int, int], int]:
    """Tiles, grid (m tiles, n tiles, K-slices) and K per slice of a 2:4 tile-kernel launch."""
    cfg = config_for(path, m)
    grid_m, grid_n = -(-m // cfg.block_m), -(-n // cfg.block_n)
    split = split_k or split_k_for(path, grid_m * grid_n, k, cfg.block_k, device)
    k_per_split = -(-k // (split * cfg.block_k)) * cfg.block_k
    return cfg, (grid_m, grid_n, -(-k // k_per_split)), k_per_split


@triton.jit
def apply_int_scale(q, s_ptr, z_ptr, rn, grp, inside, G, BITS: tl.constexpr,
                    PER: tl.constexpr, HAS_ZERO: tl.constexpr):
    """(q - zero) * scale for decoded INT codes q [BN, BK]; zero points packed PER to an int32
    along the output axis (compressed-tensors' layout)."""
    s = tl.load(s_ptr + rn[:, None] * G + grp[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zw = tl.load(z_ptr + (rn[:, None] // PER) * G + grp[None, :], mask=inside, other=0)
        z = ((zw >> ((rn[:, None] % PER) * BITS)) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
        q = q - z.to(tl.float32)
    return q * s


# ---------------------------------------------------------------------------------------------
# The matmul main loop's shared steps (every weight format decodes its own tile, then these).

@triton.jit
def mac_tile(acc, x_ptr, w, rm, rk, M, K, stride_xm, USE_DOT: tl.constexpr,
             IEEE: tl.constexpr):
    """acc[BM, BN] += x[rm, rk] @ w[BN, BK]^T, w already decoded to float32."""
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
    if USE_DOT:
        if IEEE:  # float32 activations: no silent TF32 rounding (see dot_in_f32)
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    else:  # a few rows: CUDA cores, no padding to 16 rows
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def finish_tile(acc, b_ptr, out_ptr, rm, rn, m_in, n_in, N, HAS_BIAS: tl.constexpr):
    """Add the bias and store the [BM, BN] tile in out_ptr's dtype (one K-slice)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_in[:, None] & n_in[None, :])


@triton.jit
def last_to_arrive(cnt_ptr, tile, programs):
    """Is this program the last of `programs` sharing the counter at cnt_ptr + tile to get here?
    A CTA barrier first (every thread's writes before this are issued), then an acq_rel add at
    GPU scope (as CUTLASS's serial split-K semaphore): the last one then sees what the others
    wrote before arriving. The caller resets the counter (tile_counters: launches leave them 0)."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu") == programs - 1


@triton.jit
def split_total(part, ws_ptr, cnt_ptr, offs, mask, tile, pid_k, splits, stride_split):
    """Split-K in one launch, the sum: this K-slice's float32 partial `part` goes to the
    workspace at ws_ptr + pid_k * stride_split + offs; the last of the tile's `splits` programs
    to arrive (a counter per tile, acq_rel at GPU scope after a CTA barrier, as CUTLASS's
    serial split-K semaphore) gets (True, the sum of every slice's partial, read from L2:
    .cg), the others (False, part). The last one also resets the counter (tile_counters), so
    no launch clears them. No spin-wait: no program waits for another, so any number of
    programs may be resident. The sum runs over the slices in order, its own partial read back
    too: the result does not depend on which slice finished last (atomic adds into the output
    did), so a split-K launch is deterministic."""
    tl.store(ws_ptr + pid_k * stride_split + offs, part, mask=mask)
    last = last_to_arrive(cnt_ptr, tile, splits)
    total = part
    if last:
        total = tl.zeros_like(part)
        for s in range(0, splits):
            total += tl.load(ws_ptr + s * stride_split + offs, mask=mask, other=0.0,
                             cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return last, total


@triton.jit
def row_split_total(y, ws_ptr, cnt_ptr, pid_n, pid_k, row, BLOCK_N: tl.constexpr):
    """split_total for the M = 1 kernels' grid (N tiles, K-slices, activation rows) and a
    program's BLOCK_N sums y; workspace [S, rows, N tiles * BLOCK_N]."""
    grid_n = tl.num_programs(0)
    tile = row * grid_n + pid_n
    offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    return split_total(y, ws_ptr, cnt_ptr, offs, offs >= 0, tile, pid_k, tl.num_programs(1),
                       tl.num_programs(2) * grid_n * BLOCK_N)


@triton.jit
def finish_split(acc, b_ptr, out_ptr, ws_ptr, cnt_ptr, rm, rn, m_in, n_in, M, N, pid_k,
                 HAS_BIAS: tl.constexpr):
    """finish_tile for a launch on grid (M tiles, N tiles, K-slices): the last K-slice of each
    tile to finish (split_total) adds the bias and stores the sum; workspace [S, M, N]."""
    mask = m_in[:, None] & n_in[None, :]
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    last, total = split_total(acc, ws_ptr, cnt_ptr, rm[:, None] * N + rn[None, :], mask, tile,
                              pid_k, tl.num_programs(2), M * N)
    if last:
        finish_tile(total, b_ptr, out_ptr, rm, rn, m_in, n_in, N, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# FP4 scale encodings (read by the FP4, 2:4 and decode kernels)

@triton.jit
def e4m3_to_f32(b):
    """float8_e4m3fn bits (int32) -> float32, exactly, in 4 integer ops and one multiply: the
    exponent and mantissa bits moved under float32's (e at bits 23-26, m at 20-22) read
    2^(e-127) (1 + m/8), or for e = 0 the float32 denormal m * 2^-129; both are the value
    times 2^-120, and the multiply by 2^120 is exact (Triton keeps denormals: no .ftz). NaN
    encodings are not produced by quantizers and not handled."""
    bits = ((b & 0x7F) << 20) | ((b & 0x80) << 24)
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36   # 2^120


@triton.jit
def e8m0_to_f32(b):
    """E8M0 exponent bits (int32) -> 2^(b - 127) as float32 (b = 0 gives 2^-127)."""
    return tl.where(b == 0, 5.877471754111438e-39, (b << 23).to(tl.float32, bitcast=True))
