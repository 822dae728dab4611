"""The spine end to end on the real SmolLM2-135M: apply, evaluate, inspect, recipes, load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import run_cli

from compress.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "int4-rtn.yaml"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("apply") / "smollm2-int4"
    # float32 storage: the tests below compare with the float32 model exactly (the default,
    # bfloat16 for a GGUF source, is covered by tests/test_streaming.py)
    sys.argv = ["compress", "apply", str(RECIPE), "smollm2-135m", "-o", str(out),
                "--save-dtype", "float32"]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    return out


def test_apply_writes_a_complete_artifact(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "rest.safetensors", "recipe.yaml",
            "report.json", "tokenizer.json"} <= names
    assert len([n for n in names if n.startswith("layer-")]) == 30  # one shard per layer
    config = json.loads((artifact / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert len(config["compress"]["modules"]) == 30 * 7
    report = json.loads((artifact / "report.json").read_text())
    assert report["passes"][0]["summary"]["modules"] == 210
    assert not any(p.name.endswith(".partial") for p in artifact.parent.iterdir())


def test_tied_embedding_saved_once(artifact):
    from safetensors import safe_open

    keys = set()
    for shard in artifact.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            keys |= set(handle.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_compress_load_and_transformers_agree(artifact, eval_windows):
    """The same artifact through compress.load and through transformers + compressed-tensors."""
    from transformers import AutoModelForCausalLM

    import compress
    from compress.runtime.modules import QuantizedLinear

    ours = compress.load(artifact)
    assert isinstance(ours.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    theirs = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32)
    ids = eval_windows[:2, :128]
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert (a - b).abs().max().item() < 1e-3  # same tensors; only op order may differ


def test_loaded_artifact_matches_in_memory_quantization(artifact, smollm2_copy, eval_windows):
    """What the pass computed is what was saved: reload gives the in-memory model's logits."""
    import compress
    from compress.passes import Context, run_pass
    from compress.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    ctx = Context(smollm2_copy.model, smollm2_copy.tokenizer, smollm2_copy.arch,
                  recipe.calibration, torch.device("cpu"))
    run_pass(ctx, recipe.passes[0])
    ids = eval_windows[:2, :128]
    with torch.no_grad():
        a = ctx.model(ids).logits
        b = compress.load(artifact)(ids).logits
    assert torch.equal(a, b)


def test_int4_rtn_perplexity_cost_is_bounded(artifact, smollm2, eval_windows):
    """INT4 symmetric g64 RTN on real text: worse than float, but within a bounded factor.
    (Asymmetric g32 would be free on this GGUF-derived model, so it is not what we measure.)"""
    import compress
    from compress.evaluation.accuracy import evaluate_accuracy

    result = evaluate_accuracy(compress.load(artifact), eval_windows, smollm2.model)
    ratio = result.perplexity / result.baseline_perplexity
    assert 1.0 < ratio < 1.6, result
    assert result.top1_agreement > 0.6 and 0 < result.kl_divergence < 0.6


def test_evaluate_inspect_recipes_commands(artifact, capsys, tmp_path):
    out_json = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "evaluate", str(artifact), "--baseline", "smollm2-135m",
                             "--max-tokens", "1024", "--seq-len", "256", "-o", str(out_json))
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["tokens"] == 4 * 255 and result["perplexity"] > result["baseline_perplexity"]
    code, out, err = run_cli(capsys, "inspect", str(artifact))
    assert code == 0 and "int4-sym-g64" in err and "quantize" in err
    code, out, err = run_cli(capsys, "recipes")
    assert code == 0 and "int4-rtn" in out


def test_help_of_every_command_exits_zero():
    from compress.cli import app

    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    for args in [[], *[[c] for c in commands]]:
        done = subprocess.run([sys.executable, "-m", "compress", *args, "--help"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (args, done.stderr)
        assert "Usage" in done.stdout


def test_artifact_directory_can_be_a_model_source(artifact, tmp_path, capsys):
    """A compressed artifact is a valid MODEL for another recipe (e.g. evaluate as baseline)."""
    from compress.models import load_model

    loaded = load_model(str(artifact))
    assert loaded.arch.name == "llama" and loaded.source.kind == "artifact"


def test_partial_output_is_never_left(tmp_path, capsys, monkeypatch):
    """A failure while saving leaves neither the output nor a temporary directory."""
    from compress.formats import artifact as artifact_module

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    from support import tiny_llama

    out = tmp_path / "out"
    from compress.errors import CompressError

    with pytest.raises(CompressError, match="No space left on device; nothing was written"):
        artifact_module.save_artifact(tiny_llama(), None, out, "", {})
    assert list(tmp_path.iterdir()) == []


def test_pass_summaries_print_as_key_values_not_dict_reprs():
    from compress.progress import key_values

    line = key_values({"modules": 210, "awq": {"mean_alpha": 0.512345, "not_foldable": []},
                       "fallbacks": ["a", "b", "c", "d", "e"], "format": "int4-sym-g64"})
    assert line == ("modules=210 awq.mean_alpha=0.5123 awq.not_foldable=none "
                    "fallbacks=[5 items] format=int4-sym-g64")
    assert "{" not in line and "'" not in line
