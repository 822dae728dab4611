"""The grouped MoE path on the GPU: the kernel against its reference (the CPU tests' cases and
Qwen3-30B-A3B expert shapes), no host sync in ExpertMLPs' grouped forward (CUDA's sync debug
mode), and that forward captured as a CUDA graph and replayed with new routing."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_matmul_close
from test_kernel_moe import CASES, IDS, stacked_fp4, stacked_int
from test_kernel_moe_runtime import FORMATS, experts_of, routing, tiny_moe

from compress.kernels.moe import expert_weights_ref, grouped_matmul, grouped_matmul_ref


def cuda(w: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in w.items()}


def check_rows(w, x, ids, rows_per_x):
    k = x.shape[1]
    y = grouped_matmul(x, ids, rows_per_x=rows_per_x, **w)
    ref = grouped_matmul_ref(x, ids, rows_per_x=rows_per_x, **w)
    dense = expert_weights_ref(w["fmt"], w["packed"], w["scale"], w.get("zero"),
                               w.get("global_scale"), k, w.get("bits", 4))
    e = w["packed"].shape[0]
    xr = x.repeat_interleave(rows_per_x, dim=0)
    for r, expert in enumerate(ids.tolist()):
        weight = dense[min(expert, e - 1)] * (expert < e)
        assert_matmul_close(y[r:r + 1], ref[r:r + 1], xr[r:r + 1], weight, r)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_on_the_cpu_cases(name, dtype, rng):
    make, k = CASES[name]
    x = torch.randn(len(IDS) // 2, k, generator=rng).to(dtype).cuda()
    check_rows(cuda(make(rng)), x, torch.tensor(IDS).cuda(), 2)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("tokens", [1, 16])
def test_kernel_on_qwen3_30b_expert_shapes(fmt, tokens, rng):
    """gate|up [2 x 768, 2048] and down [2048, 768] of 16 experts (of 128), top-8."""
    for n, k in ((1536, 2048), (2048, 768)):
        w = (stacked_int(n, k, 128, True, 4, rng, experts=16) if fmt == "int4" else
             stacked_fp4("nvfp4", n, k, 2 if n == 1536 else 1, rng, experts=16))
        ids = torch.stack([torch.randperm(16, generator=rng)[:8] for _ in range(tokens)])
        x = torch.randn(tokens, k, generator=rng).to(torch.bfloat16).cuda()
        check_rows(cuda(w), x, ids.reshape(-1).cuda(), 8)


@pytest.mark.parametrize("name", list(FORMATS))
def test_grouped_forward_has_no_sync_and_replays_as_a_cuda_graph(name, rng):
    experts = experts_of(tiny_moe(FORMATS[name])).cuda()
    hidden = torch.randn(3, 64, generator=rng).cuda()
    index, weights = (t.cuda() for t in routing(rng))
    with torch.no_grad():
        experts(hidden, index, weights)   # stacks the experts (once)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = experts(hidden, index, weights)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert set(experts.kernel_calls) == {f"triton/moe-{FORMATS[name].name}/grouped"}
        want = experts.per_expert_forward(hidden, index, weights)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = experts(hidden, index, weights)
        hidden.copy_(torch.randn(3, 64, generator=rng))
        index.copy_(torch.tensor([[2, 5], [0, 3], [6, 1]]))   # 6: a masked slot
        weights.copy_(torch.rand(3, 2, generator=rng))
        graph.replay()
        want = experts.per_expert_forward(hidden, index, weights)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
