"""GPTQ's column loop on the GPU: replayed as a CUDA graph (compress.passes.gptq._BlockGraph)
against the same loop run eagerly (the same kernels on the same inputs, so the same codes), and
the Triton block kernel INT formats run (compress/passes/gptq_kernel.py) against that loop."""

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
    monkeypatch.setenv(gptq.KERNEL_ENV, "0")      # INT formats would take the block kernel
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


@pytest.mark.parametrize("fmt_kwargs,masked", [({"group_size": 128}, False),
                                               ({"group_size": 128, "symmetric": False}, True),
                                               ({"group_size": None, "bits": 8}, False)])
def test_block_kernel_gives_the_torch_loop_result(monkeypatch, fmt_kwargs, masked):
    """One fused multiply-add per update against torch's two roundings: codes equal up to
    ties (and what follows a tie), the same output error."""
    torch.manual_seed(0)
    w = torch.randn(1000, 1408, device="cuda") * 0.05    # 1408: ten blocks and a short one
    x = torch.randn(4096, 1408, device="cuda") * torch.rand(1408, device="cuda") * 3
    H = 2 * x.T @ x / len(x)
    fmt = WeightFormat(**fmt_kwargs)
    mask = (torch.rand(1000, 1408, device="cuda") > 0.5) if masked else None
    monkeypatch.setenv(gptq.KERNEL_ENV, "0")
    loop, _ = gptq.gptq_quantize(w, H, fmt, act_order=True, mask=mask)
    monkeypatch.setenv(gptq.KERNEL_ENV, "1")
    kernel, _ = gptq.gptq_quantize(w, H, fmt, act_order=True, mask=mask)
    assert torch.equal(loop.scale, kernel.scale)
    assert (loop.codes == kernel.codes).float().mean() > 0.99
    if mask is not None:                                   # pruned weights stay zero
        assert (kernel.dequantize()[~mask] == 0).all()

    def out_err(q):
        return (x @ (w - q.dequantize()).T).pow(2).mean().item()
    assert out_err(kernel) == pytest.approx(out_err(loop), rel=0.02)


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


def test_inverse_cholesky_of_a_scratch_hessian_needs_one_more_matrix():
    """With overwrite, besides the scratch H only one factor is alive, plus the factorization's
    own workspace (0.75 of a matrix on the H200, seventh session): the inverse is two
    triangular solves in place. cholesky_inverse allocated two more [I, I] matrices on CUDA
    (3 in all; 1.53 GiB of an 8B layer's peak). The factor is still the upper factor."""
    from compress.hessian import inverse_cholesky

    torch.manual_seed(0)
    n = 2048
    x = torch.randn(3 * n, n, device="cuda") * torch.rand(n, device="cuda")
    H = 2 * x.T @ x / len(x)
    del x
    want = torch.linalg.inv(H.double() + 0.01 * H.diagonal().mean().double()
                            * torch.eye(n, device="cuda", dtype=torch.float64))
    matrix = n * n * 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    U, _ = inverse_cholesky(H, 0.01, overwrite=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 2 * matrix, f"{extra / matrix:.2f} [I, I] matrices beside the scratch"
    assert torch.equal(U, U.triu())
    rel = ((U.T.double() @ U.double() - want).norm() / want.norm()).item()
    assert rel < 1e-3, rel
