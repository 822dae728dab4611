"""FP4 (E2M1) weights: NVFP4 and MXFP4, stored as compressed-tensors writes them.

E2M1 code = sign << 3 | index into E2M1 = [0, .5, 1, 1.5, 2, 3, 4, 6]; two codes a byte, element
2j in the low nibble and 2j+1 in the high nibble ("nvfp4-pack-quantized" / "mxfp4-pack-quantized").

NVFP4: groups of 16, one FP32 global scale per tensor, FP8-E4M3 group scales:
    global = 448 * 6 / absmax(W);  scale = fp8(global * absmax(group) / 6)
    w = e2m1 * (scale / global)
MXFP4: groups of 32, E8M0 power-of-two group scales (uint8 exponent e, scale = 2^(e - 127)):
    e = 127 + floor(log2(round_pow2(absmax(group)))) - 2;  w = e2m1 * 2^(e - 127)

Every formula, rounding and tie rule follows compressed_tensors (calculate_qparams,
generate_gparam, generate_mx_scales, cast_to_fp4, pack_fp4_to_uint8) so that the codes and
scales are bit-identical to the library's (tests/test_fp4.py checks it). It is written here
rather than called because the library's CPU path rounds through masked assignments per value
(slow inside GPTQ's column loop) and has no function that returns the codes themselves.
"""

from __future__ import annotations

import torch

from compress.formats import CODECS, QuantizedWeight, WeightFormat, grouped

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4_MAX = 6.0
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Midpoints between neighbouring E2M1 magnitudes; ties go to the even mantissa as in
# compressed_tensors.cast_to_fp4: > for 0.25, 1.25, 2.5, 5 and >= for 0.75, 1.75, 3.5.
_UP_STRICT = (0.25, 1.25, 2.5, 5.0)
_UP_EQUAL = (0.75, 1.75, 3.5)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8 in [0, 15]) of values already divided by their scale.
    Values beyond +-6 saturate; negatives that round to zero keep the sign bit, like the library."""
    a = x.float().abs().clamp(max=FP4_MAX)
    index = sum((a > t).to(torch.uint8) for t in _UP_STRICT)
    index = index + sum((a >= t).to(torch.uint8) for t in _UP_EQUAL)
    return index | ((x < 0).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes."""
    codes = codes.to(torch.int64)
    magnitude = E2M1.to(codes.device)[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def global_scale(w: torch.Tensor) -> torch.Tensor:
    """NVFP4 per-tensor scale (compressed_tensors.generate_gparam): float32 [1]."""
    absmax = w.float().abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    gs = FP8_MAX * FP4_MAX / absmax
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def _round_pow2(x: torch.Tensor) -> torch.Tensor:
    """compressed_tensors.round_to_power_2 for float32 and E2M1's 1-bit mantissa: keep the
    exponent, rounding up when the mantissa is >= 0.75."""
    bits = x.float().view(torch.int32)
    return ((bits + (1 << 21)) & ~((1 << 23) - 1)).view(torch.float32)


def group_params(w: torch.Tensor, fmt: WeightFormat, global_scale: torch.Tensor | None = None):
    """Scale for groups along the last axis. w: [..., g] -> (scale [..., 1] float32, None).
    NVFP4 scales are FP8-representable values (global scale included, as the library stores
    them); MXFP4 scales are powers of two."""
    absmax = w.float().abs().amax(dim=-1, keepdim=True)
    if fmt.type == "nvfp4":
        if global_scale is None:
            raise ValueError("NVFP4 group scales need the tensor's global scale")
        scale = global_scale.float() * (absmax / FP4_MAX)
        scale = scale.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        return torch.where(scale == 0, torch.full_like(scale, 0.125), scale), None
    exponent = 127 + torch.floor(torch.log2(_round_pow2(absmax))) - 2
    exponent = torch.round(exponent.clamp(0, 255))
    return 2.00 ** (exponent - 127), None


def _effective(scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    return scale.float() if global_scale is None else scale.float() / global_scale.float()


def encode(w: torch.Tensor, scale: torch.Tensor, zero=None, fmt: WeightFormat | None = None,
           global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """E2M1 codes (int8) of w on the grid given by scale (broadcast) and the global scale."""
    return e2m1_codes(w.float() / _effective(scale, global_scale)).to(torch.int8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero=None,
           global_scale: torch.Tensor | None = None) -> torch.Tensor:
    return e2m1_values(codes) * _effective(scale, global_scale)


def quantize(w: torch.Tensor, fmt: WeightFormat,
             global_scale_: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest. w: [O, I] -> codes [O, I], scale [O, I/g] (+ global scale for NVFP4)."""
    gs = (global_scale_ if global_scale_ is not None else global_scale(w)) \
        if fmt.type == "nvfp4" else None
    wg = grouped(w.float(), fmt.group_size)
    scale, _ = group_params(wg, fmt, gs)
    codes = encode(wg, scale, None, fmt, gs).reshape(w.shape)
    return QuantizedWeight(fmt, codes, scale.squeeze(-1), None, gs)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    scale = q.scale.float().unsqueeze(-1)
    return decode(grouped(q.codes, q.fmt.group_size), scale, None, q.global_scale).reshape(q.shape)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """[O, I] codes -> uint8 [O, I/2]: element 2j in the low nibble, 2j+1 in the high nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [O, I/2] -> int8 codes [O, I]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(
        packed.shape[0], -1).to(torch.int8)


def pack(q: QuantizedWeight, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors; scale_dtype is ignored (FP4 formats fix their scale dtype)."""
    out = {"weight_packed": pack_codes(q.codes)}
    if q.fmt.type == "nvfp4":
        out["weight_scale"] = q.scale.float().to(torch.float8_e4m3fn).contiguous()
        out["weight_global_scale"] = q.global_scale.float().reshape(1).contiguous()
    else:  # compressed_tensors.compress_mx_scale
        out["weight_scale"] = (127 + torch.floor(torch.log2(q.scale.float()))).to(
            torch.int32).to(torch.uint8).contiguous()
    return out


def unpack(tensors: dict[str, torch.Tensor], fmt: WeightFormat) -> QuantizedWeight:
    codes = unpack_codes(tensors["weight_packed"])
    if fmt.type == "nvfp4":
        return QuantizedWeight(fmt, codes, tensors["weight_scale"].float(), None,
                               tensors["weight_global_scale"].float())
    scale = 2.0 ** (tensors["weight_scale"].to(torch.float32) - 127)
    return QuantizedWeight(fmt, codes, scale)


def scheme_args(fmt: WeightFormat) -> dict:
    """The weights' QuantizationArgs of compressed-tensors' NVFP4A16 / MXFP4A16 presets."""
    from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16

    preset = NVFP4A16 if fmt.type == "nvfp4" else MXFP4A16
    return preset["weights"].model_dump(mode="json")


class _Fp4Codec:
    """The codec interface of compress.formats for one FP4 format (same functions as intq)."""

    def __init__(self, format_name: str):
        self.FORMAT_NAME = format_name

    quantize = staticmethod(quantize)
    dequantize = staticmethod(dequantize)
    pack = staticmethod(pack)
    unpack = staticmethod(unpack)
    group_params = staticmethod(group_params)
    encode = staticmethod(encode)
    decode = staticmethod(decode)
    scheme_args = staticmethod(scheme_args)
    global_scale = staticmethod(global_scale)


CODECS["nvfp4"] = _Fp4Codec("nvfp4-pack-quantized")
CODECS["mxfp4"] = _Fp4Codec("mxfp4-pack-quantized")
