"""Any causal LM transformers builds, without an Arch table row: Gemma 3, Phi-3, Qwen3, MoE
(Mixtral, Qwen3-MoE, Qwen2-MoE with a shared expert, gpt-oss), OLMo 2 and Granite (families
the table never named). Tiny random-weight models built from configs: hidden 64, 2 layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compress
from compress.errors import UsageError

SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256)
FAMILY = {
    # sliding window 8 < the 32 calibration tokens: layer 0 (sliding) and layer 1 (global)
    # see different masks and rotary tables
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(pad_token_id=0),                   # fused qkv_proj and gate_up_proj Linears
    "qwen3": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "olmo2": {},                                    # norms after attention / MLP
    "granite": {},
    # experts fused with biases, gate/up interleaved, clamped SwiGLU; attention sinks
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
}
MOE = ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss")
CALIBRATION = {"samples": 8, "seq_len": 32, "batch_size": 4}


def tiny(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **SHAPE, **FAMILY[family])
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer alone (read from the GGUF): calibration text -> ids < 49152."""
    from transformers import AutoTokenizer

    from compress.runtime.checkpoint import Checkpoint

    source = Checkpoint.open("smollm2-135m")
    return AutoTokenizer.from_pretrained(source.path, **source.pretrained_kwargs())


def apply(model, tokenizer, out: Path, *passes: dict) -> dict:
    from compress.recipe import parse_recipe

    recipe = parse_recipe({"calibration": CALIBRATION, "passes": list(passes)})
    # float32 artifact: the tiny models are float32, and the logits are compared exactly
    return compress.apply(model, recipe, out, tokenizer=tokenizer, save_dtype="float32")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))


def test_layers_and_embeddings_found_in_the_model():
    from compress.models import ARCHES, arch_for

    for family in ("gemma3_text", "olmo2", "mixtral"):
        assert family not in ARCHES
        arch = arch_for(tiny(family).config)
        assert (arch.known, arch.layers, arch.embed, arch.lm_head) == (
            False, "model.layers", "model.embed_tokens", "lm_head")


def test_calibrator_replays_each_layer_with_its_own_arguments(tokenizer):
    """Layer i's calibration inputs are the model's own hidden states before layer i: Gemma 3's
    global layer 1 is replayed with its own mask and rotary table, not the sliding layer 0's."""
    from compress.calib import CalibrationConfig, Calibrator, calibration_windows
    from compress.models import arch_for

    model = tiny("gemma3_text")
    ids = calibration_windows(tokenizer, CalibrationConfig(**CALIBRATION))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    seen, wrong = [], None
    # checked while each step is current: moving on replaces its inputs by its outputs
    for step in Calibrator(model, arch_for(model.config), ids, batch_size=4):
        torch.testing.assert_close(torch.cat(step.inputs), hidden[step.index])
        seen.append(step.index)
        if step.index == 0:
            first_kwargs = step.kwargs
        if step.index == 1:
            # layer 1 replayed with layer 0's arguments (sliding-window mask) computes otherwise
            own, step.kwargs = step.kwargs, first_kwargs
            wrong = torch.cat(step.run(keep_outputs=True))
            step.kwargs = own
    assert seen == list(range(len(hidden) - 1))
    assert not torch.allclose(wrong, hidden[2], atol=1e-3)


@pytest.mark.parametrize("family", list(FAMILY))
def test_gptq_apply_save_load_same_logits(family, tokenizer, tmp_path):
    model = tiny(family)
    before = logits(model, IDS)
    report = apply(model, tokenizer, tmp_path / "a",
                   {"pass": "quantize", "method": "gptq", "group_size": 32})["passes"][0]
    modules = report["modules"]
    assert modules and all(m["method"] == "gptq" for m in modules.values())
    assert not any(name.rsplit(".", 1)[-1] in ("gate", "shared_expert_gate") for name in modules)
    if family in MOE:   # every expert, per expert, calibrated on its own tokens
        down = "w2" if family == "mixtral" else "down_proj"   # the checkpoints' names
        assert f"model.layers.1.mlp.experts.3.{down}" in modules
        assert sum(".experts." in n for n in modules) == 2 * 4 * 3
    after = logits(model, IDS)
    assert not torch.allclose(after, before, atol=1e-3)      # it was quantized
    loaded = compress.load(tmp_path / "a")
    assert torch.equal(logits(loaded, IDS), after)


@pytest.mark.parametrize("family", ["phi3", "olmo2", "mixtral", "qwen3_moe"])
def test_artifact_loads_in_plain_transformers(family, tokenizer, tmp_path):
    """compressed-tensors decompresses; transformers fuses the per-expert tensors (named as
    the family's checkpoints name them: Mixtral's w1/w3/w2) into its 3D experts."""
    from transformers import AutoModelForCausalLM

    model = tiny(family)
    apply(model, tokenizer, tmp_path / "a", {"pass": "quantize", "group_size": 32})
    ours = logits(model, IDS)
    theirs = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "a"), IDS)
    assert (theirs - ours).abs().max() < 1e-3 * ours.abs().max()


@pytest.mark.parametrize("passes", [
    [{"pass": "quantize", "format": "nvfp4"}],
    [{"pass": "quantize", "format": "mxfp4"}],
    [{"pass": "sparsify", "method": "sparsegpt", "storage": "dense"},
     {"pass": "quantize", "method": "gptq", "group_size": 32}],
    [{"pass": "sparsify", "method": "wanda"}],
], ids=["nvfp4", "mxfp4", "sparsegpt+gptq", "wanda-2:4"])
def test_moe_experts_formats_and_sparsity(passes, tokenizer, tmp_path):
    model = tiny("qwen2_moe")
    report = apply(model, tokenizer, tmp_path / "a", *passes)
    for pass_report in report["passes"]:
        assert "model.layers.0.mlp.experts.2.up_proj" in pass_report["modules"]
    expert = model.model.layers[0].mlp.experts[2].up_proj
    if passes[0]["pass"] == "sparsify":
        from compress.runtime.modules import QuantizedLinear, Sparse24Linear

        weight = (expert.dequantized_weight() if isinstance(expert, QuantizedLinear) else
                  expert.dense_weight() if isinstance(expert, Sparse24Linear) else expert.weight)
        assert ((weight.reshape(-1, 4) != 0).sum(-1) <= 2).all()
    assert torch.equal(logits(compress.load(tmp_path / "a"), IDS), logits(model, IDS))


def test_experts_with_too_few_tokens_fall_back_to_rtn(tokenizer, tmp_path):
    """256 calibration tokens, top-2 of 4 experts: each expert sees about 128 < 200."""
    model = tiny("mixtral")
    report = apply(model, tokenizer, tmp_path / "a", {"pass": "quantize", "method": "gptq",
                                                      "group_size": 32, "min_tokens": 200})
    summary, modules = report["passes"][0]["summary"], report["passes"][0]["modules"]
    assert summary["few_tokens_rtn"] and all(".experts." in n for n in summary["few_tokens_rtn"])
    assert all(0 < count < 200 for count in summary["few_tokens_rtn"].values())
    assert modules["model.layers.0.self_attn.q_proj"]["method"] == "gptq"
    assert modules["model.layers.0.mlp.experts.0.w1"]["method"] == "rtn"


def test_split_experts_compute_what_the_fused_ones_did():
    from compress.runtime.moe import ExpertMLPs

    model = tiny("mixtral")
    before = logits(model, IDS)
    compress.models.split_experts(model)
    assert isinstance(model.model.layers[0].mlp.experts, ExpertMLPs)
    torch.testing.assert_close(logits(model, IDS), before)


def test_awq_infers_norm_mappings_only_where_they_fold(tokenizer, tmp_path):
    """Granite's RMSNorm folds 1/s into its weight: both norms map; Gemma's (1 + w) norm does
    not fold exactly, so none is used (and the logits stay those of the saved model)."""
    found = {}
    for family in ("granite", "gemma3_text"):
        model = tiny(family)
        report = apply(model, tokenizer, tmp_path / family,
                       {"pass": "quantize", "awq": True, "group_size": 32})
        found[family] = report["passes"][0]["summary"]["awq"]["mappings"]
        assert torch.equal(logits(compress.load(tmp_path / family), IDS), logits(model, IDS))
    assert found == {"granite": 4, "gemma3_text": 0}


def test_family_layout_passes_refuse_an_unknown_family_in_one_line(tokenizer, tmp_path):
    with pytest.raises(UsageError, match=r"^prune_heads needs the attention/MLP layout .*'olmo2'"):
        apply(tiny("olmo2"), tokenizer, tmp_path / "a",
              {"pass": "prune_heads", "uniform": 1}, {"pass": "quantize", "group_size": 32})
    assert not (tmp_path / "a").exists()


def test_readme_support_table_is_the_generated_one():
    from compress.support import table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table() in readme


def test_experts_of_an_unsplittable_layout_are_reported_not_silently_kept(tokenizer, tmp_path,
                                                                           capsys):
    """A fused experts module of a layout compress does not know (here gpt-oss's with one more
    3D parameter) cannot be split into Linears: it stays in 16 bits, and the run says so."""
    model = tiny("gpt_oss")
    for layer in model.model.layers:
        layer.mlp.experts.register_parameter(
            "extra", torch.nn.Parameter(torch.zeros(4, 2, 2), requires_grad=False))
    report = apply(model, tokenizer, tmp_path / "o", {"pass": "quantize", "format": "int4",
                                                      "group_size": 32})
    summary = report["passes"][0]["summary"]
    assert summary["experts_left_16bit"] == 2 and summary["modules"] > 0
    err = " ".join(capsys.readouterr().err.split())
    assert "2 fused expert modules (GptOssExperts)" in err and "stay in 16 bits" in err


def test_gpt_oss_experts_split_with_biases_and_their_gated_unit():
    """gpt-oss's experts (gate/up interleaved, biases, clamped SwiGLU) split into per-expert
    Linears with biases that compute what the fused module did (biases made non-zero: the
    random init leaves them at zero)."""
    from compress.runtime.artifact import structure
    from compress.runtime.moe import ExpertMLPs

    model = tiny("gpt_oss")
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("_bias") and ".experts." in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    before = logits(model, IDS)
    compress.models.split_experts(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertMLPs) and experts[1].up_proj.bias is not None
    assert structure(model)["experts"]["model.layers.0.mlp.experts"]["layout"] == "gpt_oss"
    torch.testing.assert_close(logits(model, IDS), before)
