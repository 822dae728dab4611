"""GPTQ's block kernel (compress/passes/gptq_kernel.py) against its PyTorch reference and
against the torch column loop gptq_quantize runs, under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from compress.passes.gptq_kernel import gptq_block, gptq_block_ref


def block_inputs(rng, nb: int, out_features: int, bits: int, zero: bool, keep: bool):
    x = torch.randn(4 * nb, nb, generator=rng) * torch.rand(nb, generator=rng) * 3
    H = 2 * x.T @ x / len(x) + 0.01 * torch.eye(nb)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H))).mT  # a view
    W1 = torch.randn(nb, out_features, generator=rng) * 0.05
    scale = W1.abs().amax(0, keepdim=True).expand(nb, -1) / (2 ** (bits - 1) - 0.5)
    z = torch.randint(-2, 3, (nb, out_features), generator=rng, dtype=torch.int8) if zero \
        else None
    k = torch.rand(nb, out_features, generator=rng) > 0.5 if keep else None
    if k is not None:
        W1 = W1 * k
    return W1, U, scale.contiguous(), z, k


@pytest.mark.parametrize("bits,zero,keep", [(4, False, False), (4, True, False),
                                            (8, False, False), (4, False, True)])
@pytest.mark.parametrize("nb,out_features", [(128, 96), (40, 33)])
def test_block_kernel_matches_the_reference(rng, bits, zero, keep, nb, out_features):
    W1, U, scale, z, k = block_inputs(rng, nb, out_features, bits, zero, keep)
    codes = torch.full((nb, out_features), 99, dtype=torch.int8)
    codes_ref = codes.clone()
    given = W1.clone()
    err = gptq_block(W1, U, scale, z, k, bits, codes)
    err_ref = gptq_block_ref(W1, U, scale, z, k, bits, codes_ref)
    assert torch.equal(W1, given)                               # the input block is left as is
    # one fused multiply-add per update against two roundings: a code may land on the other
    # side of a tie and change what follows, so compare as GPTQ results, not bits
    same = (codes == codes_ref).float().mean().item()
    assert same > 0.99, f"{same:.4f} of codes equal (seed {rng.initial_seed()})"
    assert codes.int().min() >= -2 ** (bits - 1) and codes.int().max() < 2 ** (bits - 1)
    torch.testing.assert_close(err[codes == codes_ref], err_ref[codes == codes_ref],
                               rtol=1e-3, atol=1e-4)


def test_gptq_quantize_with_the_kernel_equals_the_torch_loop(rng, monkeypatch):
    """gptq_quantize's INT path through the block kernel (forced on the CPU here) against the
    torch column loop: the same codes up to ties, the same output error."""
    from compress.formats import WeightFormat
    from compress.passes import gptq

    x = torch.randn(2048, 256, generator=rng) * torch.rand(256, generator=rng) * 3
    H = 2 * x.T @ x / len(x)
    w = torch.randn(48, 256, generator=rng) * 0.05
    fmt = WeightFormat(type="int", group_size=64)
    q_loop, _ = gptq.gptq_quantize(w, H, fmt, act_order=True)
    monkeypatch.setattr(gptq, "block_kernel_enabled", lambda w, fmt: True)
    q_kernel, _ = gptq.gptq_quantize(w, H, fmt, act_order=True)
    assert torch.equal(q_loop.scale, q_kernel.scale)
    assert (q_loop.codes == q_kernel.codes).float().mean() > 0.99

    def out_err(q):
        return (x @ (w - q.dequantize()).T).pow(2).mean().item()
    assert out_err(q_kernel) == pytest.approx(out_err(q_loop), rel=0.02)
