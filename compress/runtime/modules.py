"""nn.Modules that replace the model's own layers and compute with compressed weights."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.formats import QuantizedWeight, WeightFormat, codec


class QuantizedLinear(nn.Module):
    """A Linear whose weight is kept packed (compressed-tensors tensors as buffers).

    forward runs the fused Triton kernel on CUDA and the PyTorch reference (dequantize + F.linear)
    elsewhere; see dispatch_linear.
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

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = decoded_weight(self, x, lambda: self.dequantized_weight().to(x.dtype))
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features]
        return dispatch_linear(self, x, self.reference_forward)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt.name}"


# ---------------------------------------------------------------------------------------------
# Decoded weights on the CPU
#
# The reference path decodes the whole weight at every call. At batch 1 that costs far more than
# the matmul (measured ~8x slower than the float model on SmolLM2), and on the CPU there is no
# fused kernel, so decoded weights are kept per module while their total stays within a memory
# budget: COMPRESS_DECODED_CACHE_MB, by default a quarter of the machine's memory; 0 turns it
# off. Only on the CPU (on a GPU the memory held must stay about the compressed size), and only
# for models loaded to run (compress.load sets keep_decoded): a pass that streams layers through
# memory must not keep their decoded copies.
CACHE_ENV = "COMPRESS_DECODED_CACHE_MB"
_cached_bytes = 0


def decoded_cache_budget() -> int:
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return int(float(value) * 2**20)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf: keep nothing
        return 0


def _release(nbytes: int) -> None:
    global _cached_bytes
    _cached_bytes -= nbytes


def decoded_weight(module: nn.Module, x: torch.Tensor,
                   decode: Callable[[], torch.Tensor]) -> torch.Tensor:
    """decode() (the module's weight as [out, in] in x.dtype), kept on the module for the next
    call when x is on the CPU and the budget allows. The key holds the storage of the module's
    buffers, so reloading or moving them decodes again."""
    global _cached_bytes
    scoped = getattr(module, "_decoded_scope", None)
    if scoped is not None:     # inside decoded_once: decode at the first call only
        if x.dtype not in scoped:
            scoped[x.dtype] = decode()
        return scoped[x.dtype]
    if x.device.type != "cpu" or not getattr(module, "keep_decoded", False):
        return decode()
    key = (x.dtype, tuple(b.data_ptr() for b in module._buffers.values() if b is not None))
    cached = getattr(module, "_decoded", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = decode()
    if cached is None and _cached_bytes + w.nbytes <= decoded_cache_budget():
        _cached_bytes += w.nbytes
        weakref.finalize(module, _release, w.nbytes)
        module._decoded = (key, w)
    elif cached is not None and cached[1].nbytes == w.nbytes:
        module._decoded = (key, w)  # same size, new contents: reuse the budget it holds
    return w


@contextmanager
def decoded_once(layer: nn.Module):
    """Within the block, every compressed module of `layer` that takes the reference path
    decodes its weight once and reuses it for every later call; the decoded weights are dropped
    at the end. The calibrator re-runs a quantized layer on every calibration batch: without
    this each of SmolLM2's 210 modules was decoded 8 times (64 samples, batches of 8)."""
    modules = [m for m in layer.modules() if hasattr(m, "reference_forward")]
    for module in modules:
        module._decoded_scope = {}
    try:
        yield
    finally:
        for module in modules:
            del module._decoded_scope


# ---------------------------------------------------------------------------------------------
# Kernel dispatch
#
# A compressed linear module calls dispatch_linear(self, x, reference, layout) from forward. The
# module must have in_features, out_features, bias, its stored tensors as buffers (names as in
# compressed-tensors: weight_packed, weight_scale, ...), and `fmt` (a WeightFormat) unless it
# holds 16-bit values. layout "dense" reads the format's own tensors; layout "2:4" reads the
# 2:4 storage (weight_meta + weight_values or weight_packed; compress/kernels/sparse24.py).
# Each call records the path it took on the module (kernel_path, kernel_calls), so a run can
# show that it used the kernels (dispatch_summary) rather than silently falling back.

# COMPRESS_KERNELS: "auto" (default; kernels on CUDA when triton imports), "off" (always the
# reference), "always" (kernels on any device: on CPU only with TRITON_INTERPRET=1, for tests).
KERNELS_ENV = "COMPRESS_KERNELS"


def activation_like(model: nn.Module) -> torch.Tensor | None:
    """The model's first floating parameter (its embedding): the device and activation dtype
    the run-time fusions check themselves in. Not a layer's own parameters: a compressed layer
    holds only buffers, some of them integer or float32 scales."""
    return next((p for p in model.parameters() if p.is_floating_point()), None)


def kernel_unavailable(x: torch.Tensor) -> str | None:
    """Why the reference must run for input x, or None when the Triton kernel can. Called for
    every linear of every step: cheap checks first (at CPU batch-1 decode the per-call Python
    cost is a measurable part of the step, kernels/BENCHMARKS.md)."""
    mode = os.environ.get(KERNELS_ENV, "auto")
    if mode == "off":
        return f"{KERNELS_ENV}=off"
    if mode != "always" and not x.is_cuda:
        return x.device.type
    if not _triton_installed():
        return "triton not installed"
    return None


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_key(module: nn.Module, layout: str = "dense") -> str:
    """Which kernel a module's storage needs: int4, int8, nvfp4, mxfp4, 2:4-16bit, 2:4-int4, ..."""
    fmt = getattr(module, "fmt", None)
    name = "16bit" if fmt is None else fmt.row.name
    return name if layout == "dense" else f"{layout}-{name}"


def _run_kernel(module: nn.Module, x: torch.Tensor, layout: str, path: str, gated: bool,
                bias: torch.Tensor | None) -> torch.Tensor:
    t = dict(module.named_buffers(recurse=False))
    shape = (module.out_features, module.in_features)
    fmt = getattr(module, "fmt", None)
    if layout == "2:4":
        from compress.kernels.sparse24 import sparse24_matmul

        kind = "16bit" if fmt is None else fmt.type
        return sparse24_matmul(x, kind, t, shape, fmt.bits if fmt else 4, bias, path)
    if fmt.row.kernel == "int":
        from compress.kernels.w4a16 import int_matmul

        return int_matmul(x, t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"),
                          shape, fmt.bits, bias, path, gated=gated)
    from compress.kernels.fp4 import fp4_matmul

    return fp4_matmul(x, fmt.type, t["weight_packed"], t["weight_scale"],
                      t.get("weight_global_scale"), shape, bias, path, gated=gated)


def _record(module: nn.Module, path: str) -> None:
    # plain attributes, written to __dict__ directly: nn.Module.__setattr__ checks parameters,
    # buffers and submodules first, which costs more than the record itself at every call
    state = module.__dict__
    state["kernel_path"] = path
    calls = state.get("kernel_calls")
    if calls is None:
        calls = state["kernel_calls"] = Counter()
    calls[path] += 1


def dispatch_linear(module: nn.Module, x: torch.Tensor,
                    reference: Callable[[torch.Tensor], torch.Tensor],
                    layout: str = "dense", gated: bool = False) -> torch.Tensor:
    """y = module(x) by the fused kernel when it can run, else by reference(x); records which.
    gated: module stacks a SiLU-gated MLP's gate and up, y = silu(gate) * up (int_matmul).

    A decoder layer may leave its residual stream in module.pending_residual for this call
    (compress.runtime.norms.fuse_residual_norms, where the MLP's output is down_proj's): y is
    then residual + module(x). For one row of x the residual is a bias over the outputs, added
    in the kernel's epilogue (rounded once, with the product) instead of by one more launch."""
    residual = module.__dict__.pop("pending_residual", None)
    reason = kernel_unavailable(x)
    if reason is not None:
        _record(module, f"reference ({reason})")
        y = reference(x)
        return y if residual is None else residual + y
    from compress.kernels._common import choose_path

    rows = x.numel() // x.shape[-1]
    path = choose_path(rows, decode=layout == "dense", device=x.device)
    label = f"triton/{kernel_key(module, layout)}/{path}" + (" gated" if gated else "")
    if (residual is not None and rows == 1 and module.bias is None and not gated
            and residual.numel() == module.out_features and residual.dtype == x.dtype):
        _record(module, label + " +residual")
        return _run_kernel(module, x, layout, path, gated, residual.reshape(-1))
    _record(module, label)
    y = _run_kernel(module, x, layout, path, gated, module.bias)
    return y if residual is None else residual + y


def dispatch_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """{layer type: {path: calls}} for every module that went through dispatch_linear; layer
    type is the module name with layer indices replaced by '*' (model.layers.*.mlp.down_proj)."""
    summary: dict[str, Counter] = {}
    for name, module in model.named_modules():
        calls = getattr(module, "kernel_calls", None)
        if calls is None and isinstance(module, QuantizedLinear):
            calls = Counter({"never called": 1})
        if calls:
            kind = re.sub(r"\.\d+(?=\.|$)", ".*", name)
            summary.setdefault(kind, Counter()).update(calls)
    return {kind: dict(calls) for kind, calls in summary.items()}


def reset_dispatch_counts(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "kernel_calls"):
            module.kernel_calls = Counter()


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(get_module(root, parent), child, module)


class Sparse24Linear(nn.Module):
    """A 2:4-sparse Linear kept in 2:4 storage (compress.formats.sparse24): weight_meta and
    16-bit weight_values as buffers. forward: the 2:4 kernel on CUDA, else decompress + matmul."""

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

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features]
        w = decoded_weight(self, x, lambda: self.dense_weight().to(x.dtype))
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch_linear(self, x, self.reference_forward, layout="2:4")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4 "
                f"{self.weight_values.dtype}")


class Sparse24QuantizedLinear(QuantizedLinear):
    """A 2:4-sparse 4-bit Linear: the format's tensors with weight_packed holding only the kept
    codes, plus weight_meta (compress.formats.sparse24). forward: the 2:4 kernel reading that
    layout on CUDA, else decompress + dequantize + matmul."""

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
        return dispatch_linear(self, x, self.reference_forward, layout="2:4")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", 2:4"
