"""Group-wise integer weights (INT4, INT8), symmetric or with zero points.

Conventions follow compressed-tensors so that its loaders read what we write:
codes are signed ints in [-2^(b-1), 2^(b-1)-1]; w ≈ (code - zero) * scale;
symmetric: scale = absmax / ((qmax - qmin) / 2), zero = 0;
asymmetric: scale = (max - min) / (qmax - qmin), zero = qmin - round(min / scale).
The range always includes 0 so that zero weights stay exactly zero.
"""

from __future__ import annotations

import torch

from compress.formats import Codec, GroupParams, QuantizedWeight, WeightFormat, register_codec


def int_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def group_params(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int):
    """Round w to codes on the grid given by scale/zero (broadcast). Returns int8."""
    qmin, qmax = int_range(bits)
    q = torch.round(w.float() / scale)
    if zero is not None:
        q = q + zero.float()
    return q.clamp(qmin, qmax).to(torch.int8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    q = codes.float()
    if zero is not None:
        q = q - zero.float()
    return q * scale.float()


def pack_int(q: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors "pack-quantized": codes packed 32/b per int32 along the input axis,
    zero points packed along the output axis."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {"weight_packed": pack_to_int32(q.codes, q.fmt.bits),
           "weight_scale": q.scale.to(scale_dtype).contiguous(),
           "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
    if q.zero is not None:
        # compressed-tensors 0.19 returns a transposed view for packed_dim=0 (0.20 copies):
        # kernels read raw memory, and safetensors refuses views
        out["weight_zero_point"] = pack_to_int32(q.zero, q.fmt.bits, packed_dim=0).contiguous()
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


def unpack_int(tensors: dict[str, torch.Tensor], fmt: WeightFormat) -> QuantizedWeight:
    out_features, in_features = tensors["weight_shape"].tolist()
    codes = unpack_int32(tensors["weight_packed"], fmt.bits, in_features)
    scale = tensors["weight_scale"]
    zero = None
    if "weight_zero_point" in tensors:
        zero = unpack_int32(tensors["weight_zero_point"].T, fmt.bits, out_features).T
    return QuantizedWeight(fmt, codes, scale, zero)


class IntCodec(Codec):
    """Group-wise INT4 / INT8, symmetric or with zero points ("pack-quantized")."""

    name = "int"

    def group_params(self, w, fmt, tensor_scale=None) -> GroupParams:
        return GroupParams(fmt, *group_params(w, fmt))

    def encode(self, w, p: GroupParams) -> torch.Tensor:
        return encode(w, p.scale, p.zero, p.fmt.bits)

    def decode(self, codes, p: GroupParams) -> torch.Tensor:
        return decode(codes, p.scale, p.zero)

    def fake_quantize(self, w, p: GroupParams) -> torch.Tensor:
        # decode(encode(w)) in place on one float32 buffer: the codes are small integers, exact
        # in float32, so skipping the int8 round trip changes no value (the MSE scale search
        # calls this 21 times per matrix)
        qmin, qmax = int_range(p.fmt.bits)
        q = torch.div(w.float(), p.scale).round_()
        if p.zero is None:
            return q.clamp_(qmin, qmax).mul_(p.scale.float())
        zero = p.zero.float()
        return q.add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(p.scale.float())

    def pack(self, q, scale_dtype=torch.float32):
        return pack_int(q, scale_dtype)

    def unpack(self, tensors, fmt):
        return unpack_int(tensors, fmt)

    def scheme_args(self, fmt: WeightFormat) -> dict:
        return {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
                "strategy": "group" if fmt.group_size else "channel",
                "group_size": fmt.group_size, "dynamic": False, "observer": "minmax"}


register_codec(IntCodec())
