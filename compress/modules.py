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


class Sparse24Linear(nn.Module):
    """A 2:4-sparse Linear kept in 2:4 storage (compress.formats.sparse24): weight_meta and
    16-bit weight_values as buffers. forward decompresses and multiplies (reference path)."""

    def __init__(self, in_features: int, out_features: int, values_dtype: torch.dtype,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # Placeholders of the stored shapes, so load_state_dict fills them.
        self.register_buffer("weight_meta", torch.zeros(out_features, in_features // 8,
                                                        dtype=torch.uint8))
        self.register_buffer("weight_values", torch.zeros(out_features, in_features // 2,
                                                          dtype=values_dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "weight") -> "Sparse24Linear":
        from compress.formats.sparse24 import compress_dense

        tensors = compress_dense(linear.weight.data, name)
        module = cls(linear.in_features, linear.out_features, tensors["weight_values"].dtype,
                     linear.bias)
        module.weight_meta, module.weight_values = tensors["weight_meta"], tensors["weight_values"]
        return module.to(linear.weight.device)

    def dense_weight(self) -> torch.Tensor:
        from compress.formats.sparse24 import decompress_dense

        return decompress_dense(self.weight_meta, self.weight_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features]
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4 "
                f"{self.weight_values.dtype}")


class Sparse24QuantizedLinear(QuantizedLinear):
    """A 2:4-sparse 4-bit Linear: the format's tensors with weight_packed holding only the kept
    codes, plus weight_meta (compress.formats.sparse24). forward = decompress + dequantize +
    F.linear, the reference path (it does not inherit QuantizedLinear's kernel dispatch, which
    reads the dense layout)."""

    @classmethod
    def from_quantized_module(cls, module: QuantizedLinear,
                              name: str = "weight") -> "Sparse24QuantizedLinear":
        from compress.formats.sparse24 import compress_quantized

        scale_dtype = module.packed()["weight_scale"].dtype
        tensors = compress_quantized(module.quantized(), scale_dtype, name)
        sparse = cls(module.in_features, module.out_features, module.fmt, module.bias)
        sparse.load_packed({k: v.to(module.weight_scale.device) for k, v in tensors.items()})
        return sparse

    def quantized(self) -> QuantizedWeight:
        from compress.formats.sparse24 import decompress_quantized

        return decompress_quantized(self.packed(), self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", 2:4"
