"""FP4 weights (NVFP4, MXFP4) times 16/32-bit activations, E2M1 decoded by a 16-entry lookup.

Reads the compressed-tensors tensors as stored (nvfp4-pack-quantized / mxfp4-pack-quantized):
    weight_packed        uint8 [N, K/2]   element 2j in the low nibble, 2j+1 in the high nibble;
                                          code = sign << 3 | index into [0, .5, 1, 1.5, 2, 3, 4, 6]
    NVFP4: weight_scale  float8_e4m3fn [N, K/16], weight_global_scale float32 [1]
           w = e2m1 * (scale / global_scale)          (compressed-tensors' _dequantize order)
    MXFP4: weight_scale  uint8 E8M0 [N, K/32]: w = e2m1 * 2^(scale - 127)
Scales are decoded from their bits in the kernel (no float8 loads), so no repack is needed.
Same paths by M and the same kernels as the integer formats (decode.py, tc.py; the uint8 bytes
are read as int32 words of 8 codes), see compress/kernels/_common.py.
"""

from __future__ import annotations

import dataclasses

import torch

from compress.formats import FORMATS as FORMAT_TABLE
from compress.kernels import _common as C
from compress.kernels.decode import FMT_MXFP4, FMT_NVFP4, words_matmul
from compress.kernels.tc import tc_dequantize, tc_matmul

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_LUTS: dict[torch.device, torch.Tensor] = {}


def e2m1_table(device) -> torch.Tensor:
    """float32 [16]: code -> value, sign in bit 3 (one copy per device)."""
    device = torch.device(device)
    if device not in _LUTS:
        mags = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        _LUTS[device] = torch.cat([mags, -mags]).to(device)
    return _LUTS[device]


# ---------------------------------------------------------------------------------------------
# Host wrapper

# format -> group size, from the one format table
FORMATS = {name: row.group_size for name, row in FORMAT_TABLE.items() if row.kernel == "fp4"}
_FMT = {"nvfp4": FMT_NVFP4, "mxfp4": FMT_MXFP4}


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
               split_k: int | None = None, config: C.Config | None = None,
               gated: bool = False) -> torch.Tensor:
    """x [..., K] @ dequant(W [N, K])^T + bias -> [..., N] in x.dtype (path/split_k/config/
    gated: as int_matmul)."""
    n, k = shape
    _check_fp4(fmt, packed, scale, global_scale, n, k)
    x2 = C.activation_2d(x, k)
    m = x2.shape[0]
    path = path or C.choose_path(m, decode=True, device=x.device)
    C.check(path in ("decode", "tc", "dequant"), f"no {path!r} path for FP4 weights")
    cfg = config or (C.kernel_config(path, fmt, m, n, k, x.device) if path != "dequant"
                     else None)
    if gated and (path != "decode" or cfg.block_m > 1):
        return C.silu_mul(fp4_matmul(x, fmt, packed, scale, global_scale, shape, bias, path,
                                     split_k, cfg))
    if path == "dequant":
        words, scale_bytes = _words(packed), scale.view(torch.uint8)

        def decode_rows(n0, n1, out):
            return tc_dequantize(_FMT[fmt], words[n0:n1], scale_bytes[n0:n1], None,
                                 global_scale, n1 - n0, k, 4, FORMATS[fmt], x.dtype, out)

        return C.dequant_linear(x2, decode_rows, n, k, bias).reshape(*x.shape[:-1], n)
    if split_k is not None:
        cfg = dataclasses.replace(cfg, split_k=split_k)
    args = (x2, _FMT[fmt], _words(packed), scale.view(torch.uint8), None, global_scale, n, k, 4,
            FORMATS[fmt], bias, cfg, x.dtype)
    y = words_matmul(*args, gated=gated) if path == "decode" else tc_matmul(*args)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] read as int32 [N, K/8]: little-endian, so nibble j of word i is element
    8 i + j, as in the INT4 words (a copy only if the bytes do not start 4-aligned)."""
    return (packed if packed.storage_offset() % 4 == 0 else packed.clone()).view(torch.int32)


def fp4_dequantize(fmt: str, packed: torch.Tensor, scale: torch.Tensor,
                   global_scale: torch.Tensor | None, shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """The whole weight decoded to dtype, [N, K]."""
    n, k = shape
    _check_fp4(fmt, packed, scale, global_scale, n, k)
    return tc_dequantize(_FMT[fmt], _words(packed), scale.view(torch.uint8), None,
                         global_scale, n, k, 4, FORMATS[fmt], dtype)


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
