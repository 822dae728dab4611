"""prune_heads: exact slicing, GQA validity, artifacts (plain transformers and compress.load),
generation with the KV cache, errors, and real-model quality against random choice."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import compress
from compress.calib import CalibrationConfig
from compress.errors import UsageError
from compress.formats.artifact import save_artifact
from compress.models import arch_for, decoder_layers
from compress.passes import Context, run_pass
from compress.passes.prune_heads import (
    Heads,
    PruneHeadsConfig,
    check_keep,
    count_to_steps,
    heads_of,
    keep_after,
    prune_layer,
    removal_steps,
    select_global,
    slice_projection,
)
from compress.recipe import parse_recipe
from compress.runtime.artifact import structure


def tiny(model_type: str = "llama"):
    """Small random models of several families (exactness only)."""
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": 256, "max_position_embeddings": 128}
    if model_type == "llama":  # GQA: 6 query heads over 2 KV heads, like SmolLM2's 9 over 3
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=16, **common))
    elif model_type == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                 vocab_size=256))
    elif model_type == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            **common))
    elif model_type == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                               num_attention_heads=4, word_embed_proj_dim=64,
                                               **common))
    else:
        model = tf.BertModel(tf.BertConfig(hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, **common))
    return model.eval()


def outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def context(model, ids=None, tokenizer=None, **calibration):
    ctx = Context(model, tokenizer, arch_for(model.config), CalibrationConfig(**calibration),
                  torch.device("cpu"))
    if ids is not None:
        ctx._calib_ids = ids
    return ctx


IDS = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# Slicing is exact

@pytest.mark.parametrize("model_type,q_keep,kv_keep", [
    ("llama", [3, 4, 5], [1]),           # a whole KV group
    ("llama", [0, 2, 3, 5], [0, 1]),     # one query head from each group
    ("gpt2", [0, 2, 3], [0, 2, 3]),      # fused [q][k][v] Conv1D
    ("gpt_neox", [1, 2], [1, 2]),        # fused [head][q, k, v]
    ("opt", [0, 1, 3], [0, 1, 3]),
    ("bert", [0, 3], [0, 3]),
])
def test_pruning_a_silent_head_leaves_outputs_unchanged(model_type, q_keep, kv_keep):
    """Zero the output-projection columns of the heads to remove: they contribute nothing, so
    removing them (rows of q/k/v, columns of o) must give the same outputs."""
    model = tiny(model_type)
    arch = arch_for(model.config)
    layer = decoder_layers(model, arch)[0]
    shape = heads_of(layer, arch)
    o = layer.get_submodule(arch.o)
    for h in set(range(shape.query)) - set(q_keep):
        cols = slice(h * shape.dim, (h + 1) * shape.dim)
        with torch.no_grad():
            (o.weight[cols] if arch.conv1d else o.weight[:, cols]).zero_()
    ids = IDS % model.config.vocab_size
    before = outputs(model, ids)
    params = sum(p.numel() for p in model.parameters())
    assert prune_layer(layer, arch, q_keep, kv_keep) == Heads(len(q_keep), len(kv_keep), shape.dim)
    assert heads_of(layer, arch) == Heads(len(q_keep), len(kv_keep), shape.dim)
    assert sum(p.numel() for p in model.parameters()) < params
    torch.testing.assert_close(outputs(model, ids), before, atol=1e-5, rtol=1e-5)


def test_slice_projection_keeps_rows_columns_and_bias():
    linear = torch.nn.Linear(6, 8)
    rows, cols = torch.tensor([1, 5, 6]), torch.tensor([0, 4])
    new = slice_projection(linear, rows, cols)
    assert (new.in_features, new.out_features) == (2, 3)
    assert torch.equal(new.weight, linear.weight[rows][:, cols])
    assert torch.equal(new.bias, linear.bias[rows])


# ---------------------------------------------------------------------------------------------
# GQA validity and choosing

def test_gqa_validity_is_enforced():
    shape = Heads(query=9, kv=3, dim=64)
    check_keep(shape, [3, 4, 5, 6, 7, 8], [1, 2], "x")                 # two whole groups
    check_keep(shape, [0, 1, 3, 4, 6, 7], [0, 1, 2], "x")              # 2 of 3 in each group
    with pytest.raises(UsageError, match="equal groups"):
        check_keep(shape, [0, 1, 3, 6, 7], [0, 1, 2], "x")             # uneven
    with pytest.raises(UsageError, match="equal groups"):
        check_keep(shape, [0, 1, 2, 3], [0], "x")                      # head 3 reads group 1
    with pytest.raises(UsageError, match="every attention head"):
        check_keep(shape, [], [], "x")
    assert keep_after(shape, [3, 4, 5]) == ([0, 1, 2, 6, 7, 8], [0, 2])
    with pytest.raises(UsageError, match="every head"):
        count_to_steps(3, shape, "kv_group", 0)
    with pytest.raises(UsageError, match="multiple of 3"):
        count_to_steps(2, shape, "query", 0)
    with pytest.raises(UsageError, match="every head"):
        count_to_steps(9, shape, "query", 0)
    assert count_to_steps(6, shape, "query", 0) == 2


def test_query_steps_remove_the_weakest_head_of_every_group():
    shape = Heads(query=6, kv=2, dim=4)
    scores = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.8, 0.3])
    steps = removal_steps(shape, "query", scores)
    assert [heads for _, heads in steps] == [[1, 3], [0, 5]]            # never the last per group
    assert steps[0][0] == pytest.approx(0.3)
    groups = removal_steps(shape, "kv_group", scores)
    assert [heads for _, heads in groups] == [[3, 4, 5]]                # 1.3 < 1.5, never both


def test_global_selection_takes_cheapest_within_caps():
    steps = {0: [(0.1, [0]), (0.2, [1])], 1: [(0.15, [0])], 2: [(0.9, [0])]}
    assert select_global(steps, 3) == {0: 2, 1: 1}
    assert select_global(steps, 3, cap=1) == {0: 1, 1: 1, 2: 1}


# ---------------------------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("spec,message", [
    ({"fraction": 0}, "strictly between 0 and 1"),
    ({"fraction": 1.0}, "strictly between 0 and 1"),
    ({"fraction": 1.5}, "strictly between 0 and 1"),
    ({}, "exactly one target"),
    ({"fraction": 0.2, "uniform": 1}, "exactly one target"),
    ({"uniform": 1, "scorer": "magic"}, "scorer"),
])
def test_bad_configs_are_refused_at_parse_time(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_recipe({"passes": [{"pass": "prune_heads", **spec}]})


def test_prune_heads_must_come_before_quantize():
    with pytest.raises(UsageError, match="must come before quantize"):
        parse_recipe({"passes": [{"pass": "quantize"}, {"pass": "prune_heads", "uniform": 1}]})
    parse_recipe({"passes": [{"pass": "prune_heads", "uniform": 1}, {"pass": "quantize"}]})


def test_removing_every_head_of_a_layer_is_refused_before_any_change():
    model = tiny()
    reference = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match="layer 1 has 2 KV groups"):
        run_pass(context(model, IDS), PruneHeadsConfig(per_layer={0: 1, 1: 2}))
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="layer 5 does not exist"):
        run_pass(context(model, IDS), PruneHeadsConfig(per_layer={5: 1}))
    with pytest.raises(UsageError, match="use unit: kv_group"):
        run_pass(context(tiny("bert"), IDS), PruneHeadsConfig(unit="query", uniform=1))


def test_cli_refuses_a_bad_fraction_with_one_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("passes:\n  - pass: prune_heads\n    fraction: 1.5\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "compress", "apply", str(recipe),
                          "smollm2-135m", "-o", str(out)], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 2
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "fraction must lie strictly between 0 and 1" in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Artifacts and generation

def test_uniform_artifact_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny()
    report = run_pass(context(model, IDS), PruneHeadsConfig(scorer="output_norm", uniform=1))
    assert report.summary["uniform_config"] is True
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (3, 1)
    save_artifact(model, None, tmp_path / "a", "passes: []\n", {})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    ours = compress.load(tmp_path / "a")
    expected = outputs(model, IDS)
    torch.testing.assert_close(outputs(plain, IDS), expected, atol=0, rtol=0)
    torch.testing.assert_close(outputs(ours, IDS), expected, atol=0, rtol=0)


def test_nonuniform_artifact_reloads_and_generates_with_cache(tmp_path):
    model = tiny()
    params = sum(p.numel() for p in model.parameters())
    report = run_pass(context(model, IDS), PruneHeadsConfig(scorer="ablation", per_layer={1: 1}))
    assert report.summary["uniform_config"] is False
    assert report.summary["parameters_saved"] == params - sum(p.numel() for p in model.parameters())
    assert report.summary["kv_heads"] == {"before": 4, "after": 3}
    assert structure(model)["attention_heads"]["1"]["original"] == {"query": 6, "kv": 2}
    save_artifact(model, None, tmp_path / "a", "passes: []\n", {})
    loaded = compress.load(tmp_path / "a")
    assert [heads_of(layer, arch_for(loaded.config)).kv
            for layer in decoder_layers(loaded, arch_for(loaded.config))] == [2, 1]
    torch.testing.assert_close(outputs(loaded, IDS), outputs(model, IDS), atol=0, rtol=0)
    assert_generation_matches_no_cache(loaded, IDS[:2, :8], steps=6)


def assert_generation_matches_no_cache(model, prompt: torch.Tensor, steps: int) -> None:
    """generate() with the KV cache (per-layer head counts in DynamicCache) gives the greedy
    tokens of plain full-sequence forwards without a cache."""
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=True,
                                attention_mask=torch.ones_like(prompt))
        ids = prompt
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_repeated_passes_record_original_indices():
    model = tiny()
    run_pass(context(model, IDS), PruneHeadsConfig(scorer="random", unit="query", per_layer={0: 2}))
    first = structure(model)["attention_heads"]["0"]
    run_pass(context(model, IDS), PruneHeadsConfig(scorer="random", per_layer={0: 1}))
    second = structure(model)["attention_heads"]["0"]
    assert len(first["query"]) == 4 and len(second["query"]) == 2
    assert set(second["query"]) <= set(first["query"]) and len(second["kv"]) == 1
    assert all(h // 3 == second["kv"][0] for h in second["query"])   # original group size 3


# ---------------------------------------------------------------------------------------------
# Real models

def test_scored_pruning_beats_random_on_smollm2(smollm2, eval_windows):
    """One KV group in 10 of 30 layers: chosen by output_norm vs at random (3 seeds)."""
    from compress.evaluation.accuracy import evaluate_accuracy

    calib = CalibrationConfig(samples=8, seq_len=128)
    ids = context(smollm2.model, None, smollm2.tokenizer, samples=8, seq_len=128).calibration_ids()
    target = {"unit": "kv_group", "fraction": 10 / 90, "max_per_layer": 1}
    perplexity = {}
    for name, extra in [("output_norm", {}), *[(f"random{s}", {"seed": s}) for s in range(3)]]:
        model = copy.deepcopy(smollm2.model)
        ctx = Context(model, smollm2.tokenizer, smollm2.arch, calib, torch.device("cpu"))
        ctx._calib_ids = ids
        report = run_pass(ctx, PruneHeadsConfig(scorer=name.rstrip("012"), **extra, **target))
        assert len(report.summary["layers_changed"]) == 10
        assert report.summary["kv_heads"]["after"] == 80
        perplexity[name] = evaluate_accuracy(model, eval_windows[:4]).perplexity
        del model
    randoms = [v for k, v in perplexity.items() if k.startswith("random")]
    assert perplexity["output_norm"] < sum(randoms) / len(randoms), perplexity


def test_prune_then_quantize_end_to_end_on_smollm2(smollm2_copy, tmp_path, eval_windows):
    """A recipe's passes in order (prune_heads, then quantize RTN), saved and reloaded."""
    from compress.runtime.modules import QuantizedLinear

    recipe = parse_recipe({
        "calibration": {"samples": 4, "seq_len": 64},
        "passes": [{"pass": "prune_heads", "scorer": "output_norm", "per_layer": {2: 1, 20: 1}},
                   {"pass": "quantize", "format": "int4", "group_size": 64}]})
    ctx = Context(smollm2_copy.model, smollm2_copy.tokenizer, smollm2_copy.arch,
                  recipe.calibration, torch.device("cpu"))
    reports = [run_pass(ctx, cfg).to_dict() for cfg in recipe.passes]
    out = tmp_path / "art"
    save_artifact(ctx.model, ctx.tokenizer, out, recipe.to_yaml(), {"passes": reports})
    report = json.loads((out / "report.json").read_text())["passes"][0]["summary"]
    d, hd = 576, 64
    # two groups of 3 query heads and 1 KV head: q 3*64 rows, k/v 64 rows each, o 3*64 columns
    assert report["parameters_saved"] == 2 * d * (3 * hd + 2 * hd + 3 * hd)
    assert report["kv_cache_bytes_per_token_saved"] == 2 * 2 * hd * 4   # K and V, float32
    assert report["attention_flops_per_token_saved"] == 2 * (
        2 * d * 5 * hd + 2 * 3 * hd * d + 4 * 3 * hd * report["context_length"])
    model = compress.load(out)
    arch = arch_for(model.config)
    kv = [heads_of(layer, arch).kv for layer in decoder_layers(model, arch)]
    assert kv[2] == kv[20] == 2 and kv.count(3) == 28
    q_proj = decoder_layers(model, arch)[2].self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear) and q_proj.out_features == 6 * hd
    assert_generation_matches_no_cache(model, eval_windows[:1, :16], steps=8)


def test_minilm_embeddings_survive_a_quarter_of_heads(tmp_path):
    from compress.evaluation.embeddings import docstring_sentences, mean_cosine, mean_pooled
    from compress.models import load_model

    loaded = load_model("minilm-l6")
    texts = docstring_sentences(48)
    reference = mean_pooled(loaded.model, loaded.tokenizer, texts)
    ids = context(loaded.model, None, loaded.tokenizer, samples=8, seq_len=128).calibration_ids()
    cosine = {}
    for scorer in ("output_norm", "random"):
        model = copy.deepcopy(loaded.model)
        report = run_pass(context(model, ids), PruneHeadsConfig(scorer=scorer, fraction=0.25))
        assert report.summary["query_heads"] == {"before": 72, "after": 54}
        cosine[scorer] = mean_cosine(mean_pooled(model, loaded.tokenizer, texts), reference)
    assert cosine["output_norm"] > 0.9 and cosine["output_norm"] > cosine["random"], cosine
    save_artifact(model, loaded.tokenizer, tmp_path / "a", "passes: []\n", {})
    reloaded = compress.load(tmp_path / "a")
    torch.testing.assert_close(mean_pooled(reloaded, loaded.tokenizer, texts),
                               mean_pooled(model, loaded.tokenizer, texts), atol=1e-5, rtol=0)


def test_calibrator_keeps_positional_layer_arguments():
    """BertEncoder passes attention_mask positionally: the Calibrator binds it by name, so the
    layer re-runs with the same mask (it used to be dropped)."""
    from compress.calib import Calibrator

    model = tiny("bert")
    step = next(iter(Calibrator(model, arch_for(model.config), IDS, batch_size=2)))
    assert {"attention_mask", "encoder_hidden_states"} <= set(step.kwargs[0])
    with torch.no_grad():
        full = model(IDS[:2], output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(step.run(keep_outputs=True)[0], full)
