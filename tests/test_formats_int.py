"""INT quantization math and packing, against compressed-tensors' own implementation."""

import pytest
import torch

from compress.formats import WeightFormat, codec


def sqnr_db(w, w_q):
    return float(10 * torch.log10(w.pow(2).sum() / (w - w_q).pow(2).sum()))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_round_trip_matches_compressed_tensors(bits, symmetric, group_size):
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    torch.manual_seed(bits + group_size if group_size else bits)
    fmt = WeightFormat(bits=bits, group_size=group_size, symmetric=symmetric)
    w = torch.randn(40, 256)
    q = codec(fmt).quantize(w, fmt)
    tensors = codec(fmt).pack(q)
    assert torch.equal(tensors["weight_packed"], pack_to_int32(q.codes, bits))
    back = codec(fmt).unpack(tensors, fmt)
    assert torch.equal(back.codes, unpack_from_int32(tensors["weight_packed"], bits, w.shape))
    assert torch.equal(back.codes, q.codes)
    if not symmetric:
        assert torch.equal(back.zero, q.zero)
    # 6 dB per bit, minus the cost of coarser groups: a sanity floor on the signal/noise ratio
    assert sqnr_db(w, back.dequantize()) > {4: 17, 8: 40}[bits]


def test_rtn_error_within_half_a_step():
    fmt = WeightFormat(bits=4, group_size=64, symmetric=False)
    w = torch.randn(16, 128)
    q = codec(fmt).quantize(w, fmt)
    step = q.scale.repeat_interleave(64, dim=1)
    assert ((w - q.dequantize()).abs() <= step / 2 + 1e-6).all()


def test_zeros_stay_exactly_zero():
    """Sparse weights keep their zeros under quantization (the 2:4 + INT4 contract)."""
    w = torch.randn(8, 64)
    w[:, ::2] = 0
    for symmetric in (True, False):
        fmt = WeightFormat(bits=4, group_size=32, symmetric=symmetric)
        assert (codec(fmt).quantize(w, fmt).dequantize()[:, ::2] == 0).all()


def test_format_validation():
    with pytest.raises(ValueError):
        WeightFormat(type="nvfp4", group_size=32)
    assert WeightFormat(bits=4, group_size=64).bits_per_weight(576) == 4 + 16 / 64
