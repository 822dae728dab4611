"""The one format table and the one Codec interface: every reader agrees with the table, every
codec has the same methods, the registry refuses a second codec of one name."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from compress.formats import CODECS, FORMATS, Codec, WeightFormat, codec, register_codec
from compress.kernels import fp4 as fp4_kernel
from compress.passes.quantize import QuantizeConfig


def _format_of(name: str) -> WeightFormat:
    return QuantizeConfig(format=name, group_size=32).weight_format()


def test_recipe_schema_offers_exactly_the_table():
    allowed = typing.get_args(QuantizeConfig.model_fields["format"].annotation)
    assert set(allowed) == set(FORMATS)
    for name, row in FORMATS.items():
        fmt = _format_of(name)
        assert (fmt.type, fmt.bits, fmt.row.name) == (row.codec, row.bits, name)
        assert fmt.group_size == (row.group_size or 32)


def test_kernels_read_group_sizes_from_the_table():
    assert fp4_kernel.FORMATS == {n: r.group_size for n, r in FORMATS.items() if r.kernel == "fp4"}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_codec_round_trips_through_the_same_calls(name):
    """quantize -> pack -> unpack -> dequantize, and group_params/encode/decode agree with
    quantize, called identically for every format (no per-format keyword)."""
    fmt = _format_of(name)
    c = codec(fmt)
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = c.quantize(w, fmt)
    packed = c.pack(q, torch.bfloat16)
    if fmt.row.scale_dtype == "model":
        assert packed["weight_scale"].dtype == torch.bfloat16
    else:
        assert packed["weight_scale"].dtype == fmt.row.stored_scale_dtype(torch.bfloat16)
    assert c.format_name(fmt) == fmt.row.ct_format
    g = fmt.group_for(64)
    p = c.group_params(w.reshape(8, -1, g), fmt, c.tensor_scale(w, fmt))
    codes = c.encode(w.reshape(8, -1, g), p)
    assert torch.equal(codes.reshape(8, 64), q.codes)
    assert torch.equal(c.decode(codes, p).reshape(8, 64), q.dequantize())
    again = c.unpack(c.pack(q, torch.float32), fmt)
    assert torch.equal(again.dequantize(), q.dequantize())
    assert (q.global_scale is not None) == fmt.row.tensor_scale


def test_codecs_share_one_signature_per_method():
    codec(WeightFormat())  # import every codec module
    methods = ["tensor_scale", "group_params", "encode", "decode", "pack", "unpack",
               "scheme_args", "quantize", "dequantize"]
    for name in methods:
        signatures = {str(inspect.signature(getattr(type(c), name)).replace(
            return_annotation=inspect.Signature.empty)).replace(" ", "") for c in CODECS.values()}
        params = {tuple(inspect.signature(getattr(type(c), name)).parameters)
                  for c in CODECS.values()}
        assert len(params) == 1, (name, signatures)
    assert all(isinstance(c, Codec) for c in CODECS.values())


def test_registry_refuses_a_duplicate_name():
    codec(WeightFormat())
    with pytest.raises(ValueError, match="already registered"):
        register_codec(type(CODECS["int"])())
