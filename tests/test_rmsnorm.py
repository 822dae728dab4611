"""rmsnorm pass: pure math on small matrices, exactness on every supported family (random
weights, real stdlib text as byte tokens), artifact round trips, SmolLM2 folding, refusals."""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.calib import CalibrationConfig
from compress.errors import UsageError
from compress.formats.artifact import save_artifact
from compress.models import arch_for
from compress.passes import Context, run_pass
from compress.passes.rmsnorm import (
    CRMSNorm,
    RMSNormConfig,
    center_outputs,
    center_rows,
    compress_reader,
    compress_writer,
    crms_norm,
    fold_norm_into_linear,
)
from compress.recipe import parse_recipe
from compress.runtime.artifact import load_artifact, structure

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Pure functions

def test_center_rows_and_outputs_make_zero_mean():
    torch.manual_seed(0)
    e = torch.randn(7, 6, dtype=torch.float64) + 3.0
    assert center_rows(e).mean(-1).abs().max() < 1e-12
    w, b = torch.randn(6, 5, dtype=torch.float64) + 1, torch.randn(6, dtype=torch.float64) + 1
    wc, bc = center_outputs(w, b)
    x = torch.randn(9, 5, dtype=torch.float64)
    y = x @ wc.T + bc
    assert y.mean(-1).abs().max() < 1e-12
    # the centred writer is the original minus its mean output
    ref = x @ w.T + b
    assert torch.allclose(y, ref - ref.mean(-1, keepdim=True))


def test_layernorm_of_zero_mean_is_rmsnorm_and_folds():
    torch.manual_seed(0)
    d = 6
    x = center_rows(torch.randn(9, d, dtype=torch.float64))
    ln = nn.LayerNorm(d, eps=1e-5).double()
    nn.init.normal_(ln.weight, 1.0, 0.3), nn.init.normal_(ln.bias, 0, 0.3)
    lin = nn.Linear(d, 4).double()
    ref = lin(ln(x))
    w, b = fold_norm_into_linear(lin.weight.detach(), lin.bias.detach(), ln.weight.detach(),
                                 ln.bias.detach())
    rms = nn.RMSNorm(d, eps=1e-5, elementwise_affine=False)
    got = rms(x) @ w.T + b
    assert torch.allclose(got, ref, atol=1e-12)
    # not exact without recentring: the test can fail
    x_off = x + 1.0
    assert not torch.allclose(rms(x_off) @ w.T + b, lin(ln(x_off)), atol=1e-3)


def test_compressed_stream_reader_writer_and_crmsnorm():
    torch.manual_seed(0)
    d = 6
    w_in = torch.randn(d, 5, dtype=torch.float64)
    w_wr, b_wr = center_outputs(w_in, torch.randn(d, dtype=torch.float64))
    a = torch.randn(3, 5, dtype=torch.float64)
    full = a @ w_wr.T + b_wr                               # zero-mean, [3, d]
    cw, cb = compress_writer(w_wr, b_wr)
    small = a @ cw.T + cb                                  # [3, d-1]
    assert torch.allclose(small, full[:, :-1])
    norm_full = nn.RMSNorm(d, eps=1e-6, elementwise_affine=False)(full)
    norm_small = crms_norm(small, d, 1e-6)
    assert torch.allclose(norm_small, norm_full[:, :-1], atol=1e-12)
    reader = torch.randn(4, d, dtype=torch.float64)
    assert torch.allclose(norm_small @ compress_reader(reader).T, norm_full @ reader.T,
                          atol=1e-12)
    module = CRMSNorm(d, 1e-6)
    assert torch.allclose(module(small.float()).double(), norm_full[:, :-1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Families from small configs with random weights

def _configs():
    from transformers import (
        BloomConfig,
        GPT2Config,
        GPTJConfig,
        GPTNeoXConfig,
        OPTConfig,
        PhiConfig,
    )

    small = {"vocab_size": 256}
    return {
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **small),
        "opt": OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=64, **small),
        "gpt_neox": GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, use_parallel_residual=True, **small),
        "gpt_neox_seq": GPTNeoXConfig(hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128,
                                      use_parallel_residual=False, **small),
        "gptj": GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
                           **small),
        "phi": PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, **small),
        "bloom": BloomConfig(hidden_size=64, n_layer=2, n_head=4, **small),
    }


FAMILIES = list(_configs())


def random_model(family: str) -> nn.Module:
    """A small model whose norms, biases and embeddings are all non-trivial (random affine
    norms, biases and embedding rows with a non-zero mean), so nothing folds by accident."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[family], dtype=torch.float32).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            elif getattr(module, "bias", None) is not None and module.bias.dim() == 1:
                module.bias.normal_(0.0, 0.05)
            if isinstance(module, nn.Embedding):
                module.weight.add_(torch.randn(module.weight.shape[0], 1) * 0.1)
    return model


def text_ids(length: int = 96, rows: int = 2) -> torch.Tensor:
    """Real text (a stdlib docstring) as byte tokens for the 256-token toy vocabularies."""
    data = inspect.getdoc(json).encode()
    return torch.tensor(list(data[:length * rows]), dtype=torch.long).reshape(rows, length)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def apply_pass(model, mode="auto", untie=False, tokenizer=None):
    ctx = Context(model, tokenizer, arch_for(model.config), CalibrationConfig(),
                  torch.device("cpu"))
    return run_pass(ctx, RMSNormConfig(mode=mode, untie=untie))


@pytest.mark.parametrize("mode", ["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_exact_and_reloads(family, mode, tmp_path):
    model = random_model(family)
    ids = text_ids()
    before = logits(model, ids)
    report = apply_pass(model, mode)
    assert report.summary["changed"]
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert not norms, "every LayerNorm must be gone"
    kind = CRMSNorm if mode == "crmsnorm" else nn.RMSNorm
    assert sum(isinstance(m, kind) for m in model.modules()) == report.summary["norms"]
    after = logits(model, ids)
    assert (after - before).abs().max().item() < TOL
    assert before.abs().max() > 0.1  # the model computes something
    if mode == "crmsnorm":
        d = model.config.hidden_size
        embed = model.get_input_embeddings().weight
        assert embed.shape[1] == d - 1
    save_artifact(model, None, tmp_path / "a", "passes: []\n", {})
    reloaded = load_artifact(tmp_path / "a")
    assert (logits(reloaded, ids) - after).abs().max().item() < 1e-6


def test_stream_is_zero_mean_after_recentring():
    model = random_model("gpt2")
    apply_pass(model, "rmsnorm")
    seen = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(
            out, tuple) else out))
    logits(model, text_ids())
    assert all(h.mean(-1).abs().max() < 1e-4 * h.abs().max() for h in seen)


def llama_with_random_norms(**config):
    """A tiny Llama whose norm weights are not 1, so folding them changes the weights."""
    from support import tiny_llama

    model = tiny_llama(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


def test_llama_fold_plain_transformers_and_nothing_twice(tmp_path):
    model = llama_with_random_norms(tie_word_embeddings=False)
    ids = text_ids()
    before = logits(model, ids)
    report = apply_pass(model)
    assert report.summary["mode"] == "fold" and report.summary["norms_folded"] == 5
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "norm" in n)
    assert (logits(model, ids) - before).abs().max().item() < TOL
    # plain transformers can load the folded model: the norms are ordinary weight-1 RMSNorms
    model.save_pretrained(tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (logits(plain, ids) - before).abs().max().item() < TOL
    assert structure(model)["rmsnorm"] == {"mode": "fold", "untied": False}
    save_artifact(model, None, tmp_path / "a", "passes: []\n", {})
    assert (logits(load_artifact(tmp_path / "a"), ids) - before).abs().max().item() < TOL
    plain_artifact = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert (logits(plain_artifact, ids) - before).abs().max().item() < TOL
    state = {k: v.clone() for k, v in model.state_dict().items()}
    again = apply_pass(model)
    assert again.summary["changed"] is False and "nothing to fold" in again.summary["note"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_tied_fold_keeps_final_norm_or_unties():
    model = llama_with_random_norms(tie_word_embeddings=True)
    ids = text_ids()
    before = logits(model, ids)
    kept = copy.deepcopy(model)
    report = apply_pass(kept)
    assert "kept" in report.summary["final_norm"]
    assert kept.lm_head.weight.data_ptr() == kept.model.embed_tokens.weight.data_ptr()
    assert not torch.all(kept.model.norm.weight == 1)
    assert (logits(kept, ids) - before).abs().max().item() < TOL
    report = apply_pass(model, untie=True)
    assert report.summary["untied_params"] == 256 * 64
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.all(model.model.norm.weight == 1)
    assert (logits(model, ids) - before).abs().max().item() < TOL


def test_smollm2_fold_exact(smollm2_copy, eval_windows):
    model = smollm2_copy.model
    ids = eval_windows[:2, :64]
    before = logits(model, ids)
    report = apply_pass(model, tokenizer=smollm2_copy.tokenizer)
    assert report.summary["norms_folded"] == 60  # 30 layers x 2; the tied final norm is kept
    assert (logits(model, ids) - before).abs().max().item() < TOL


# ---------------------------------------------------------------------------------------------
# Refusals and recipe rules

def test_post_ln_refused():
    from transformers import BertConfig, OPTConfig

    with pytest.raises(UsageError, match="post-LN"):
        apply_pass_arch(arch_for(BertConfig()))
    opt_post = OPTConfig(do_layer_norm_before=False)
    with pytest.raises(UsageError, match="post-LN"):
        apply_pass_arch(arch_for(opt_post))


def apply_pass_arch(arch):
    from compress.passes.rmsnorm import resolve_mode

    return resolve_mode(arch, "auto")


def test_crmsnorm_on_rmsnorm_model_refused():
    from support import tiny_llama

    with pytest.raises(UsageError, match="use mode fold"):
        apply_pass(tiny_llama(), "crmsnorm")


def test_order_before_quantize():
    ok = parse_recipe({"passes": [{"pass": "rmsnorm"}, {"pass": "quantize"}]})
    assert ok.passes[0].kind == "rmsnorm"
    with pytest.raises(UsageError, match="rmsnorm must run before quantize"):
        parse_recipe({"passes": [{"pass": "quantize"}, {"pass": "rmsnorm"}]})
    with pytest.raises(UsageError, match="mode"):
        parse_recipe({"passes": [{"pass": "rmsnorm", "mode": "layernorm"}]})


def test_cli_apply_records_diff_and_reloads(tmp_path):
    """The pipeline on a saved GPT-2 toy: report.json holds the measured logit difference."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = random_model("gpt2")
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok = Tokenizer(models.WordLevel({chr(i): i for i in range(1, 256)} | {"[UNK]": 0},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {samples: 2, seq_len: 64}\npasses:\n"
                      "  - pass: rmsnorm\n    mode: crmsnorm\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "compress", "apply", str(recipe), str(src),
                          "-o", str(out), "--save-dtype", "float32"], capture_output=True,
                         text=True, cwd=ROOT,
                         check=False)
    assert run.returncode == 0, run.stderr + run.stdout
    report = json.loads((out / "report.json").read_text())
    diff = report["passes"][0]["summary"]["max_abs_logit_diff"]
    assert 0 <= diff < TOL
    config = json.loads((out / "config.json").read_text())
    assert config["compress"]["structure"]["rmsnorm"]["mode"] == "crmsnorm"
    reloaded = load_artifact(out)
    ids = text_ids()
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max().item() < TOL


def test_structure_is_recorded():
    model = random_model("bloom")
    apply_pass(model, "rmsnorm")
    record = structure(model)["rmsnorm"]
    assert record["identity"] == ["transformer.word_embeddings_layernorm"]
    assert record["untied"] is True
    assert len(record["norms"]) == 2 * 2 + 1


def test_quantized_model_refused():
    """A model whose linears are already packed cannot be rewritten exactly."""
    from support import tiny_llama

    from compress.passes.quantize import QuantizeConfig

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(2)
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(), torch.device("cpu"))
    run_pass(ctx, QuantizeConfig(group_size=32))
    with pytest.raises(UsageError, match="already quantized"):
        run_pass(ctx, RMSNormConfig())


def test_opt_without_final_norm_refused():
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                       vocab_size=64, word_embed_proj_dim=32, _remove_final_layer_norm=True)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UsageError, match="no final norm"):
        apply_pass(model)
