"""GPTQ's column loop replayed as a CUDA graph (compress.passes.gptq._BlockGraph) against the
same loop run eagerly on the GPU: the same kernels on the same inputs, so the same codes."""

from __future__ import annotations

import pytest
import torch

from compress.formats import WeightFormat
from compress.passes import gptq


@pytest.mark.parametrize("fmt_kwargs,masked", [({"group_size": 128}, False),
                                               ({"group_size": 128, "symmetric": False}, True),
                                               ({"type": "nvfp4", "group_size": 16}, False)])
def test_graph_replay_gives_the_eager_codes(monkeypatch, fmt_kwargs, masked):
    torch.manual_seed(0)
    w = torch.randn(384, 640, device="cuda") * 0.05      # 640: five blocks of 128
    x = torch.randn(2048, 640, device="cuda")
    H = 2 * x.T @ x / len(x)
    fmt = WeightFormat(**fmt_kwargs)
    mask = (torch.rand(384, 640, device="cuda") > 0.5) if masked else None
    monkeypatch.setenv(gptq.GRAPH_ENV, "0")
    eager, _ = gptq.gptq_quantize(w, H, fmt, act_order=True, mask=mask)
    monkeypatch.setenv(gptq.GRAPH_ENV, "1")
    captured = []
    capture = gptq._BlockGraph.capture.__func__

    def recording(cls, *args):
        captured.append(capture(cls, *args))
        return captured[-1]

    monkeypatch.setattr(gptq._BlockGraph, "capture", classmethod(recording))
    replayed, _ = gptq.gptq_quantize(w, H, fmt, act_order=True, mask=mask)
    assert captured and captured[0] is not None, "the column loop was not captured"
    assert torch.equal(eager.codes, replayed.codes)
    assert torch.equal(eager.scale, replayed.scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_of_16_bit_inputs_is_the_float32_gram(dtype):
    """compress.calib.gram_update feeds 16-bit inputs to cuBLAS with float32 accumulation: the
    products are exact, so only the summation order differs from the float32 matmul."""
    from compress.calib import gram_update

    torch.manual_seed(0)
    x = torch.randn(4096, 512, device="cuda").to(dtype)
    ref = x.double().T @ x.double()
    g = gram_update(None, x, torch.float32)
    g = gram_update(g, x, torch.float32)
    assert g.dtype == torch.float32
    rel = ((g.double() - 2 * ref).abs().max() / ref.abs().max()).item()
    # H200, 2026-12-03: 2.3e-5 (bfloat16), 4.3e-5 (float16): cuBLAS sums 4096 products per
    # entry in its own order and blocking. Rounding the Gram to 16 bits would give ~4e-3.
    assert rel < 1e-4, rel
