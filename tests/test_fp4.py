"""NVFP4 / MXFP4: exact E2M1 values, bit-identity with compressed-tensors, artifacts HF loads."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.mx_utils import compress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from support import tiny_llama

from compress.formats import GroupParams, WeightFormat, codec
from compress.formats.fp4 import E2M1, e2m1_codes, e2m1_values, pack_codes, unpack_codes

NVFP4 = WeightFormat(type="nvfp4", group_size=16)
MXFP4 = WeightFormat(type="mxfp4", group_size=32)
PRESETS = {"nvfp4": (NVFP4, NVFP4A16), "mxfp4": (MXFP4, MXFP4A16)}


def test_every_e2m1_value_encodes_and_decodes_exactly():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_values(codes)
    expected = torch.cat([E2M1, -E2M1])
    assert torch.equal(values, expected)
    # every value except -0 (code 8, which decodes to 0) encodes back to its own code
    assert torch.equal(e2m1_codes(values)[codes != 8], codes[codes != 8])
    # and through a scale: value * s / s is exact for a power of two s
    for fmt in (NVFP4, MXFP4):
        scale = torch.full((16, 1), 0.25)
        gs = torch.tensor([2.0]) if fmt.type == "nvfp4" else None
        p = GroupParams(fmt, scale, None, gs)
        w = values[:, None] * (scale / (gs if gs is not None else 1))
        q = codec(fmt).encode(w, p)
        assert torch.equal(codec(fmt).decode(q, p), w)


def test_ties_round_to_even_mantissa_like_the_library():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.2, -9.0])
    got = e2m1_values(e2m1_codes(x))
    assert torch.equal(got.abs(), torch.tensor([0, 1, 1, 2, 2, 4, 4, 6, 0, 6.0]))


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.int8)
    packed = pack_codes(codes)
    assert packed.tolist() == [[1 | 2 << 4, 15 | 8 << 4]]
    assert torch.equal(unpack_codes(packed), codes)


def _random_weight(seed: int, out_features: int, in_features: int) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(out_features, in_features) * torch.rand(out_features, 1) * 0.1
    w[0, :32] = 0                                  # an all-zero group
    w[1, 5] = 3.0                                  # an outlier that sets the global scale
    w[2] *= 1e-4                                   # a row far below the global range
    return w


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("seed,shape", [(0, (64, 256)), (1, (17, 96)), (2, (128, 576))])
def test_bit_identical_to_compressed_tensors(kind, seed, shape):
    fmt, preset = PRESETS[kind]
    args = preset["weights"]
    w = _random_weight(seed, *shape)
    wg = w.reshape(shape[0], -1, fmt.group_size)
    gs = generate_gparam(w.min(), w.max()) if kind == "nvfp4" else None
    scale, zero = calculate_qparams(wg.amin(-1), wg.amax(-1), args, global_scale=gs)
    packed_ref = pack_fp4_to_uint8(ct_quantize(w, scale, zero, args, global_scale=gs))

    q = codec(fmt).quantize(w, fmt)
    packed = codec(fmt).pack(q)
    assert torch.equal(packed["weight_packed"], packed_ref)
    assert torch.equal(q.scale, scale)
    if kind == "nvfp4":
        assert torch.equal(packed["weight_global_scale"], gs)
        assert torch.equal(packed["weight_scale"].view(torch.uint8),
                           scale.to(torch.float8_e4m3fn).view(torch.uint8))
    else:
        assert torch.equal(packed["weight_scale"], compress_mx_scale(scale, torch.uint8))
    values = unpack_fp4_from_uint8(packed_ref, shape[0], shape[1], torch.float32)
    assert torch.equal(q.dequantize(), ct_dequantize(values, scale, None, args, torch.float32, gs))
    again = codec(fmt).unpack(packed, fmt)
    assert torch.equal(again.dequantize(), q.dequantize())


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_artifact_config_and_transformers_load(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.calib import CalibrationConfig
    from compress.formats.artifact import save_artifact
    from compress.models import arch_for
    from compress.passes import Context, QuantizeConfig, run_pass
    from compress.runtime.artifact import load_artifact

    model = tiny_llama()
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(), torch.device("cpu"))
    run_pass(ctx, QuantizeConfig(format=kind))
    save_artifact(model, None, tmp_path / kind, "", {})
    qconfig = json.loads((tmp_path / kind / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == f"{kind}-pack-quantized"
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert weights == PRESETS[kind][1]["weights"].model_dump(mode="json")

    ids = torch.randint(0, 256, (2, 16))
    ours = load_artifact(tmp_path / kind)(ids).logits
    assert torch.equal(ours, model(ids).logits)
    # compressed-tensors decompresses FP4 to bfloat16 on CPU: it runs in a bfloat16 model only
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.bfloat16)
    assert hf.model.layers[0].self_attn.q_proj.weight_packed.dtype == torch.uint8
    theirs = hf(ids).logits.float()
    assert (theirs - ours).abs().max() < 0.02 * ours.abs().max()
