"""2:4 storage on load: the modules that hold compressed 2:4 weights, put in place before the
artifact's tensors are read (compress/formats/sparse24.py has the layout)."""

from __future__ import annotations

import torch
from torch import nn

from compress.formats import WeightFormat
from compress.runtime.modules import Sparse24Linear, Sparse24QuantizedLinear, get_module, set_module


def load_sparse24(model: nn.Module, modules: dict[str, dict]) -> None:
    """On load: put 2:4 storage modules in place before the weights are read."""
    for name, spec in modules.items():
        linear = get_module(model, name)
        bias = linear.bias
        if "format" in spec:
            module = Sparse24QuantizedLinear(linear.in_features, linear.out_features,
                                             WeightFormat(**spec["format"]), bias)
        else:
            module = Sparse24Linear(linear.in_features, linear.out_features,
                                    getattr(torch, spec["values_dtype"]), bias)
        set_module(model, name, module)


