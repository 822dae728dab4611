"""nn.Modules that replace the model's own layers and compute with compressed weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.formats import QuantizedWeight, WeightFormat, codec


class QuantizedLinear(nn.Module):
    """A Linear whose weight is kept packed (compressed-tensors tensors as buffers).

    forward dequantizes and multiplies: the PyTorch reference path. Fused kernels dispatch here
    on CUDA (compress.kernels).
    """

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None,
                       scale_dtype: torch.dtype) -> "QuantizedLinear":
        module = cls(q.shape[1], q.shape[0], q.fmt, bias)
        module.load_packed(codec(q.fmt).pack(q, scale_dtype))
        return module

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def packed(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def quantized(self) -> QuantizedWeight:
        return codec(self.fmt).unpack(self.packed(), self.fmt)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features]
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt.name}"


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(get_module(root, parent), child, module)
