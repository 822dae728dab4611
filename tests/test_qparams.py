"""Group-parameter search (compress/passes/qparams.py) on random matrices."""

from __future__ import annotations

import pytest
import torch

from compress.formats import WeightFormat, codec
from compress.passes import qparams

FORMATS = [WeightFormat(type="int", bits=4, group_size=32, symmetric=True),
           WeightFormat(type="int", bits=4, group_size=32, symmetric=False),
           WeightFormat(type="nvfp4", group_size=16), WeightFormat(type="mxfp4", group_size=32)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_mse_search_never_worse_than_minmax_and_usually_better(fmt):
    torch.manual_seed(0)
    w = torch.randn(64, 8, fmt.group_size) * torch.rand(64, 8, 1)
    w[0, 0, 0] = 8.0                                   # an outlier worth clipping
    importance = torch.rand(fmt.group_size) + 0.1
    gs = codec(fmt).tensor_scale(w, fmt)
    base = qparams.quant_error(w, qparams.group_params(w, fmt, gs), importance)
    searched = qparams.quant_error(w, qparams.group_params(w, fmt, gs, importance, "mse"),
                                   importance)
    assert (searched <= base + 1e-9).all()
    # MXFP4's power-of-two scales leave the search only one step down: a smaller gain
    assert searched.sum() < (0.995 if fmt.type == "mxfp4" else 0.97) * base.sum()


def test_minmax_is_the_codec_rule():
    fmt = FORMATS[0]
    w = torch.randn(4, 2, 32)
    p, ref = qparams.group_params(w, fmt), codec(fmt).group_params(w, fmt)
    assert torch.equal(p.scale, ref.scale) and p.zero is None and ref.zero is None


def test_gptq_static_groups_keep_the_minmax_scales_of_the_original_weights():
    from compress.passes.gptq import gptq_quantize

    torch.manual_seed(1)
    fmt = WeightFormat(type="int", bits=4, group_size=16, symmetric=True)
    w, x = torch.randn(8, 64), torch.randn(512, 64)
    H = 2 * x.T @ x / 512
    q, _ = gptq_quantize(w, H, fmt, static_groups=True)
    assert torch.allclose(q.scale, codec(fmt).quantize(w, fmt).scale)
    dynamic, _ = gptq_quantize(w, H, fmt)
    assert not torch.allclose(dynamic.scale, q.scale)     # the default adapts them


def test_gptq_uses_a_given_nvfp4_global_scale():
    from compress.passes.gptq import gptq_quantize

    fmt = WeightFormat(type="nvfp4", group_size=16)
    w, x = torch.randn(8, 32), torch.randn(256, 32)
    gs = codec(fmt).tensor_scale(3 * w, fmt)        # as if a fused sibling had larger weights
    q, _ = gptq_quantize(w, 2 * x.T @ x / 256, fmt, global_scale=gs)
    assert torch.equal(q.global_scale, gs)
