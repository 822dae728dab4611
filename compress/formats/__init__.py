"""Number formats for weights: ONE table (FORMATS) and one Codec interface, registered by name.

FORMATS is read by the recipe schema (the format names a recipe may use), by WeightFormat
(which group sizes a format allows), by the artifact writer (compressed-tensors format name,
scale dtype) and by the kernels (FP4 group sizes).

A `QuantizedWeight` holds integer codes plus the parameters that map them back to real values.
Every codec (compress/formats/intq.py, fp4.py) subclasses `Codec` and has the same methods:
    tensor_scale(w [O, I], fmt) -> Tensor [1] | None     per-tensor scale (NVFP4), else None
    group_params(w [..., g], fmt, tensor_scale) -> GroupParams   the grid of each group
    encode(w, params) -> int8 codes;  decode(codes, params) -> float32      (params broadcast)
    quantize(w [O, I], fmt, tensor_scale=None) -> QuantizedWeight           round-to-nearest
    dequantize(q) -> w [O, I] float32
    pack(q, scale_dtype) -> dict[str, Tensor]   the tensors stored (compressed-tensors names)
    unpack(tensors, fmt) -> QuantizedWeight
    scheme_args(fmt) -> dict                    compressed-tensors QuantizationArgs
GPTQ quantizes one column at a time with parameters fixed per group: it asks the codec for the
tensor scale once and for each group's GroupParams, and never looks at which format it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator


@dataclass(frozen=True)
class FormatRow:
    """One number format. group_size None: the recipe chooses it (or one per channel);
    scale_dtype "model": scales are saved in the artifact's 16-bit dtype (compressed-tensors)."""

    name: str                    # what a recipe writes: format: int4
    codec: str                   # the Codec that implements it (WeightFormat.type)
    bits: int
    group_size: int | None       # fixed by the format, or None when the recipe chooses
    scale_dtype: str             # "model", "float8_e4m3fn" or "e8m0" (uint8 exponent)
    scale_bits: int              # stored bits per group scale (for size estimates)
    tensor_scale: bool           # one float32 scale per tensor besides the group scales
    ct_format: str               # compressed-tensors format name
    kernel: str                  # which fused kernel reads it: "int" (w4a16.py), "fp4" (fp4.py)

    def stored_scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of weight_scale in the artifact (E8M0 exponents are stored as uint8)."""
        return {"model": model_dtype, "float8_e4m3fn": torch.float8_e4m3fn,
                "e8m0": torch.uint8}[self.scale_dtype]


FORMATS: dict[str, FormatRow] = {row.name: row for row in (
    FormatRow("int4", "int", 4, None, "model", 16, False, "pack-quantized", "int"),
    FormatRow("int8", "int", 8, None, "model", 16, False, "pack-quantized", "int"),
    FormatRow("nvfp4", "nvfp4", 4, 16, "float8_e4m3fn", 8, True, "nvfp4-pack-quantized", "fp4"),
    FormatRow("mxfp4", "mxfp4", 4, 32, "e8m0", 8, False, "mxfp4-pack-quantized", "fp4"),
)}
# Stored tensors whose dtype a format fixes whatever the artifact's dtype: NVFP4's global scale
# (float32 in compressed-tensors) and 2:4 values (their dtype is recorded in the structure
# section when they are built); every other floating tensor is saved in the saved dtype.
FIXED_DTYPE_TENSORS = ("weight_global_scale", "weight_values")
FormatName = Literal[tuple(FORMATS)]                                        # type: ignore[valid-type]
CodecName = Literal[tuple(dict.fromkeys(r.codec for r in FORMATS.values()))]  # type: ignore[valid-type]


def format_row(codec_name: str, bits: int) -> FormatRow:
    """The table row of a codec at a bit width."""
    for row in FORMATS.values():
        if row.codec == codec_name and row.bits == bits:
            return row
    raise ValueError(f"no {bits}-bit format for codec {codec_name!r}")


class WeightFormat(BaseModel):
    """How one weight matrix is stored. group_size None means one scale per output channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: CodecName = "int"
    bits: Literal[4, 8] = 4
    group_size: int | None = 128
    symmetric: bool = True

    @model_validator(mode="after")
    def _check(self) -> "WeightFormat":
        fixed = [r for r in FORMATS.values() if r.codec == self.type and r.group_size]
        if fixed:
            row = fixed[0]
            if self.group_size != row.group_size or not self.symmetric or self.bits != row.bits:
                raise ValueError(f"{self.type} is symmetric {row.bits}-bit with groups of "
                                 f"{row.group_size}; remove group_size/symmetric/bits")
        elif self.group_size is not None and self.group_size < 1:
            raise ValueError("group_size must be a positive integer or null (per channel)")
        return self

    @property
    def row(self) -> FormatRow:
        return format_row(self.type, self.bits)

    @property
    def name(self) -> str:
        if self.row.group_size:
            return self.row.name
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.row.name}-{'sym' if self.symmetric else 'asym'}-{group}"

    def group_for(self, in_features: int) -> int:
        return self.group_size or in_features

    def bits_per_weight(self, in_features: int) -> float:
        """Storage cost per weight including scales (and zero points)."""
        extra = self.row.scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + extra / self.group_for(in_features)


@dataclass(frozen=True)
class GroupParams:
    """The grid of some groups: scale float32 and zero int8 (or None) shaped to broadcast
    against the weights (e.g. [O, I/g, 1] for w [O, I/g, g]); tensor_scale float32 [1] or None
    (NVFP4's per-tensor scale, which every group shares)."""

    fmt: WeightFormat
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "GroupParams":
        """The same grid with fn applied to the per-group tensors (index, reshape, move)."""
        return replace(self, scale=fn(self.scale),
                       zero=None if self.zero is None else fn(self.zero))


@dataclass
class QuantizedWeight:
    """codes: int8 [O, I]; scale: [O, I/g]; zero: int8 [O, I/g] or None; global_scale: [1] or None."""

    fmt: WeightFormat
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @classmethod
    def from_params(cls, codes: torch.Tensor, p: GroupParams) -> "QuantizedWeight":
        """codes [O, I] with the params of its groups ([O, I/g, 1])."""
        p = p.map(lambda t: t.squeeze(-1))
        return cls(p.fmt, codes, p.scale, p.zero, p.tensor_scale)

    def params(self) -> GroupParams:
        """The grid of every group, shaped [O, I/g, 1]."""
        return GroupParams(self.fmt, self.scale.float(), self.zero,
                           self.global_scale).map(lambda t: t.unsqueeze(-1))

    def dequantize(self) -> torch.Tensor:
        return codec(self.fmt).dequantize(self)


class Codec(ABC):
    """How a family of formats rounds, stores and reads weights (see the module docstring)."""

    name: str  # the registry key: WeightFormat.type

    def tensor_scale(self, w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor | None:
        """The per-tensor scale every group of w shares; None for formats without one."""
        return None

    @abstractmethod
    def group_params(self, w: torch.Tensor, fmt: WeightFormat,
                     tensor_scale: torch.Tensor | None = None) -> GroupParams:
        """Grid of the groups along the last axis. w: [..., g] -> params shaped [..., 1]."""

    @abstractmethod
    def encode(self, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
        """Codes (int8) of w on the grid p (broadcast against w)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, p: GroupParams) -> torch.Tensor:
        """float32 values of codes on the grid p."""

    def fake_quantize(self, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
        """decode(encode(w, p), p): the float32 values w rounds to (a codec may compute them
        without the int8 codes, equal bit for bit)."""
        return self.decode(self.encode(w, p), p)

    @abstractmethod
    def pack(self, q: QuantizedWeight, scale_dtype: torch.dtype = torch.float32
             ) -> dict[str, torch.Tensor]:
        """The compressed-tensors tensors of q; scale_dtype is used where the table says
        scale_dtype "model" (formats with a fixed scale encoding ignore it)."""

    @abstractmethod
    def unpack(self, tensors: dict[str, torch.Tensor], fmt: WeightFormat) -> QuantizedWeight:
        """Inverse of pack."""

    @abstractmethod
    def scheme_args(self, fmt: WeightFormat) -> dict:
        """The compressed-tensors QuantizationArgs of fmt's weights, as a dict."""

    def format_name(self, fmt: WeightFormat) -> str:
        """compressed-tensors' name of the storage format."""
        return fmt.row.ct_format

    def quantize(self, w: torch.Tensor, fmt: WeightFormat,
                 tensor_scale: torch.Tensor | None = None) -> QuantizedWeight:
        """Round-to-nearest. w: [O, I] -> codes [O, I], scale/zero [O, I/g]; tensor_scale:
        a per-tensor scale shared with other tensors (else the codec's own from w)."""
        if tensor_scale is None:
            tensor_scale = self.tensor_scale(w, fmt)
        wg = grouped(w.float(), fmt.group_for(w.shape[1]))
        p = self.group_params(wg, fmt, tensor_scale)
        return QuantizedWeight.from_params(self.encode(wg, p).reshape(w.shape), p)

    def dequantize(self, q: QuantizedWeight) -> torch.Tensor:
        g = q.fmt.group_for(q.shape[1])
        return self.decode(grouped(q.codes, g), q.params()).reshape(q.shape)


CODECS: dict[str, Codec] = {}


def register_codec(instance: Codec) -> Codec:
    """Add a codec under its name; a second codec of the same name is refused."""
    if instance.name in CODECS:
        raise ValueError(f"a codec named {instance.name!r} is already registered "
                         f"({type(CODECS[instance.name]).__name__})")
    CODECS[instance.name] = instance
    return instance


def codec(fmt: WeightFormat) -> Codec:
    """The codec that implements `fmt`."""
    if fmt.type not in CODECS:  # a format module registers its codecs when imported
        from compress.formats import fp4, intq  # noqa: F401
    return CODECS[fmt.type]


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[O, I] -> [O, I/g, g]; the caller has checked that g divides I."""
    out_features, in_features = w.shape
    return w.reshape(out_features, in_features // group_size, group_size)
