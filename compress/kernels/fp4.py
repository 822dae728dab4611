"""FP4 weights (NVFP4, MXFP4) times 16/32-bit activations, E2M1 decoded by a 16-entry lookup.

Reads the compressed-tensors tensors as stored (nvfp4-pack-quantized / mxfp4-pack-quantized):
    weight_packed        uint8 [N, K/2]   element 2j in the low nibble, 2j+1 in the high nibble;
                                          code = sign << 3 | index into [0, .5, 1, 1.5, 2, 3, 4, 6]
    NVFP4: weight_scale  float8_e4m3fn [N, K/16], weight_global_scale float32 [1]
           w = e2m1 * (scale / global_scale)          (compressed-tensors' _dequantize order)
    MXFP4: weight_scale  uint8 E8M0 [N, K/32]: w = e2m1 * 2^(scale - 127)
Scales are decoded from their bits in the kernel (no float8 loads), so no repack is needed.
Same paths by M as the integer kernel (compress/kernels/_common.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats import FORMATS as FORMAT_TABLE
from compress.kernels import _common as C
from compress.kernels._common import mac_tile, store_tile
from compress.kernels.decode import FMT_MXFP4, FMT_NVFP4, words_matmul

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_LUTS: dict[torch.device, torch.Tensor] = {}


def e2m1_table(device) -> torch.Tensor:
    """float32 [16]: code -> value, sign in bit 3 (one copy per device)."""
    device = torch.device(device)
    if device not in _LUTS:
        mags = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        _LUTS[device] = torch.cat([mags, -mags]).to(device)
    return _LUTS[device]


@triton.jit
def _unpack_nibbles(bytes_, ROWS: tl.constexpr, COLS: tl.constexpr):
    """uint8 [ROWS, COLS // 2] -> int32 codes [ROWS, COLS]; element 2j is the low nibble."""
    shifts = tl.arange(0, 2) * 4
    vals = (bytes_.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 0xF
    return tl.reshape(vals, (ROWS, COLS))


@triton.jit
def _fp4_tile(w_ptr, s_ptr, lut_ptr, gscale, rn, k0, N, K, G, GROUP, MX: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decoded weights [BLOCK_N, BLOCK_K] float32 (0 outside N x K); k0 is even."""
    rk = k0 + tl.arange(0, BLOCK_K)
    rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    bytes_ = tl.load(w_ptr + rn[:, None] * (K // 2) + rb[None, :],
                     mask=(rn[:, None] < N) & (rb[None, :] < K // 2), other=0)
    values = tl.load(lut_ptr + _unpack_nibbles(bytes_, BLOCK_N, BLOCK_K))
    inside = (rn[:, None] < N) & (rk[None, :] < K)
    sbits = tl.load(s_ptr + rn[:, None] * G + (rk // GROUP)[None, :], mask=inside, other=0)
    if MX:
        s = C.e8m0_to_f32(sbits.to(tl.int32))
    else:
        s = C.e4m3_to_f32(sbits.to(tl.int32)) / gscale
    return tl.where(inside, values * s, 0.0)


@triton.jit
def _fp4_matmul_kernel(x_ptr, w_ptr, s_ptr, lut_ptr, gs_ptr, b_ptr, out_ptr,
                       M, N, K, G, GROUP, stride_xm, stride_split, K_PER_SPLIT,
                       MX: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gscale = 1.0
    if not MX:
        gscale = tl.load(gs_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + kk
        rk = k0 + tl.arange(0, BLOCK_K)
        w = _fp4_tile(w_ptr, s_ptr, lut_ptr, gscale, rn, k0, N, K, G, GROUP, MX,
                      BLOCK_N, BLOCK_K)
        acc = mac_tile(acc, x_ptr, w, rm, rk, M, K, stride_xm, USE_DOT, IEEE)
    store_tile(acc, b_ptr, out_ptr, rm, rn, M, N, pid_k, stride_split, HAS_BIAS)


@triton.jit
def _fp4_dequant_kernel(w_ptr, s_ptr, lut_ptr, gs_ptr, out_ptr, N, K, G, GROUP,
                        MX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    gscale = 1.0
    if not MX:
        gscale = tl.load(gs_ptr).to(tl.float32)
    w = _fp4_tile(w_ptr, s_ptr, lut_ptr, gscale, rn, k0, N, K, G, GROUP, MX, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rk[None, :] < K))


# ---------------------------------------------------------------------------------------------
# Host wrapper

# format -> group size, from the one format table
FORMATS = {name: row.group_size for name, row in FORMAT_TABLE.items() if row.kernel == "fp4"}


def _check_fp4(fmt, packed, scale, global_scale, n, k):
    C.check(fmt in FORMATS, f"unknown FP4 format {fmt!r}; use {' or '.join(FORMATS)}")
    group = FORMATS[fmt]
    C.check(k % group == 0, f"{fmt} needs in_features divisible by {group}, got {k}")
    C.check(packed.dtype == torch.uint8 and packed.shape == (n, k // 2),
            f"weight_packed must be uint8 [{n}, {k // 2}], got {packed.dtype} {list(packed.shape)}")
    want = FORMAT_TABLE[fmt].stored_scale_dtype(torch.float32)
    C.check(scale.dtype == want and scale.shape == (n, k // group),
            f"{fmt} weight_scale must be {want} [{n}, {k // group}], got {scale.dtype} "
            f"{list(scale.shape)}")
    if FORMAT_TABLE[fmt].tensor_scale:
        C.check(global_scale is not None and global_scale.numel() == 1,
                "nvfp4 needs weight_global_scale (float32 [1])")
    C.check(packed.is_contiguous() and scale.is_contiguous(), "FP4 tensors must be contiguous")


def fp4_matmul(x: torch.Tensor, fmt: str, packed: torch.Tensor, scale: torch.Tensor,
               global_scale: torch.Tensor | None, shape: tuple[int, int],
               bias: torch.Tensor | None = None, path: str | None = None,
               split_k: int | None = None, config: C.Config | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(W [N, K])^T + bias -> [..., N] in x.dtype (path/split_k/config:
    overrides, as int_matmul)."""
    n, k = shape
    _check_fp4(fmt, packed, scale, global_scale, n, k)
    x2 = C.activation_2d(x, k)
    m = x2.shape[0]
    path = path or C.choose_path(m, decode=True, device=x.device)
    if path == "decode":  # uint8 [N, K/2] read as int32 [N, K/8]: nibble j of word i = 8i + j
        cfg = config or C.decode_config(fmt, m, n, k, x.device)
        y = words_matmul(x2, FMT_NVFP4 if fmt == "nvfp4" else FMT_MXFP4,
                         (packed if packed.storage_offset() % 4 == 0 else packed.clone())
                         .view(torch.int32), scale.view(torch.uint8), None,
                         global_scale, n, k, 4, FORMATS[fmt], bias, cfg, x.dtype)
        return y.reshape(*x.shape[:-1], n)
    if path == "dequant":
        w = fp4_dequantize(fmt, packed, scale, global_scale, shape, x.dtype)
        return torch.nn.functional.linear(x2, w, bias).reshape(*x.shape[:-1], n)
    cfg, grid, k_per_split, out = C.launch_plan(path, m, n, k, split_k, x.dtype, x.device)
    split = grid[2]
    gs = global_scale.float() if global_scale is not None else scale  # unused for MXFP4
    _fp4_matmul_kernel[grid](
        x2, packed, scale.view(torch.uint8), e2m1_table(x.device), gs,
        bias if bias is not None else x2, out,
        m, n, k, scale.shape[1], FORMATS[fmt], x2.stride(0), m * n, k_per_split,
        MX=fmt == "mxfp4", HAS_BIAS=bias is not None, USE_DOT=path != "gemv",
        IEEE=C.dot_in_f32(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    y = C.split_sum(out, x.dtype) if split > 1 else out
    return y.reshape(*x.shape[:-1], n)


def fp4_dequantize(fmt: str, packed: torch.Tensor, scale: torch.Tensor,
                   global_scale: torch.Tensor | None, shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """The whole weight decoded to dtype, [N, K]."""
    n, k = shape
    _check_fp4(fmt, packed, scale, global_scale, n, k)
    cfg = C.CONFIGS["dequant"]
    out = C.alloc((n, k), dtype, packed.device)
    gs = global_scale.float() if global_scale is not None else scale
    _fp4_dequant_kernel[(-(-n // cfg.block_n), -(-k // cfg.block_k))](
        packed, scale.view(torch.uint8), e2m1_table(packed.device), gs, out,
        n, k, scale.shape[1], FORMATS[fmt], MX=fmt == "mxfp4",
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    return out


# ---------------------------------------------------------------------------------------------
# Reference

def unpack_fp4_ref(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int64 codes [N, K] (low nibble first)."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).to(torch.int64)
    return codes.reshape(packed.shape[0], -1)


def fp4_scale_ref(fmt: str, scale: torch.Tensor, global_scale: torch.Tensor | None):
    """Group scales as float32 [N, K/group]."""
    if fmt == "mxfp4":
        return torch.exp2(scale.to(torch.float32) - 127)
    return scale.to(torch.float32) / global_scale.float()


def fp4_dequantize_ref(fmt: str, packed, scale, global_scale, shape) -> torch.Tensor:
    """float32 [N, K]."""
    values = e2m1_table(packed.device)[unpack_fp4_ref(packed)]
    group = FORMATS[fmt]
    return values * fp4_scale_ref(fmt, scale, global_scale).repeat_interleave(group, dim=1)


def fp4_matmul_ref(x, fmt, packed, scale, global_scale, shape, bias=None) -> torch.Tensor:
    w = fp4_dequantize_ref(fmt, packed, scale, global_scale, shape)
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)
