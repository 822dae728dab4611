"""Evaluation: the local lm-eval tasks against our own perplexity, recovery gates, task errors,
and a resumable compare sweep."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.errors import CompressError

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**__import__("os").environ,
                                                    "PYTHONPATH": str(ROOT)})


def test_local_rolling_task_matches_own_perplexity(smollm2):
    """lm-eval's stdlib_docs (rolling loglikelihood through HFLM on the in-memory model) equals
    our rolling_nll on the same documents: word and byte perplexity within 1e-3 relative
    (the only difference is float32 summation order)."""
    from compress.evaluation.accuracy import rolling_nll
    from compress.evaluation.lm_eval_adapter import run_tasks
    from compress.evaluation.local_tasks import read_jsonl, word_count

    limit = 4
    scores = run_tasks(smollm2.model, smollm2.tokenizer, ["stdlib_docs"], limit=limit,
                       max_length=256)["stdlib_docs"]
    tok = smollm2.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    nll = words = size = 0
    for doc in read_jsonl("stdlib_docs.jsonl")[:limit]:
        ids = torch.tensor(tok(doc["text"], add_special_tokens=False).input_ids)
        nll += rolling_nll(smollm2.model, ids, prefix, max_length=256)[0]
        words += word_count(doc["text"])
        size += len(doc["text"].encode())
    assert scores["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-3)
    assert scores["byte_perplexity"] == pytest.approx(math.exp(nll / size), rel=1e-3)
    assert 1.2 < scores["byte_perplexity"] < 4  # real prose on a real model, not noise


def test_unreachable_task_is_one_clear_line():
    """lm-eval's own lambada_openai needs the hub; offline it fails naming the task and the fix."""
    from compress.evaluation.lm_eval_adapter import load_tasks

    with pytest.raises(CompressError) as info:
        load_tasks(["lambada_openai"])
    message = str(info.value)
    assert "'lambada_openai'" in message and "COMPRESS_ONLINE=1" in message
    assert "stdlib_docs" in message and "\n" not in message


def test_offline_before_hub_libraries_import():
    """Importing the adapter (as `compress evaluate --tasks` does) makes lm-eval's datasets and
    huggingface_hub start offline, with no HF_* variable set by the caller."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    code = ("import compress.evaluation.lm_eval_adapter as a; a._lm_eval(); "
            "import datasets, huggingface_hub.constants as c; "
            "print(datasets.config.HF_HUB_OFFLINE, c.HF_HUB_OFFLINE)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_unknown_task_cli_error_no_traceback():
    done = cli("evaluate", "smollm2-135m", "--tasks", "stdlib_docs,no_such_task")
    assert done.returncode == 2
    assert "unknown lm-eval task 'no_such_task'" in done.stderr
    assert "Traceback" not in done.stderr and "stdlib_lastword" in done.stderr


def test_gate_needs_baseline():
    done = cli("evaluate", "smollm2-135m", "--min-recovery", "0.9")
    assert done.returncode == 2 and "--baseline" in done.stderr


def _apply(loaded, name: str):
    """The model of `loaded` after the evaluate/recipes/<name>.yaml recipe (RTN: no data)."""
    from compress.passes import Context, run_pass
    from compress.recipe import load_recipe

    recipe = load_recipe(ROOT / "evaluate" / "recipes" / f"{name}.yaml")
    ctx = Context(loaded.model, loaded.tokenizer, loaded.arch, recipe.calibration,
                  torch.device("cpu"))
    for cfg in recipe.passes:
        run_pass(ctx, cfg)
    return recipe


@pytest.mark.slow
def test_recovery_gate_passes_good_recipe(smollm2, smollm2_copy, eval_windows):
    """INT8 RTN (groups of 64) recovers >= 0.95 on every gated metric on the real model."""
    from compress.evaluation.accuracy import evaluate_accuracy
    from compress.evaluation.report import failing, recovery

    _apply(smollm2_copy, "int8-rtn")
    metrics = evaluate_accuracy(smollm2_copy.model, eval_windows, smollm2.model).to_dict()
    rec = recovery(metrics, {}, {})
    assert rec["perplexity"] > 0.99 and rec["top1_agreement"] > 0.95
    assert failing(rec, 0.95) == []


@pytest.mark.slow
def test_recovery_gate_fails_bad_recipe_cli(smollm2_copy, tmp_path):
    """INT4 with one scale per output channel fails a 0.95 gate: exit 1, one line per failing
    metric, and the results JSON (versions, machine, fingerprint, recipe) still written."""
    from compress.formats.artifact import save_artifact

    recipe = _apply(smollm2_copy, "int4-per-channel-rtn")
    artifact = tmp_path / "bad"
    save_artifact(smollm2_copy.model, smollm2_copy.tokenizer, artifact, recipe.to_yaml(), {})
    done = cli("evaluate", str(artifact), "--baseline", "smollm2-135m", "--min-recovery",
               "0.95", "--max-tokens", "1024", "--seq-len", "256")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "recovery gate failed: perplexity: recovery" in done.stderr
    assert "recovery gate failed: top1_agreement: recovery" in done.stderr
    result = json.loads((artifact / "evaluation.json").read_text())
    assert result["recovery"]["perplexity"] < 0.95 and len(result["gate"]["failed"]) == 2
    assert result["tokens"] == 4 * 255 and result["perplexity"] > result["baseline_perplexity"]
    for key in ("versions", "machine", "fingerprint", "recipe", "settings"):
        assert result[key], key
    assert "group_size: null" in result["recipe"]
    assert result["fingerprint"]["model"] != result["fingerprint"]["baseline"]
    assert 4 < result["size"]["bits_per_weight"] < 4.1


def test_pareto_front():
    from compress.evaluation.plot import pareto_front

    # (speed, perplexity): (3, 12) is beaten by (4, 11); the rest trade off.
    points = [(1.0, 10.0), (3.0, 12.0), (4.0, 11.0), (5.0, 20.0)]
    assert pareto_front(points, more_x_better=True) == [0, 2, 3]
    assert pareto_front(points, more_x_better=False) == [0]


def test_compare_writes_table_plot_and_resumes(tmp_path, smollm2):
    """A sweep on a small random Llama (structure only) with the real tokenizer: table, plot,
    JSON; the second run reuses the artifact, its evaluation and its benchmark."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.compare import compare, write_outputs

    model_dir = tmp_path / "tiny"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    smollm2.tokenizer.save_pretrained(model_dir)
    recipe = tmp_path / "int4-g32.yaml"
    recipe.write_text("passes:\n  - {pass: quantize, format: int4, group_size: 32}\n")
    out = tmp_path / "sweep"
    first = compare(str(model_dir), [str(recipe)], out, [], None, seq_len=64, max_tokens=256)
    paths = write_outputs(first, out)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    table = (out / "compare.md").read_text()
    assert "| baseline |" in table and "| int4-g32 |" in table and "decode tok/s (cpu)" in table
    rows = {r["recipe"]: r for r in first["rows"]}
    # 4-bit codes + one bfloat16 scale per 32 weights (the default save dtype for a float32
    # model), + the 16-byte weight_shape per layer
    assert 4 + 16 / 32 <= rows["int4-g32"]["bits_per_weight"] < 4 + 16 / 32 + 0.05
    assert rows["baseline"]["bits_per_weight"] == 32
    stamp = {p: p.stat().st_mtime_ns for p in (out / "artifacts" / "int4-g32").iterdir()}
    second = compare(str(model_dir), [str(recipe)], out, [], None, seq_len=64, max_tokens=256)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert second["rows"] == first["rows"]
    recipe.write_text("passes:\n  - {pass: quantize, format: int4, group_size: 16}\n")
    third = compare(str(model_dir), [str(recipe)], out, [], None, seq_len=64, max_tokens=256,
                    run_bench=False)
    assert third["rows"][1]["bits_per_weight"] >= 4 + 16 / 16  # rebuilt with groups of 16
