"""The static KV cache's update in one launch (compress/kernels/kv_cache.py) against
transformers' writes, and its wiring (compress/runtime/kv_cache.py): a decode through a static
cache gives the same tokens and logits; only the fused model takes the kernel."""

from __future__ import annotations

import pytest
import torch

from compress.kernels.kv_cache import static_cache_write, static_cache_write_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def step_states(b, h, t, dk, dv, dtype, rng):
    """k, v of t tokens, [B, H, T, D] views of [B, T, H, D] rows as attention layers pass."""
    k = torch.randn(b, t, h, dk, generator=rng).to(dtype).transpose(1, 2)
    v = torch.randn(b, t, h, dv, generator=rng).to(dtype).transpose(1, 2)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,h,dk,dv", [(1, 2, 16, 16), (2, 3, 24, 8)])
def test_writes_and_counter_are_transformers(dtype, b, h, dk, dv, rng):
    """Steps of 3, 1, 2 tokens: the cache's keys/values and length after each step are the
    reference's (index_copy_ at arange + length), the arrival counter back at zero."""
    s = 9
    caches = [(torch.randn(b, h, s, dk, generator=rng).to(dtype),
               torch.randn(b, h, s, dv, generator=rng).to(dtype)) for _ in range(2)]
    caches[1] = (caches[0][0].clone(), caches[0][1].clone())
    length, length_ref = torch.tensor(1), torch.tensor(1)
    arrivals = torch.zeros(1, dtype=torch.int32)
    for t in (3, 1, 2):
        k, v = step_states(b, h, t, dk, dv, dtype, rng)
        static_cache_write(*caches[0], k, v, length, arrivals)
        static_cache_write_ref(*caches[1], k, v, length_ref)
        assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
        assert length.item() == length_ref.item() and arrivals.item() == 0
    assert length.item() == 7


def test_nothing_is_written_past_the_end(rng):
    """A step that runs past the cache: the tokens that fit are written, the rest dropped
    (index_copy_ would stop with an out-of-range error), the counter moved on."""
    keys, values = torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)
    k, v = step_states(1, 2, 3, 8, 8, torch.float32, rng)
    length, arrivals = torch.tensor(2), torch.zeros(1, dtype=torch.int32)
    static_cache_write(keys, values, k, v, length, arrivals)
    assert torch.equal(keys[:, :, 2:], k[:, :, :2]) and torch.equal(values[:, :, 2:], v[:, :, :2])
    assert not keys[:, :, :2].any() and length.item() == 5


def test_bad_inputs_are_refused(rng):
    keys, values = torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)
    k, v = step_states(1, 2, 1, 8, 8, torch.float32, rng)
    arrivals = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache's dtype"):
        static_cache_write(keys, values, k.half(), v, torch.tensor(0), arrivals)
    with pytest.raises(ValueError, match="contiguous"):
        static_cache_write(keys.transpose(1, 2), values, k, v, torch.tensor(0), arrivals)


def tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16)
    return AutoModelForCausalLM.from_config(config).eval()


def test_static_cache_decode_takes_one_launch_a_layer(monkeypatch):
    """fuse_static_cache: greedy decode through a static cache gives the unfused tokens and
    logits with one kernel call a layer a step (the prompt's update stays transformers'); a
    second model in the process keeps transformers' update; where kernels do not run nothing
    is fused."""
    from transformers.cache_utils import StaticLayer

    from compress.kernels import kv_cache as kernels
    from compress.runtime.kv_cache import fuse_static_cache

    monkeypatch.setattr(StaticLayer, "update", StaticLayer.update)   # restored after the test
    model, other = tiny_llama(), tiny_llama()
    monkeypatch.setenv("COMPRESS_KERNELS", "auto")
    assert not fuse_static_cache(model)                  # CPU tensors: transformers' update
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    calls = []
    real = kernels.static_cache_write
    monkeypatch.setattr(kernels, "static_cache_write", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))

    def decode(m):
        out = m.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0,
                         cache_implementation="static")
        return out.sequences, torch.stack(out.logits)

    with torch.no_grad():
        want = decode(model)
        assert fuse_static_cache(model) and fuse_static_cache(model)   # twice: wrapped once
        calls.clear()
        got = decode(model)
        assert len(calls) == 2 * 3                       # 2 layers x 3 decode steps
        calls.clear()
        decode(other)
        assert not calls                                 # not fused: transformers' update
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
