"""The peer script's checks (evaluate/peer_llmcompressor.py): it must refuse an untrustworthy
peer, and run the same steps on our side as on llm-compressor's."""

import importlib.util
from pathlib import Path

import torch
from torch import nn

from compress.passes.quantize import QuantizeConfig
from compress.passes.sparsify import SparsifyConfig

SCRIPT = Path(__file__).resolve().parents[1] / "evaluate" / "peer_llmcompressor.py"
spec = importlib.util.spec_from_file_location("peer_llmcompressor", SCRIPT)
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)


def test_peer_gptq_worse_than_its_rtn_is_refused():
    row = {"rtn": {"perplexity": 20.0}, "gptq": {"perplexity": 20.5},
           "awq+gptq": {"perplexity": 18.0}}
    problems = peer.peer_problems("int4-sym-g64", row)
    assert len(problems) == 1 and "gptq (20.500) is not better than its rtn" in problems[0]


def test_peer_that_lost_the_24_pattern_is_refused():
    row = {"sparsegpt+rtn": {"perplexity": 40.0, "is_24": True},
           "sparsegpt+gptq": {"perplexity": 30.0, "is_24": False}}
    assert peer.peer_problems("sparse24-int4-sym-g64", row) == [
        "sparse24-int4-sym-g64 sparsegpt+gptq: llm-compressor's weights are not 2:4 sparse"]
    row["sparsegpt+gptq"]["is_24"] = True
    assert peer.peer_problems("sparse24-int4-sym-g64", row) == []


def test_is_24_checks_every_group_of_four():
    model = nn.Sequential(nn.Linear(8, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4]] * 3))
    assert peer.is_24(model)
    with torch.no_grad():
        model[0].weight[1, 1] = 5.0       # three non-zeros in the first four inputs of row 1
    assert not peer.is_24(model)


def test_our_steps_follow_the_method_name():
    options = {"act_order": True, "scale_search": "mse"}
    sparse, quant = peer.our_passes("sparse24-int4-sym-g64", "sparsegpt+gptq", options)
    assert isinstance(sparse, SparsifyConfig) and sparse.method == "sparsegpt"
    assert sparse.pattern == "2:4" and sparse.ignore == ["lm_head"]
    assert isinstance(quant, QuantizeConfig) and quant.method == "gptq" and not quant.awq
    assert (quant.format, quant.group_size, quant.symmetric) == ("int4", 64, True)
    (awq,) = peer.our_passes("nvfp4", "awq+gptq", options)
    assert awq.awq and awq.method == "gptq" and awq.format == "nvfp4"
    (rtn,) = peer.our_passes("int4-asym-g192", "rtn", options)
    assert rtn.method == "rtn" and not rtn.symmetric and rtn.group_size == 192
    (wanda,) = peer.our_passes("sparse24", "wanda", options)
    assert isinstance(wanda, SparsifyConfig) and wanda.method == "wanda"


def test_every_setting_has_methods_and_a_reference():
    for setting in peer.SETTINGS:
        methods = peer.methods_of(setting, awq=True)
        assert len(methods) >= 2, setting      # a reference and at least one method to check


def test_our_plain_state_holds_the_weights_we_compute_with():
    """The plain checkpoint lm-eval reads must be our model's arithmetic: a QuantizedLinear
    becomes its dequantized weight (and bias), other parameters stay as they are."""
    from compress.formats import WeightFormat, codec
    from compress.runtime.modules import QuantizedLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8))
    fmt = WeightFormat(type="int", bits=4, group_size=32, symmetric=True)
    q = codec(fmt).quantize(model[0].weight.detach(), fmt)
    model[0] = QuantizedLinear.from_quantized(q, model[0].bias, scale_dtype=torch.float32)
    state = peer.our_plain_state(model)
    assert set(state) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert torch.equal(state["0.weight"], q.dequantize().float())
    x = torch.randn(3, 64)
    plain = nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8))
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), model(x))


def test_lm_eval_table_ratio_recovery_and_refusal():
    floats = {"tasks": {"stdlib_docs": {"word_perplexity": 10.0},
                        "stdlib_lastword": {"acc": 0.5}}}
    row = {"setting": "nvfp4", "method": "gptq",
           "llmc": {"perplexity": 20.0, "saved_perplexity": 20.0},
           "ours": {"perplexity": 18.0, "saved_perplexity": 18.0},
           "lm_llmc": {"tasks": {"stdlib_docs": {"word_perplexity": 14.0},
                                 "stdlib_lastword": {"acc": 0.40}}},
           "lm_ours": {"tasks": {"stdlib_docs": {"word_perplexity": 12.0},
                                 "stdlib_lastword": {"acc": 0.45}}}}
    header, _, docs, last = peer.lm_eval_table(floats, [row], gate=0.9)
    assert "gate 0.9" in header
    # loss ratio (12 - 10) / (14 - 10); recovery 10/14 and 10/12, both under the gate
    assert "| 0.50 | 0.714 | 0.833 | FAIL/FAIL |" in docs
    # accuracy: (0.45 - 0.5) / (0.40 - 0.5); recovery 0.8 and 0.9 (ours at the gate passes)
    assert "| 0.50 | 0.800 | 0.900 | FAIL/pass |" in last
    assert peer.lm_eval_problems([row]) == []
    row["ours"]["saved_perplexity"] = 18.1      # the saved checkpoint is not the measured model
    assert peer.lm_eval_problems([row]) == [
        "nvfp4 gptq ours: saved checkpoint perplexity 18.100000 != row 18.000000"]
