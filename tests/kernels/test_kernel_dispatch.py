"""Runtime dispatch: the reference on CPU, the kernel when allowed; paths are recorded; the
kernels' references equal QuantizedLinear's own dequantize + matmul."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_matmul_close
from torch import nn

from compress.formats import WeightFormat, codec
from compress.kernels.sparse24 import gather_kept, kept_positions, pack_meta, sparse24_matmul_ref
from compress.kernels.w4a16 import int_matmul_ref
from compress.runtime.modules import (
    QuantizedLinear,
    dispatch_linear,
    dispatch_summary,
    reset_dispatch_counts,
)


def quantized_linear(w, fmt, bias=None):
    return QuantizedLinear.from_quantized(codec(fmt).quantize(w, fmt), bias, torch.float32)


def int_ref(module, x):
    t = module.packed()
    return int_matmul_ref(x, t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"),
                          (module.out_features, module.in_features), module.fmt.bits,
                          module.bias)


def test_cpu_takes_the_reference_and_says_so(monkeypatch, rng):
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    model = nn.Sequential(quantized_linear(torch.randn(24, 64, generator=rng),
                                           WeightFormat(group_size=32)))
    assert dispatch_summary(model) == {"0": {"never called": 1}}
    model(torch.randn(2, 64, generator=rng))
    assert model[0].kernel_path == "reference (cpu)"
    assert dispatch_summary(model) == {"0": {"reference (cpu)": 1}}


def test_kernels_off_is_respected(monkeypatch, rng):
    monkeypatch.setenv("COMPRESS_KERNELS", "off")
    module = quantized_linear(torch.randn(8, 32, generator=rng), WeightFormat(group_size=16))
    module(torch.randn(1, 32, generator=rng))
    assert module.kernel_path == "reference (COMPRESS_KERNELS=off)"


@pytest.mark.parametrize("fmt", [WeightFormat(group_size=32, symmetric=False),
                                 WeightFormat(bits=8, group_size=None)], ids=lambda f: f.name)
def test_reference_equals_quantized_linear(fmt, rng):
    module = quantized_linear(torch.randn(40, 96, generator=rng), fmt,
                              bias=torch.randn(40, generator=rng))
    x = torch.randn(3, 96, generator=rng)
    torch.testing.assert_close(int_ref(module, x), module.reference_forward(x),
                               rtol=1e-5, atol=1e-5)


def test_fp4_reference_equals_quantized_linear(rng):
    """The FP4 kernel reference reads what QuantizedLinear holds for NVFP4 and MXFP4."""
    from compress.kernels.fp4 import fp4_matmul_ref

    for name in ("nvfp4", "mxfp4"):
        module = quantized_linear(torch.randn(16, 64, generator=rng), WeightFormat(type=name,
                                  group_size=16 if name == "nvfp4" else 32))
        t, x = module.packed(), torch.randn(2, 64, generator=rng)
        ours = fp4_matmul_ref(x, name, t["weight_packed"], t["weight_scale"],
                              t.get("weight_global_scale"), (16, 64))
        torch.testing.assert_close(ours, module.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 5, 20, 200])
def test_forced_kernel_on_real_smollm2_weight(monkeypatch, smollm2, m, rng):
    """SmolLM2's layer-0 down_proj [576, 1536] in INT4 g128 asym: the module's kernel path (on
    the interpreter) equals its reference path, and the path taken is recorded."""
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    w = smollm2.model.model.layers[0].mlp.down_proj.weight.detach()
    module = quantized_linear(w, WeightFormat(group_size=128, symmetric=False))
    x = torch.randn(m, w.shape[1], generator=rng).to(torch.bfloat16)
    y = module(x)
    expected = {1: "decode", 5: "tc", 20: "tc", 200: "tc"}[m]   # decode serves M = 1 only
    assert module.kernel_path == f"triton/int4/{expected}"
    assert_matmul_close(y, module.reference_forward(x.float()).to(x.dtype), x,
                        module.dequantized_weight(), rng.initial_seed())


class Sparse24Module(nn.Module):
    """What the sparsify pass's module looks like to dispatch: 2:4 buffers, no fmt."""

    def __init__(self, dense):
        super().__init__()
        self.out_features, self.in_features = dense.shape
        self.bias = None
        pos = kept_positions(dense)
        self.register_buffer("weight_meta", pack_meta(pos))
        self.register_buffer("weight_values", gather_kept(dense, pos))

    def forward(self, x):
        ref = lambda x: sparse24_matmul_ref(x, "16bit", dict(self.named_buffers()),
                                            (self.out_features, self.in_features))
        return dispatch_linear(self, x, ref, layout="2:4")


def test_sparse_module_dispatch_records_its_path(monkeypatch, rng):
    dense = torch.randn(24, 64, generator=rng).to(torch.bfloat16)
    dense[:, 0::4] = 0
    dense[:, 1::4] = 0
    model = nn.ModuleDict({"a": Sparse24Module(dense)})
    x = torch.randn(3, 64, generator=rng).to(torch.bfloat16)
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    y = model["a"](x)
    assert model["a"].kernel_path == "triton/2:4-16bit/splitk"
    monkeypatch.setenv("COMPRESS_KERNELS", "auto")
    y_ref = model["a"](x)
    assert_matmul_close(y, y_ref, x, dense.float())
    assert dispatch_summary(model) == {"a": {"triton/2:4-16bit/splitk": 1,
                                             "reference (cpu)": 1}}
    reset_dispatch_counts(model)
    assert dispatch_summary(model) == {}


@pytest.mark.parametrize("fmt_type", ["nvfp4", "mxfp4"])
def test_fp4_module_dispatches_to_the_fp4_kernel(monkeypatch, fmt_type, rng):
    """A QuantizedLinear holding FP4 tensors (as loaded from an artifact) runs the FP4 kernel."""
    from compress.kernels.fp4 import fp4_dequantize_ref, fp4_matmul_ref

    n, k = 20, 64
    fmt = WeightFormat(type=fmt_type, group_size=16 if fmt_type == "nvfp4" else 32)
    module = QuantizedLinear(k, n, fmt, bias=torch.randn(n, generator=rng))
    t = {"weight_packed": torch.randint(0, 256, (n, k // 2), generator=rng, dtype=torch.uint8),
         "weight_shape": torch.tensor([n, k])}
    if fmt_type == "nvfp4":
        t["weight_scale"] = (torch.rand(n, k // 16, generator=rng) * 50 + 1).to(
            torch.float8_e4m3fn)
        t["weight_global_scale"] = torch.tensor([30.0])
    else:
        t["weight_scale"] = torch.randint(120, 130, (n, k // 32), generator=rng,
                                          dtype=torch.uint8)
    module.load_packed(t)
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    x = torch.randn(1, 3, k, generator=rng)
    y = module(x)
    assert module.kernel_path == f"triton/{fmt_type}/tc"     # M = 3: the tc kernel (M > 1)
    args = (t["weight_packed"], t["weight_scale"], t.get("weight_global_scale"), (n, k))
    ref = fp4_matmul_ref(x[0], fmt_type, *args, bias=module.bias)
    assert_matmul_close(y[0], ref, x[0], fp4_dequantize_ref(fmt_type, *args),
                        rng.initial_seed(), module.bias)


def test_sparse_int4_module_dispatches_with_its_format(monkeypatch, rng):
    """A 2:4 INT4 module (the sparsify pass's Sparse24QuantizedLinear layout: kept codes packed,
    scales by original position, weight_meta) runs the 2:4 INT kernel."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from compress.kernels.sparse24 import sparse24_dequantize_ref

    n, k, g = 16, 64, 32
    codes = torch.randint(-8, 8, (n, k), generator=rng, dtype=torch.int8)
    codes[:, 1::4] = 0
    codes[:, 3::4] = 0
    pos = kept_positions(codes)
    module = QuantizedLinear(k, n, WeightFormat(group_size=g))
    module.load_packed({"weight_packed": pack_to_int32(gather_kept(codes, pos), 4),
                        "weight_meta": pack_meta(pos),
                        "weight_scale": torch.rand(n, k // g, generator=rng) + 0.1,
                        "weight_shape": torch.tensor([n, k])})
    module.reference_forward = lambda x: sparse24_matmul_ref(x, "int", module.packed(), (n, k))
    module.forward = lambda x: dispatch_linear(module, x, module.reference_forward, "2:4")
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    x = torch.randn(17, k, generator=rng).to(torch.float16)
    y = module(x)
    assert module.kernel_path == "triton/2:4-int4/tile"
    assert_matmul_close(y, module.reference_forward(x), x,
                        sparse24_dequantize_ref("int", module.packed(), (n, k)))
