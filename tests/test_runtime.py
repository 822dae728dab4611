"""The runtime stands alone: loading an artifact never imports the code that made it."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from support import tiny_llama


def _quantized_artifact(tmp_path):
    from compress.calib import CalibrationConfig
    from compress.formats.artifact import save_artifact
    from compress.models import arch_for
    from compress.passes import Context, QuantizeConfig, run_pass

    model = tiny_llama()
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(), torch.device("cpu"))
    run_pass(ctx, QuantizeConfig.model_validate({"pass": "quantize", "format": "int4",
                                                 "group_size": 32, "ignore": ["lm_head"]}))
    return save_artifact(model, None, tmp_path / "art", "passes: []\n", {}), model


def test_loading_an_artifact_imports_no_pass_module(tmp_path):
    out, model = _quantized_artifact(tmp_path)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch, compress\n"
            f"model = compress.load({str(out)!r})\n"
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
            "with torch.no_grad():\n"
            "    logits = model(ids).logits\n"
            f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
            "print(sorted(m for m in sys.modules if m.startswith('compress.')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    imported = json.loads(result.stdout.strip().replace("'", '"'))
    assert "compress.runtime.artifact" in imported
    assert not [m for m in imported if m.startswith("compress.passes")], imported
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_runtime_formats_and_evaluation_never_import_passes():
    """Every import statement under these packages, read from the source (lazy ones too)."""
    import ast
    from pathlib import Path

    import compress

    root = Path(compress.__file__).parent
    offenders = []
    for package in ("runtime", "formats", "evaluation", "kernels"):
        for file in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{file.name}: {n}" for n in names
                              if n.startswith(("compress.passes", "compress.pipeline"))]
    assert not offenders


def test_python_api_applies_a_recipe_to_a_model_in_memory(tmp_path):
    """compress.apply takes an nn.Module and a list of pass configs; the artifact it writes
    loads back to the same logits as the model it quantized in memory."""
    import compress
    from compress.passes import QuantizeConfig

    model = tiny_llama()
    config = QuantizeConfig.model_validate({"pass": "quantize", "format": "int4",
                                            "group_size": 32, "ignore": ["lm_head"]})
    # float32 artifact: the logits are compared exactly with the float32 model's
    report = compress.apply(model, [config], tmp_path / "art", device="cpu", save_dtype="float32")
    assert report["passes"][0]["pass"] == "quantize"
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(compress.load(tmp_path / "art")(ids).logits, model(ids).logits)


def test_python_api_takes_recipes_by_name_path_and_dicts():
    from compress.api import as_recipe
    from compress.recipe import BUNDLED

    by_name = as_recipe("int4-rtn")
    assert by_name == as_recipe(BUNDLED / "int4-rtn.yaml")
    assert as_recipe(by_name) is by_name
    assert as_recipe([{"pass": "quantize", "format": "nvfp4"}]).passes[0].format == "nvfp4"


def test_cpu_keeps_decoded_weights_within_its_budget(tmp_path, monkeypatch):
    """On the CPU a loaded model decodes each weight once (the reference path would otherwise
    decode it at every call); the outputs are exactly those of decoding every time, and a
    budget of 0 keeps nothing."""
    import compress
    from compress.runtime.modules import QuantizedLinear

    out, _ = _quantized_artifact(tmp_path)
    ids = torch.randint(0, 256, (1, 16))
    monkeypatch.setenv("COMPRESS_DECODED_CACHE_MB", "0")
    model = compress.load(out)
    with torch.no_grad():
        fresh = model(ids).logits
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert linears and not any(hasattr(m, "_decoded") for m in linears)
    monkeypatch.setenv("COMPRESS_DECODED_CACHE_MB", "64")
    model = compress.load(out)
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert all(hasattr(m, "_decoded") for m in linears)
    assert torch.equal(first, fresh) and torch.equal(second, fresh)


def test_loading_skips_random_init(tmp_path, monkeypatch):
    """Every weight comes from the artifact, so the skeleton is built without random init (it
    took 60 s of a 1.4B model's load on the H200 machine's CPU) and still gives the same logits."""
    import compress

    out, model = _quantized_artifact(tmp_path)
    calls = []
    real = torch.nn.init.kaiming_uniform_

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counting)
    torch.nn.Linear(4, 4)
    assert calls, "the counter must see an ordinary Linear's init"
    calls.clear()
    loaded = compress.load(out)
    assert not calls
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bench_baseline_runs_the_models_own_norms(tmp_path):
    """`compress bench`'s default baseline is the uncompressed model as transformers runs it:
    the fused-norm forward that compress.load installs on CUDA is the artifact's, not the
    baseline's (else bench reports less than kernels/bench_e2e.py against its bf16 row)."""
    from compress.evaluation.bench import dequantized_copy
    from compress.runtime.modules import QuantizedLinear
    from compress.runtime.norms import _fused_forward

    _, model = _quantized_artifact(tmp_path)
    norm = model.model.layers[0].input_layernorm
    norm.forward, norm.fused_rmsnorm = _fused_forward.__get__(norm), True   # as on CUDA
    dense = dequantized_copy(model)
    copied = dense.model.layers[0].input_layernorm
    assert "forward" not in vars(copied) and not copied.fused_rmsnorm
    assert "forward" in vars(norm)   # the artifact's model keeps its fused norms
    assert not any(isinstance(m, QuantizedLinear) for m in dense.modules())
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, model(ids).logits, atol=1e-4)
