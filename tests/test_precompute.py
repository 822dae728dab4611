"""precompute (Graef 2024): accounting against the paper, table math, exactness, save/load."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from support import tiny_llama
from transformers import (
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PhiConfig,
    PhiForCausalLM,
)

from compress.calib import CalibrationConfig
from compress.errors import UsageError
from compress.formats.artifact import save_artifact
from compress.models import ARCHES, arch_for
from compress.passes import Context, PrecomputeConfig, run_pass
from compress.passes.precompute import (
    PrecomputedEmbedding,
    TableColumns,
    decode_rows,
    dims_of,
    encode_table,
    fused_columns,
    precompute_accounting,
)
from compress.recipe import parse_recipe
from compress.runtime.artifact import structure


def apply(model, **cfg):
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(), torch.device("cpu"))
    return run_pass(ctx, PrecomputeConfig(**cfg))


# ---------------------------------------------------------------------------------------------
# Accounting from published configs (no weights)

def paper_configs():
    """The paper's three models, from their published numbers. The paper's Pythia figures use
    a 50,400-entry vocabulary (the HF config pads it to 50,432)."""
    pythia = GPTNeoXConfig(hidden_size=4096, intermediate_size=16384, num_attention_heads=32,
                           num_hidden_layers=32, vocab_size=50400, use_parallel_residual=True,
                           tie_word_embeddings=False)
    mistral = MistralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                            num_key_value_heads=8, num_hidden_layers=32, vocab_size=32000,
                            tie_word_embeddings=False)
    mixtral = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                            num_key_value_heads=8, num_hidden_layers=32, vocab_size=32000,
                            num_local_experts=8, tie_word_embeddings=False)
    return {"pythia-6.9b": (pythia, None), "mistral-7b": (mistral, None),
            "mixtral-8x7b": (mixtral, True)}  # Mixtral as if it had parallel attention/FFN


# weights eliminated, read reduction at batch 1 and 16, net memory change, its percentage
PAPER = {"pythia-6.9b": (184_549_376, 11_264, 704, 434_765_824, 6),
         "mistral-7b": (25_165_824, 2_458, 154, 171_442_176, 2),
         "mixtral-8x7b": (1_434_451_968, 140_084, 8_756, -1_237_843_968, -3)}


@pytest.mark.parametrize("name", list(PAPER))
def test_accounting_reproduces_paper_table(name):
    config, parallel = paper_configs()[name]
    acc = precompute_accounting(config, parallel=parallel)
    eliminated, reduction1, reduction16, net, percent = PAPER[name]
    assert acc["weights_eliminated"] == eliminated
    assert round(acc["per_batch"][1]["read_reduction"]) == reduction1
    assert round(acc["per_batch"][16]["read_reduction"]) == reduction16
    assert acc["net_change"] == net
    assert round(100 * acc["net_change_fraction"]) == percent
    assert acc["flops_per_token_before"] == 2 * eliminated
    assert set(acc["per_batch"]) == {1, 16, 256, 1024}


def smollm2_config():
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152,
                       tie_word_embeddings=True)


def test_smollm2_accounting_small_width_large_vocabulary():
    acc = precompute_accounting(smollm2_config())
    assert acc["weights_eliminated"] == 576 * (576 + 2 * 192) == 552_960
    assert acc["table_values"] == 49152 * 2 * (576 + 192)
    # tied serial: the LM head reads the table's embedding columns, so the embedding goes
    assert acc["net_change"] == 49152 * (1536 - 576) - 552_960 == 46_632_960
    assert acc["model_params"] == 134_515_008  # SmolLM2-135M's published size
    assert 0.346 < acc["net_change_fraction"] < 0.347
    # serial block: reads pay off below batch d (576), lose above it
    assert acc["break_even_batch"] == 576
    assert acc["per_batch"][256]["read_reduction"] > 1 > acc["per_batch"][1024]["read_reduction"]
    untied = precompute_accounting(smollm2_config().__class__(
        **{**smollm2_config().to_dict(), "tie_word_embeddings": False}))
    assert untied["net_change"] == acc["net_change"]
    assert untied["model_params"] == acc["model_params"] + 49152 * 576


def test_model_from_config_matches_dims_of_its_loaded_config(smollm2):
    assert dims_of(smollm2.model.config) == dims_of(smollm2_config())


# ---------------------------------------------------------------------------------------------
# Table math on small tensors

def test_fused_columns_regroup_neox_per_head_qkv():
    config = GPTNeoXConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16,
                           vocab_size=10, num_hidden_layers=1)
    dims = dims_of(config)
    fused = torch.arange(24.0)  # per head [q(4) k(4) v(4)]
    table = fused[fused_columns(ARCHES["gpt_neox"], dims)]
    assert table.tolist() == [0, 1, 2, 3, 12, 13, 14, 15,  # q of head 0, head 1
                              4, 5, 6, 7, 16, 17, 18, 19,
                              8, 9, 10, 11, 20, 21, 22, 23]
    assert torch.equal(table[torch.argsort(fused_columns(ARCHES["gpt_neox"], dims))], fused)


def test_int8_table_error_within_half_a_step_per_segment():
    torch.manual_seed(0)
    widths = (6, 4, 2, 2)
    rows = torch.randn(50, 14) * torch.tensor([1.0] * 6 + [30.0] * 4 + [0.01] * 4)
    codes, scale = encode_table(rows, "int8", widths)
    assert codes.dtype == torch.int8 and scale.shape == (50, 4)
    error = (decode_rows(codes, scale, widths, torch.float32) - rows).abs()
    step = scale.repeat_interleave(torch.tensor(widths), dim=-1)
    assert (error <= step / 2 + 1e-7).all()
    assert error[:, 10:].max() < 1e-3  # the small v segment keeps its own scale
    bf16, none = encode_table(rows, "bfloat16", widths)
    assert bf16.dtype == torch.bfloat16 and none is None


# ---------------------------------------------------------------------------------------------
# Recipes

def test_order_precompute_after_every_layer0_pass():
    quant = {"pass": "quantize", "format": "int4", "group_size": 64}
    assert parse_recipe({"passes": [quant, {"pass": "precompute"}]})
    with pytest.raises(UsageError, match=r"passes\[0\] \(precompute\).*after quantize"):
        parse_recipe({"passes": [{"pass": "precompute"}, quant]})
    with pytest.raises(UsageError, match="twice"):
        parse_recipe({"passes": [{"pass": "precompute"}, {"pass": "precompute"}]})
    with pytest.raises(UsageError, match="table_dtype"):
        parse_recipe({"passes": [{"pass": "precompute", "table_dtype": "int4"}]})


def test_growth_threshold_refuses_or_warns():
    model = tiny_llama()
    with pytest.raises(UsageError, match=r"grow the model by \+2\d\.\d%.*max_growth=0.1"):
        apply(model, max_growth=0.1)
    assert "precompute" not in structure(model)  # nothing half-done
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    with pytest.warns(UserWarning, match="max_growth"):
        apply(model, max_growth=0.1, on_growth="warn")
    assert isinstance(model.model.embed_tokens, PrecomputedEmbedding)


def test_refuses_models_whose_layer0_reads_positions():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(UsageError, match="transformer.wpe"):
        apply(model)
    with pytest.raises(UsageError, match="already precomputed"):
        llama = tiny_llama()
        apply(llama)
        apply(llama)


# ---------------------------------------------------------------------------------------------
# Exactness on random-weight models of each block style, save and reload

def neox(parallel: bool):
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, use_parallel_residual=parallel, attention_bias=True)).eval()


def gptj():
    torch.manual_seed(0)
    return GPTJForCausalLM(GPTJConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                      rotary_dim=8, n_positions=128, bos_token_id=0,
                                      eos_token_id=0)).eval()


def phi():
    torch.manual_seed(0)
    return PhiForCausalLM(PhiConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    partial_rotary_factor=0.5)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def greedy(model, ids, n=12):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                              pad_token_id=0)


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=32)).eval()


MODELS = {"gpt_neox-parallel": lambda: neox(True), "gpt_neox-serial": lambda: neox(False),
          "gptj": gptj, "phi": phi, "llama-tied": lambda: tiny_llama(tie_word_embeddings=True),
          "qwen3": qwen3}  # qwen3: q wider than d (4 x 32 > 64), q/k norms after the table


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_on_random_models_and_reload(name, tmp_path):
    from compress import load

    model = MODELS[name]()
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (3, 40))
    ref, ref_tokens = logits(model, ids), greedy(model, ids[:1, :10])
    report = apply(model, table_dtype="float32")
    arch = arch_for(model.config)
    out = logits(model, ids)
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(greedy(model, ids[:1, :10]), ref_tokens)
    assert report.summary["parallel"] == arch.parallel
    assert report.summary["table_max_abs_error"] == 0.0
    replaced = [m for m in model.modules() if isinstance(m, TableColumns)]
    assert len(replaced) == (1 if arch.fused_qkv else 3)
    if name == "llama-tied":  # the LM head reads the table's embedding columns
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.table.data_ptr()
        moved = copy.deepcopy(model).to(torch.float64)  # .to() copies head and table apart
        assert torch.allclose(logits(moved, ids).float(), out, atol=1e-4)
        assert moved.lm_head.weight.data_ptr() == moved.model.embed_tokens.table.data_ptr()
    save_artifact(model, None, tmp_path / "a", "passes: []\n", {})
    reloaded = load(tmp_path / "a")
    assert isinstance(reloaded.get_input_embeddings(), PrecomputedEmbedding)
    assert torch.equal(logits(reloaded, ids), out)


def test_tied_artifact_loads_in_another_dtype(tmp_path):
    from compress import load

    model = tiny_llama(tie_word_embeddings=True)
    apply(model)
    ids = torch.randint(0, 256, (2, 16))
    save_artifact(model, None, tmp_path / "a", "passes: []\n", {})
    half = load(tmp_path / "a", dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert half.lm_head.weight.data_ptr() == half.model.embed_tokens.table.data_ptr()
    assert (logits(half, ids).float() - logits(model, ids)).abs().max() < 0.1


def test_table_is_what_layer0_reads():
    """Changing a table row changes that token's logits: layer 0 really reads the table."""
    model = neox(True)
    apply(model)
    ids = torch.tensor([[5, 6, 7]])
    before = logits(model, ids)
    model.get_input_embeddings().table[6, 64 + 3] += 1.0  # one q column of token 6
    after = logits(model, ids)
    assert torch.equal(after[0, 0], before[0, 0])  # position 0 cannot see token 6
    assert (after[0, 1:] - before[0, 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("table_dtype", ["bfloat16", "int8"])
def test_smaller_tables_record_their_error_and_reload(table_dtype, tmp_path):
    from compress import load

    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 32))
    ref = logits(model, ids)
    report = apply(model, table_dtype=table_dtype)
    error = report.summary["table_max_abs_error"]
    assert 0 < error < 0.05 and 0 < report.summary["table_rel_rms_error"] < 0.01
    full = 256 * (64 + 64 + 32 + 32) * 4
    assert report.summary["table_bytes"] == (full // 2 if table_dtype == "bfloat16"
                                             else full // 4 + 256 * 4 * 4)  # + int8 scales
    out = logits(model, ids)
    assert 0 < (out - ref).abs().max() < 0.05
    save_artifact(model, None, tmp_path / "a", "passes: []\n", {})
    assert torch.equal(logits(load(tmp_path / "a"), ids), out)


def test_tied_head_kept_when_table_cannot_hold_it():
    """A bf16 table cannot serve a float32 LM head: the head keeps the embedding."""
    model = tiny_llama(tie_word_embeddings=True)
    embedding = model.model.embed_tokens.weight
    report = apply(model, table_dtype="bfloat16")
    assert report.summary["output_embedding"] == "kept"
    assert model.lm_head.weight is embedding and not model.config.tie_word_embeddings
    assert report.summary["weight_bytes_removed"] < embedding.numel() * 4
    model = tiny_llama(tie_word_embeddings=True)
    assert apply(model, head_from_table=False).summary["output_embedding"] == "kept"
    assert model.lm_head.weight.is_contiguous()


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (float32): the real model over real evaluation text

def test_smollm2_exact_over_evaluation_text(smollm2_copy, smollm2, eval_windows, tmp_path):
    from compress import load

    model = smollm2_copy.model
    ids = eval_windows[:4]
    ref = logits(smollm2.model, ids)
    prompt = ids[:1, :16]
    ref_tokens = greedy(smollm2.model, prompt, n=16)
    embedding = model.model.embed_tokens.weight.detach().clone()
    report = apply(model)
    out = logits(model, ids)
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(greedy(model, prompt, n=16), ref_tokens)
    # tied embeddings: the table holds the embedding as columns 0:576, the LM head reads them
    table = model.model.embed_tokens.table
    assert torch.equal(table[:, :576], embedding)
    assert model.lm_head.weight.data_ptr() == table.data_ptr()
    assert torch.equal(model.lm_head.weight, embedding)
    summary = report.summary
    assert summary["output_embedding"] == "table" and summary["widths"] == [576, 576, 192, 192]
    assert summary["table_bytes"] == 49152 * 1536 * 4
    assert summary["weight_bytes_removed"] == (552_960 + 576 + 49152 * 576) * 4
    assert summary["net_bytes"] == summary["table_bytes"] - summary["weight_bytes_removed"]
    assert summary["accounting_values"]["weights_eliminated"] == 552_960
    assert set(summary["per_batch"]) == {1, 16, 256, 1024}
    save_artifact(model, smollm2_copy.tokenizer, tmp_path / "a", "passes: []\n", {})
    del smollm2_copy.model, model
    reloaded = load(tmp_path / "a")
    assert torch.equal(logits(reloaded, ids[:2]), out[:2])


def test_cli_apply_writes_report_and_artifact(smollm2, tmp_path):
    """The bundled recipe through `compress apply` on a small random Llama with SmolLM2's
    tokenizer: report.json carries the figures, the artifact reloads to the same logits."""
    from transformers import LlamaForCausalLM

    from compress import load

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path / "tiny")
    smollm2.tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "compress", "apply", "precompute",
                          str(tmp_path / "tiny"), "-o", str(out), "--save-dtype", "float32"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "report.json").read_text())["passes"][0]["summary"]
    assert summary["max_abs_logit_diff"] < 1e-4
    assert summary["output_embedding"] == "table"
    assert summary["table_bytes"] == 49152 * (64 + 64 + 32 + 32) * 4
    for key in ("weight_bytes_removed", "net_bytes", "net_growth"):
        assert key in summary
    assert set(summary["per_batch"]) == {"1", "16", "256", "1024"}
    assert summary["per_batch"]["1"]["flops_saved_per_token"] == 2 * 64 * 128
    ids = torch.randint(0, 49152, (2, 16))
    assert (logits(load(out), ids) - logits(model, ids)).abs().max() < 1e-4


def test_composes_after_quantize(tmp_path):
    """The table is computed from layer 0's quantized weights; the replaced projections leave
    the artifact's quantization config, the rest stays packed."""
    from compress import load
    from compress.passes import QuantizeConfig
    from compress.runtime.modules import QuantizedLinear

    model = tiny_llama()
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(), torch.device("cpu"))
    run_pass(ctx, QuantizeConfig(format="int4", group_size=64))
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    ids = torch.randint(0, 256, (2, 24))
    quantized = logits(model, ids)
    run_pass(ctx, PrecomputeConfig())
    assert (logits(model, ids) - quantized).abs().max() < 1e-4
    save_artifact(model, None, tmp_path / "a", "passes: []\n", {})
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    modules = config["compress"]["modules"]
    assert "model.layers.0.self_attn.q_proj" not in modules
    assert {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj"} <= set(modules)
    assert (logits(load(tmp_path / "a"), ids) - quantized).abs().max() < 1e-4
