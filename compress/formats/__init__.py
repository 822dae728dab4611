"""Number formats for weights: quantize, dequantize, pack and unpack, registered by name.

A `QuantizedWeight` holds integer codes plus the parameters that map them back to real values.
Each format module provides four stateless functions, registered in CODECS:
    quantize(w [O, I], fmt) -> QuantizedWeight               round-to-nearest on fmt's grid
    dequantize(q) -> w [O, I] float32
    pack(q) -> dict[str, Tensor]       the tensors stored in safetensors (compressed-tensors names)
    unpack(tensors, fmt, shape) -> QuantizedWeight
and `group_params(w [O, g], fmt, global_scale) -> (scale, zero)` / `encode` / `decode` used by
GPTQ, which quantizes one column at a time with parameters fixed per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator


class WeightFormat(BaseModel):
    """How one weight matrix is stored. group_size None means one scale per output channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["int", "nvfp4", "mxfp4"] = "int"
    bits: Literal[4, 8] = 4
    group_size: int | None = 128
    symmetric: bool = True

    @model_validator(mode="after")
    def _check(self) -> "WeightFormat":
        fixed = {"nvfp4": 16, "mxfp4": 32}
        if self.type in fixed:
            if self.group_size != fixed[self.type] or not self.symmetric or self.bits != 4:
                raise ValueError(f"{self.type} is symmetric 4-bit with groups of "
                                 f"{fixed[self.type]}; remove group_size/symmetric/bits")
        elif self.group_size is not None and self.group_size < 1:
            raise ValueError("group_size must be a positive integer or null (per channel)")
        return self

    @property
    def name(self) -> str:
        if self.type != "int":
            return self.type
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{group}"

    def group_for(self, in_features: int) -> int:
        return self.group_size or in_features

    def bits_per_weight(self, in_features: int) -> float:
        """Storage cost per weight including scales (and zero points)."""
        g = self.group_for(in_features)
        extra = {"int": 16 + (0 if self.symmetric else self.bits), "nvfp4": 8, "mxfp4": 8}
        return self.bits + extra[self.type] / g


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

    def dequantize(self) -> torch.Tensor:
        return codec(self.fmt).dequantize(self)


CODECS: dict[str, object] = {}


def codec(fmt: WeightFormat):
    """The format module (intq, fp4, ...) that implements `fmt`."""
    if fmt.type not in CODECS:  # a format module registers itself when imported
        from compress.formats import fp4, intq  # noqa: F401
    return CODECS[fmt.type]


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[O, I] -> [O, I/g, g]; the caller has checked that g divides I."""
    out_features, in_features = w.shape
    return w.reshape(out_features, in_features // group_size, group_size)
