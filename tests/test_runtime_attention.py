"""compress.runtime.attention: single-token grouped-query attention on packed heads computes
what transformers' repeat_kv + SDPA computes, inside the model it was given only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.runtime import attention, scope


def repeat_kv_attention(query, key, value, mask, scaling):
    """transformers' path: K and V copied to every query head, then SDPA."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(n_rep, dim=1) for t in (key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_packed_heads_compute_the_repeat_kv_attention(mask_kind):
    gen = torch.Generator().manual_seed(0)
    b, heads, kv_heads, s, d = 2, 12, 3, 37, 16
    query = torch.randn(b, heads, 1, d, generator=gen)
    key, value = (torch.randn(b, kv_heads, s, d, generator=gen) for _ in range(2))
    keep = torch.rand(b, 1, 1, s, generator=gen) > 0.3
    keep[..., 0] = True
    mask = {"none": None, "bool": keep,
            "float": torch.where(keep, 0.0, torch.finfo(torch.float32).min)}[mask_kind]
    got = attention.packed_decode_attention(query, key, value, mask, 0.3)
    want = repeat_kv_attention(query, key, value, mask, 0.3)
    assert got.shape == (b, 1, heads, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a wrong head grouping (heads interleaved instead of blocked) gives other numbers
    wrong = attention.packed_decode_attention(
        query.reshape(b, heads // kv_heads, kv_heads, 1, d).transpose(1, 2)
        .reshape(b, heads, 1, d), key, value, mask, 0.3)
    assert (wrong - want).abs().max() > 1e-2


def test_a_steps_boolean_mask_is_converted_once():
    """additive_mask: the 0 / -inf mask SDPA would make of a boolean one, made once for the
    mask object all layers of a step share (a new mask or dtype makes it again); SDPA gives
    the boolean mask's result with it, bit for bit; float masks pass through."""
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(1, 1, 1, 9, generator=gen) > 0.4
    keep[..., 0] = True
    first = attention.additive_mask(keep, torch.bfloat16)
    assert attention.additive_mask(keep, torch.bfloat16) is first
    assert first.dtype == torch.bfloat16
    assert torch.equal(first.float(), torch.where(keep, 0.0, float("-inf")))
    keep[..., 1] = ~keep[..., 1]                  # written in place: made again
    second = attention.additive_mask(keep, torch.bfloat16)
    assert second is not first and torch.equal(second.float(),
                                               torch.where(keep, 0.0, float("-inf")))
    again = keep.clone()
    assert attention.additive_mask(again, torch.bfloat16) is not second
    assert attention.additive_mask(again, torch.float32).dtype == torch.float32
    with torch.inference_mode():   # no version counter: reused within one scoped forward only
        frozen = keep.clone()
        forward = scope.RUNNING.set(object())
        made = attention.additive_mask(frozen, torch.bfloat16)
        assert attention.additive_mask(frozen, torch.bfloat16) is made
        scope.RUNNING.reset(forward)
        forward = scope.RUNNING.set(object())   # the next forward
        assert attention.additive_mask(frozen, torch.bfloat16) is not made
        scope.RUNNING.reset(forward)
        outside = attention.additive_mask(frozen, torch.bfloat16)
        assert attention.additive_mask(frozen, torch.bfloat16) is not outside
    floating = torch.zeros(1, 1, 1, 9)
    assert attention.additive_mask(floating, torch.float32) is floating
    assert attention.additive_mask(None, torch.float32) is None
    query, key = torch.randn(1, 4, 1, 8, generator=gen), torch.randn(1, 4, 9, 8, generator=gen)
    want = F.scaled_dot_product_attention(query, key, key, attn_mask=keep)
    got = F.scaled_dot_product_attention(query, key, key,
                                         attn_mask=attention.additive_mask(keep, torch.float32))
    assert torch.equal(got, want)


def tiny_llama(head_dim: int = 8):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=8,
                                  num_key_value_heads=2, head_dim=head_dim)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


def greedy_static_logits(model, ids, new_tokens: int = 5) -> torch.Tensor:
    """The logits of greedy decode through a static cache (a mask at every step)."""
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         cache_implementation="static", return_dict_in_generate=True)
    return torch.stack(out.logits)


def test_static_cache_decode_packs_only_in_its_model(monkeypatch):
    """Greedy decode with a static cache (a mask at every step): the same logits with the
    packed heads; every decode step of the given model takes them, another model none."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    # as under transformers 5.17 (no pack_gqa of its own); the wrapper is removed afterwards
    monkeypatch.setattr(attention, "transformers_packs_gqa", lambda: False)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"])
    calls, made = [], []
    real = attention.packed_decode_attention
    monkeypatch.setattr(attention, "packed_decode_attention",
                        lambda *a: calls.append(1) or real(*a))
    where = torch.where   # additive masks made (attention.additive_mask's one torch.where)
    monkeypatch.setattr(torch, "where", lambda *a, **k: made.append(1) or where(*a, **k))
    model, other = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def decode(m):
        return greedy_static_logits(m, ids)

    want = decode(model)
    assert attention.pack_gqa_decode(model)
    assert not calls
    made.clear()
    got = decode(model)
    assert len(calls) == 4 * 2              # the 4 single-token steps, 2 layers each
    assert len(made) <= 4 + 1               # the mask made additive once a step (+ prefill's)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():            # as compress bench and bench_e2e run: masks
        made.clear()                        # without a version counter
        torch.testing.assert_close(decode(model), want, rtol=1e-5, atol=1e-5)
        assert len(made) <= 4 + 1
    calls.clear()
    decode(other)
    assert not calls                        # another model keeps transformers' attention
    assert attention.pack_gqa_decode(model)   # a second call wraps nothing twice
    assert not getattr(ALL_ATTENTION_FUNCTIONS["sdpa"].compress_original, "compress_original",
                       None)


@pytest.mark.skipif(not attention.transformers_packs_gqa(),
                    reason="transformers < 5.24: the heads are packed by attention.py (above)")
def test_with_transformers_own_packing_the_mask_is_made_additive_once(monkeypatch):
    """transformers >= 5.24 packs the heads itself: the wrapper hands it the step's mask made
    additive once; greedy static-cache decode logits bit for bit transformers' own."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"])
    made, packed = [], []
    real = attention.additive_mask
    monkeypatch.setattr(attention, "additive_mask", lambda *a: made.append(1) or real(*a))
    monkeypatch.setattr(attention, "packed_decode_attention", lambda *a: packed.append(1))
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def decode():
        return greedy_static_logits(model, ids)

    want = decode()
    assert attention.pack_gqa_decode(model)
    got = decode()
    assert len(made) == 4 * 2 and not packed   # every decode layer, transformers' packing
    assert torch.equal(got, want)


def test_the_split_key_kernel_runs_every_decode_step_with_sdpas_logits(monkeypatch):
    """attention.DECODE_KERNEL (compress/kernels/decode_attention.py, here the interpreter's):
    every single-token step of the given model, whichever transformers packs the heads,
    greedy static-cache decode logits as SDPA's."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    from compress.kernels import decode_attention

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"])
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    calls = []
    real = decode_attention.decode_attention
    monkeypatch.setattr(decode_attention, "decode_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llama(head_dim=16)             # the kernel's smallest head
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def decode():
        return greedy_static_logits(model, ids)

    want = decode()
    assert attention.pack_gqa_decode(model)
    monkeypatch.setattr(attention, "DECODE_KERNEL", True)
    got = decode()
    assert len(calls) == 4 * 2                  # the 4 single-token steps, 2 layers each
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_nothing_to_do_without_grouped_heads(monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=4)
    config._attn_implementation = "sdpa"
    monkeypatch.setattr(attention, "transformers_packs_gqa", lambda: False)
    assert not attention.pack_gqa_decode(AutoModelForCausalLM.from_config(config))
    eager = tiny_llama()
    eager.config._attn_implementation = "eager"
    assert not attention.pack_gqa_decode(eager)
