"""AWQ-style scaling: the search on random matrices, exact folding on a small Llama (GQA)."""

from __future__ import annotations

import torch
from support import tiny_llama

from compress.formats import WeightFormat, codec
from compress.passes import awq

INT4 = WeightFormat(type="int", group_size=32)


def _quantizer(fmt):
    return lambda w: codec(fmt).quantize(w, fmt).dequantize()


def test_output_error_is_the_token_sum():
    g = torch.Generator().manual_seed(0)
    x, w, w_q = torch.randn(200, 16, generator=g), torch.randn(8, 16, generator=g), \
        torch.randn(8, 16, generator=g)
    direct = float(((x @ (w_q - w).T) ** 2).sum(1).mean())
    assert abs(awq.output_error(w, w_q, x.T @ x / 200) - direct) < 1e-3 * direct


def test_search_protects_salient_channels():
    """A few input channels carry large activations: scaling them up lowers the output error of
    the quantized layer, and the search finds it (alpha > 0, error well below plain RTN)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 128, generator=g)
    x[:, :4] *= 30                                           # salient channels
    w = torch.randn(64, 128, generator=g) * 0.02
    G = x.T @ x / len(x)
    s, alpha, before, after = awq.search_scale(x.abs().mean(0), G, [(w, _quantizer(INT4))])
    assert alpha > 0 and after < 0.8 * before
    assert s[:4].min() > s[4:].max()                          # salient channels scaled up
    # alpha = 0 is on the grid: the search never does worse than plain quantization
    flat = torch.ones(128)
    _, _, before, after = awq.search_scale(flat, G, [(w, _quantizer(INT4))])
    assert after <= before


def test_gqa_expand_matches_repeat_kv():
    repeat, head_dim, kv = 3, 4, 2
    s = torch.arange(kv * head_dim, dtype=torch.float32)
    expanded = awq.gqa_expand(repeat, head_dim)(s).view(kv * repeat, head_dim)
    for head in range(kv * repeat):                           # query head h reads kv head h//rep
        assert torch.equal(expanded[head], s.view(kv, head_dim)[head // repeat])
    stats = expanded.reshape(-1)
    assert torch.equal(awq.gqa_reduce(stats, repeat, head_dim), s)


def test_folding_keeps_the_float_model_exact():
    """Every mapping of a GQA Llama folded with random scales leaves the logits unchanged."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    from compress.models import arch_for

    arch = arch_for(model.config)
    found, skipped = awq.mappings(arch, model.config)
    assert len(found) == 4 and not skipped
    g = torch.Generator().manual_seed(2)
    for layer in model.model.layers:
        for mapping in found:
            prev = layer.get_submodule(mapping.prev)
            channels = prev.weight.shape[0]
            s = torch.rand(channels, generator=g) + 0.5
            expand = awq.gqa_expand(*mapping.heads) if mapping.heads else (lambda v: v)
            awq.divide_output(prev, s)
            for name in mapping.linears:
                awq.scale_input_columns(layer.get_submodule(name), expand(s))
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() < 1e-4
