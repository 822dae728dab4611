"""Group-wise integer weights (INT4, INT8), symmetric or with zero points.

Conventions follow compressed-tensors so that its loaders read what we write:
codes are signed ints in [-2^(b-1), 2^(b-1)-1]; w ≈ (code - zero) * scale;
symmetric: scale = absmax / ((qmax - qmin) / 2), zero = 0;
asymmetric: scale = (max - min) / (qmax - qmin), zero = qmin - round(min / scale).
The range always includes 0 so that zero weights stay exactly zero.
"""

from __future__ import annotations

import sys

import torch

from compress.formats import CODECS, QuantizedWeight, WeightFormat, grouped


def int_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def group_params(w: torch.Tensor, fmt: WeightFormat, global_scale=None):
    """Scale and zero for groups along the last axis. w: [..., g] -> scale, zero: [..., 1]."""
    qmin, qmax = int_range(fmt.bits)
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0).float()
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0).float()
    if fmt.symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zero = None
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group
    if not fmt.symmetric:
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int8)
    return scale, zero


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: WeightFormat):
    """Round w to codes on the grid given by scale/zero (broadcast). Returns int8."""
    qmin, qmax = int_range(fmt.bits)
    q = torch.round(w.float() / scale)
    if zero is not None:
        q = q + zero.float()
    return q.clamp(qmin, qmax).to(torch.int8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    q = codes.float()
    if zero is not None:
        q = q - zero.float()
    return q * scale.float()


def quantize(w: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Round-to-nearest. w: [O, I] -> codes [O, I], scale/zero [O, I/g]."""
    g = fmt.group_for(w.shape[1])
    wg = grouped(w.float(), g)
    scale, zero = group_params(wg, fmt)
    codes = encode(wg, scale, zero, fmt).reshape(w.shape)
    return QuantizedWeight(fmt, codes, scale.squeeze(-1),
                           None if zero is None else zero.squeeze(-1))


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    g = q.fmt.group_for(q.shape[1])
    zero = None if q.zero is None else q.zero.unsqueeze(-1)
    return decode(grouped(q.codes, g), q.scale.float().unsqueeze(-1), zero).reshape(q.shape)


def pack(q: QuantizedWeight, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """compressed-tensors "pack-quantized": codes packed 32/b per int32 along the input axis,
    zero points packed along the output axis."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {"weight_packed": pack_to_int32(q.codes, q.fmt.bits),
           "weight_scale": q.scale.to(scale_dtype).contiguous(),
           "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
    if q.zero is not None:
        out["weight_zero_point"] = pack_to_int32(q.zero, q.fmt.bits, packed_dim=0)
    return out


def unpack_int32(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of compressed-tensors' pack_to_int32 along the last axis, for bits in {4, 8}
    (32/bits values a word, element j at bit j*bits, stored with offset 2^(bits-1)).
    Written with shifts because the library's general unpack is slow on every forward."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)[..., :length]
    return (values - (1 << (bits - 1))).to(torch.int8)


def unpack(tensors: dict[str, torch.Tensor], fmt: WeightFormat) -> QuantizedWeight:
    out_features, in_features = tensors["weight_shape"].tolist()
    codes = unpack_int32(tensors["weight_packed"], fmt.bits, in_features)
    scale = tensors["weight_scale"]
    zero = None
    if "weight_zero_point" in tensors:
        zero = unpack_int32(tensors["weight_zero_point"].T, fmt.bits, out_features).T
    return QuantizedWeight(fmt, codes, scale, zero)


def scheme_args(fmt: WeightFormat) -> dict:
    """The compressed-tensors QuantizationArgs for `fmt`, as a dict."""
    return {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
            "strategy": "group" if fmt.group_size else "channel",
            "group_size": fmt.group_size, "dynamic": False, "observer": "minmax"}


FORMAT_NAME = "pack-quantized"

CODECS["int"] = sys.modules[__name__]
