"""Fused add+RMSNorm and gather+RoPE against their references and transformers' own modules."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DTYPES

from compress.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref
from compress.kernels.rope_gather import rope_gather, rope_gather_ref, rope_qk, rope_qk_ref

# Elementwise: one or two roundings to the dtype (interpreter truncation for bfloat16).
ELEMENT_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 70), (3, 5, 96)], ids=str)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_matches_reference(dtype, shape, with_residual, rng):
    x = torch.randn(*shape, generator=rng).to(dtype)
    res = torch.randn(*shape, generator=rng).to(dtype) if with_residual else None
    w = torch.randn(shape[-1], generator=rng).to(dtype)
    y, h = add_rmsnorm(x, res, w, 1e-5)
    y_ref, h_ref = add_rmsnorm_ref(x, res, w, 1e-5)
    assert y.dtype == y_ref.dtype and h.dtype == h_ref.dtype
    tol = ELEMENT_TOL[dtype]
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=tol, atol=tol)
    # the normalized value is rounded to dtype before the weight multiplies it (as Llama's norm
    # does): a one-ulp difference there (float32 sums in another order) comes out times |w|
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol,
                               atol=tol * max(1.0, w.abs().max().item()),
                               msg=lambda m: f"{m} (seed {rng.initial_seed()})")


def test_add_rmsnorm_reference_is_llama_rmsnorm(rng):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=1e-6)
    norm.weight.data = torch.randn(64, generator=rng)
    x, r = torch.randn(2, 7, 64, generator=rng), torch.randn(2, 7, 64, generator=rng)
    y, h = add_rmsnorm(x, r, norm.weight, 1e-6)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(x + r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("crms", [False, True], ids=["weightless", "crmsnorm"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rmsnorm_pass_norms_match_reference(dtype, crms, with_residual, rng):
    """The rmsnorm pass's norms: weightless RMSNorm and CRMSNorm (rows of dim - 1 values)."""
    x = (torch.randn(3, 95, generator=rng) + 0.3).to(dtype)   # a mean, so sum(h) matters
    res = torch.randn(3, 95, generator=rng).to(dtype) if with_residual else None
    crms_dim = 96 if crms else None
    y, h = add_rmsnorm(x, res, None, 1e-5, crms_dim)
    y_ref, h_ref = add_rmsnorm_ref(x, res, None, 1e-5, crms_dim)
    assert y.dtype == y_ref.dtype == dtype
    tol = ELEMENT_TOL[dtype]
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    if crms:   # not the plain RMSNorm of the stored values
        plain = add_rmsnorm_ref(x, res, None, 1e-5)[0]
        assert (plain.float() - y_ref.float()).abs().max() > 10 * tol


def test_rmsnorm_pass_references_are_the_runtime_modules(rng):
    from compress.runtime.norms import CRMSNorm

    x = torch.randn(2, 5, 63, generator=rng) + 0.5
    torch.testing.assert_close(add_rmsnorm_ref(x, None, None, 1e-6, 64)[0],
                               CRMSNorm(64, 1e-6)(x), rtol=1e-6, atol=1e-6)
    norm = torch.nn.RMSNorm(63, eps=1e-6, elementwise_affine=False)
    torch.testing.assert_close(add_rmsnorm_ref(x, None, None, 1e-6)[0], norm(x),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="CRMSNorm stores dim - 1"):
        add_rmsnorm(x, None, None, 1e-6, 63)


def llama_rope(head_dim, positions):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                         max_position_embeddings=64)
    rope = LlamaRotaryEmbedding(config)
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])
    return rope, cos[0], sin[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_gather_matches_reference(dtype, rng):
    d, e, hd = 48, 16, 8                        # row: [emb 48 | q 48 | k 16 | v 16]
    table = torch.randn(11, 2 * d + 2 * e, generator=rng).to(dtype)
    ids = torch.randint(0, 11, (2, 7), generator=rng)
    pos = torch.randint(0, 20, (2, 7), generator=rng)
    _, cos, sin = llama_rope(hd, 20)
    segments = [(d, d), (2 * d, e)]
    out = rope_gather(ids, pos, table, cos, sin, segments, hd)
    ref = rope_gather_ref(ids, pos, table, cos, sin, segments, hd)
    assert out.shape == (2, 7, 2 * d + 2 * e)
    tol = ELEMENT_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    # columns outside the rotated segments are copied exactly
    torch.testing.assert_close(out[..., :d], table[ids][..., :d], rtol=0, atol=0)


def test_rope_gather_reference_is_transformers_rope(rng):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hd, heads, kv = 16, 4, 2
    table = torch.randn(9, heads * hd + kv * hd, generator=rng)
    ids, pos = torch.randint(0, 9, (1, 6), generator=rng), torch.arange(6)[None]
    _, cos, sin = llama_rope(hd, 6)
    out = rope_gather(ids, pos, table, cos, sin, [(0, heads * hd), (heads * hd, kv * hd)], hd)
    rows = table[ids]
    q = rows[..., :heads * hd].view(1, 6, heads, hd).transpose(1, 2)
    k = rows[..., heads * hd:].view(1, 6, kv, hd).transpose(1, 2)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(out[..., :heads * hd], q_hf.transpose(1, 2).reshape(1, 6, -1))
    torch.testing.assert_close(out[..., heads * hd:], k_hf.transpose(1, 2).reshape(1, 6, -1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_cos", [1, 2])
def test_rope_qk_is_transformers_rope_on_the_attention_layout(dtype, batch_cos, rng):
    """q, k as LlamaAttention makes them (projection output viewed [B, L, H, D], transposed to
    [B, H, L, D]: not contiguous), GQA (fewer k heads), cos/sin per batch row or shared: one
    launch gives transformers' apply_rotary_pos_emb, computed in float32, output in place of
    the input's layout."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, length, h, hk, d = 2, 5, 4, 2, 16
    q, k = (torch.randn(b, length, heads * d, generator=rng).to(dtype)
            .view(b, length, heads, d).transpose(1, 2) for heads in (h, hk))
    _, cos, sin = llama_rope(d, 20)
    pos = torch.randint(0, 20, (batch_cos, length), generator=rng)
    cos, sin = cos[pos].to(dtype), sin[pos].to(dtype)
    qo, ko = rope_qk(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    want_q, want_k = rope_qk_ref(q, k, cos, sin)
    tol = ELEMENT_TOL[dtype]
    torch.testing.assert_close(qo.float(), want_q.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(ko.float(), want_k.float(), rtol=tol, atol=tol)
    hf_q, hf_k = apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())
    torch.testing.assert_close(want_q.float(), hf_q.to(dtype).float(), rtol=tol, atol=tol)
    torch.testing.assert_close(want_k.float(), hf_k.to(dtype).float(), rtol=tol, atol=tol)


def test_rope_qk_declines_layouts_it_does_not_handle(rng):
    q = torch.randn(1, 2, 3, 8, generator=rng)
    cos = sin = torch.randn(1, 3, 8, generator=rng)
    assert rope_qk(q, q, cos[..., :4], sin[..., :4]) is None          # partial rotary
    assert rope_qk(q.transpose(2, 3), q, cos, sin) is None             # head dim not contiguous
