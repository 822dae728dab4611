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
