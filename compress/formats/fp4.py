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

from compress.formats import Codec, GroupParams, QuantizedWeight, WeightFormat, register_codec

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
    # Computed, not looked up in E2M1: copying the table to the GPU inside GPTQ's captured
    # column loop made NVFP4/MXFP4 capture fail (a host-to-device copy), i.e. run eagerly.
    codes = codes.to(torch.int32)
    e, m = ((codes >> 1) & 3).float(), (codes & 1).float()
    magnitude = torch.where(e == 0, 0.5 * m, torch.exp2(e - 1) * (1 + 0.5 * m))
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


def nvfp4_scales(absmax: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 group scales: FP8-representable values (global scale included, as the library
    stores them); an all-zero group gets 0.125."""
    scale = tensor_scale.float() * (absmax / FP4_MAX)
    scale = scale.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return torch.where(scale == 0, torch.full_like(scale, 0.125), scale)


def mxfp4_scales(absmax: torch.Tensor) -> torch.Tensor:
    """MXFP4 group scales: powers of two 2^(e - 127), e an E8M0 exponent in [0, 255]."""
    exponent = 127 + torch.floor(torch.log2(_round_pow2(absmax))) - 2
    exponent = torch.round(exponent.clamp(0, 255))
    return 2.00 ** (exponent - 127)


def _effective(p: GroupParams) -> torch.Tensor:
    """The real step of each group: scale / global scale (NVFP4) or scale."""
    return p.scale.float() if p.tensor_scale is None else \
        p.scale.float() / p.tensor_scale.float()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """[O, I] codes -> uint8 [O, I/2]: element 2j in the low nibble, 2j+1 in the high nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [O, I/2] -> int8 codes [O, I]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(
        packed.shape[0], -1).to(torch.int8)


class Fp4Codec(Codec):
    """E2M1 codes, two a byte; the group scales are what differs between NVFP4 and MXFP4."""

    def encode(self, w, p: GroupParams) -> torch.Tensor:
        return e2m1_codes(w.float() / _effective(p)).to(torch.int8)

    def decode(self, codes, p: GroupParams) -> torch.Tensor:
        return e2m1_values(codes) * _effective(p)

    def scheme_args(self, fmt: WeightFormat) -> dict:
        """The weights' QuantizationArgs of compressed-tensors' NVFP4A16 / MXFP4A16 presets."""
        from compressed_tensors.quantization import quant_scheme

        preset = getattr(quant_scheme, f"{fmt.type.upper()}A16")
        return preset["weights"].model_dump(mode="json")


class Nvfp4Codec(Fp4Codec):
    """NVFP4: groups of 16, FP8-E4M3 group scales, one FP32 global scale per tensor."""

    name = "nvfp4"

    def tensor_scale(self, w, fmt):
        return global_scale(w)

    def group_params(self, w, fmt, tensor_scale=None) -> GroupParams:
        if tensor_scale is None:
            raise ValueError("NVFP4 group scales need the tensor's global scale")
        absmax = w.float().abs().amax(dim=-1, keepdim=True)
        return GroupParams(fmt, nvfp4_scales(absmax, tensor_scale), None, tensor_scale)

    def pack(self, q, scale_dtype=torch.float32):
        """scale_dtype is ignored: NVFP4 stores FP8 scales and an FP32 global scale."""
        return {"weight_packed": pack_codes(q.codes),
                "weight_scale": q.scale.float().to(torch.float8_e4m3fn).contiguous(),
                "weight_global_scale": q.global_scale.float().reshape(1).contiguous()}

    def unpack(self, tensors, fmt):
        return QuantizedWeight(fmt, unpack_codes(tensors["weight_packed"]),
                               tensors["weight_scale"].float(), None,
                               tensors["weight_global_scale"].float())


class Mxfp4Codec(Fp4Codec):
    """MXFP4: groups of 32, E8M0 (power-of-two) group scales."""

    name = "mxfp4"

    def group_params(self, w, fmt, tensor_scale=None) -> GroupParams:
        return GroupParams(fmt, mxfp4_scales(w.float().abs().amax(dim=-1, keepdim=True)))

    def pack(self, q, scale_dtype=torch.float32):
        """scale_dtype is ignored: the scales are stored as uint8 exponents
        (compressed_tensors.compress_mx_scale)."""
        exponent = 127 + torch.floor(torch.log2(q.scale.float()))
        return {"weight_packed": pack_codes(q.codes),
                "weight_scale": exponent.to(torch.int32).to(torch.uint8).contiguous()}

    def unpack(self, tensors, fmt):
        scale = 2.0 ** (tensors["weight_scale"].to(torch.float32) - 127)
        return QuantizedWeight(fmt, unpack_codes(tensors["weight_packed"]), scale)


register_codec(Nvfp4Codec())
register_codec(Mxfp4Codec())
