"""Device mistakes made visible without a GPU: inside `with torch.device("meta")` a tensor a
function creates without an explicit device lands on meta, and mixing it with the CPU inputs
fails (or leaves a meta output). Every pass's math must take devices from its inputs, so that
on CUDA nothing is silently created on the CPU. (GPTQ and SparseGPT: tests/test_gptq.py and
tests/test_sparsify.py.)"""

from __future__ import annotations

import pytest
import torch

from compress.formats import WeightFormat, codec
from compress.passes import awq
from compress.passes.prune_heads import contribution, gram_scores
from compress.passes.rmsnorm import (
    center_outputs,
    center_rows,
    compress_reader,
    compress_writer,
    crms_norm,
    fold_norm_into_linear,
)

FORMATS = [WeightFormat(type="int", group_size=32), WeightFormat(type="int", group_size=32,
                                                                 symmetric=False),
           WeightFormat(type="nvfp4", group_size=16), WeightFormat(type="mxfp4", group_size=32)]


def on_cpu(*tensors) -> bool:
    return all(t is None or t.device.type == "cpu" for t in tensors)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_codecs_quantize_on_their_inputs_device(fmt):
    """Round-to-nearest and decoding. (pack writes a CPU `weight_shape` on purpose: metadata.)"""
    w = torch.randn(8, 64)
    c = codec(fmt)            # import the codec (module-level tables) outside the meta context
    with torch.device("meta"):
        q = c.quantize(w, fmt)
        w_q = q.dequantize()
    assert on_cpu(q.codes, q.scale, q.zero, q.global_scale, w_q)
    assert torch.equal(c.unpack(c.pack(q), fmt).dequantize(), w_q)


def test_awq_search_on_its_inputs_device():
    fmt = WeightFormat(type="int", group_size=32)
    x = torch.randn(256, 64) * torch.linspace(0.1, 4, 64)
    G, mean_abs = x.T @ x / len(x), x.abs().mean(0)
    modules = [(torch.randn(16, 64), lambda w: codec(fmt).quantize(w, fmt).dequantize())]
    codec(fmt)
    with torch.device("meta"):
        s, _alpha, before, after = awq.search_scale(mean_abs, G, modules, grid=4)
    assert on_cpu(s) and after <= before


def test_head_scores_on_their_inputs_device():
    x, o = torch.randn(10, 4 * 8), torch.randn(16, 4 * 8)
    with torch.device("meta"):
        scores = gram_scores(x.T @ x, o, [[0], [1, 2], [3]], 8)
        part = contribution(x, o, [1, 2], 8)
    assert on_cpu(scores, part)


def test_rmsnorm_math_on_its_inputs_device():
    w, b, gamma = torch.randn(12, 12), torch.randn(12), torch.rand(12) + 0.5
    with torch.device("meta"):
        outs = [center_rows(w), *center_outputs(w, b), *fold_norm_into_linear(w, b, gamma, b),
                *compress_writer(w, b), compress_reader(w), crms_norm(w[:, :-1], 12, 1e-6)]
    assert on_cpu(*outs)


def test_calibration_capture_leaves_the_output_head_where_it_is():
    """The capture moves what runs before the layers to the calibration device, not lm_head
    (never run: the capture stops at the last layer; 1 GiB of an 8B model's GPU memory)."""
    from support import tiny_llama

    from compress.calib import _move_non_layers
    from compress.models import arch_for, decoder_layers

    model = tiny_llama(tie_word_embeddings=False)
    layers = decoder_layers(model, arch_for(model.config))
    moved = _move_non_layers(model, layers, torch.device("meta"))
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model.lm_head.weight.device.type == "cpu"
    assert model.lm_head not in moved
