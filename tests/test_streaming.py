"""Bounded memory and resume: layers stream from disk, a killed run continues where it stopped
and produces the same tensors as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import copy_model_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "int4-rtn.yaml"


def compress_cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COMPRESS_FAULT_AFTER_LAYER", None)
    if fault:
        env["COMPRESS_FAULT_AFTER_LAYER"] = fault
    # SIGINT default in the child even when this test runs in a background job (which a shell
    # starts with SIGINT ignored, and Python keeps it ignored).
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True,
                          text=True, env=env, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def tensors(artifact: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(artifact.glob("*.safetensors")):
        found.update(load_file(str(file)))
    return found


@pytest.fixture(scope="module")
def uninterrupted(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("streamed") / "int4"
    done = compress_cli("apply", str(RECIPE), str(hf_dir), "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_lazy_load_keeps_layers_on_meta(hf_dir):
    from compress.models import decoder_layers, load_model

    loaded = load_model(str(hf_dir), lazy=True)
    layers = decoder_layers(loaded.model, loaded.arch)
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert loaded.model.model.embed_tokens.weight.device.type == "cpu"
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_only_one_layer_is_in_memory_at_a_time(hf_dir, tmp_path):
    from compress.models import decoder_layers, load_model
    from compress.offload import LayerStore, is_materialized
    from compress.passes import Context
    from compress.recipe import load_recipe
    from compress.runtime.checkpoint import Checkpoint

    loaded = load_model(str(hf_dir), lazy=True)
    layers = decoder_layers(loaded.model, loaded.arch)
    ctx = Context(loaded.model, loaded.tokenizer, loaded.arch, load_recipe(RECIPE).calibration,
                  torch.device("cpu"))
    ctx.store = LayerStore("model.layers", tmp_path, Checkpoint.open(hf_dir), torch.float32)
    seen = []
    for index, _, layer in ctx.layers():
        seen.append(sum(is_materialized(other) for other in layers))
        assert is_materialized(layer)
    assert seen == [1] * 30
    assert len(ctx.store.written()) == 30 and not any(map(is_materialized, layers))


def test_streamed_artifact_is_sharded_and_loads_everywhere(uninterrupted, eval_windows):
    from transformers import AutoModelForCausalLM

    import compress

    index = json.loads((uninterrupted / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 31  # 30 layer shards + the rest
    report = json.loads((uninterrupted / "report.json").read_text())
    assert report["streamed"] is True
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # the default save dtype for a float32 source
    assert not (uninterrupted / "run.json").exists()
    ids = eval_windows[:1, :64]
    with torch.no_grad():
        ours = compress.load(uninterrupted, dtype=torch.float32)(ids).logits  # (saved in bf16)
        theirs = AutoModelForCausalLM.from_pretrained(uninterrupted, dtype=torch.float32)(ids).logits
    assert (ours - theirs).abs().max() < 1e-3


def test_streamed_equals_in_memory_gguf_run(uninterrupted, tmp_path):
    """The same recipe from the HF directory (streamed) and from the GGUF (held in memory)."""
    out = tmp_path / "from-gguf"
    done = compress_cli("apply", str(RECIPE), "smollm2-135m", "-o", str(out))
    assert done.returncode == 0, done.stderr
    a, b = tensors(uninterrupted), tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault", ["0:0:KILL", "0:17:KILL", "0:29:KILL"])
def test_killed_run_resumes_to_identical_tensors(uninterrupted, hf_dir, tmp_path, fault):
    out = tmp_path / "int4"
    killed = compress_cli("apply", str(RECIPE), str(hf_dir), "-o", str(out), fault=fault)
    assert killed.returncode == -9
    partial = tmp_path / ".int4.partial"
    assert not out.exists() and (partial / "run.json").is_file()
    layer = int(fault.split(":")[1])
    assert json.loads((partial / "run.json").read_text())["current"] == {"pass": 0,
                                                                           "layer": layer}
    resumed = compress_cli("apply", str(RECIPE), str(hf_dir), "-o", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the interrupted run" in resumed.stderr
    assert not partial.exists()
    a, b = tensors(uninterrupted), tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] is True
    assert report["passes"][0]["summary"]["resumed_at_layer"] == layer + 1


def test_resume_refuses_a_different_recipe(hf_dir, tmp_path):
    out = tmp_path / "int4"
    assert compress_cli("apply", str(RECIPE), str(hf_dir), "-o", str(out),
                        fault="0:5:KILL").returncode == -9
    other = tmp_path / "g32.yaml"
    other.write_text(RECIPE.read_text().replace("group_size: 64", "group_size: 32"))
    refused = compress_cli("apply", str(other), str(hf_dir), "-o", str(out))
    assert refused.returncode == 1
    assert "different recipe" in refused.stderr and "--restart" in refused.stderr
    restarted = compress_cli("apply", str(other), str(hf_dir), "-o", str(out), "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert "resuming" not in restarted.stderr


def test_sigint_exits_130_and_keeps_the_run_for_resume(uninterrupted, hf_dir, tmp_path):
    out = tmp_path / "int4"
    done = compress_cli("apply", str(RECIPE), str(hf_dir), "-o", str(out), fault="0:3:INT")
    assert done.returncode == 130, done.stderr
    assert "rerun the same command to resume" in " ".join(done.stderr.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".int4.partial"]
    resumed = compress_cli("apply", str(RECIPE), str(hf_dir), "-o", str(out))
    assert resumed.returncode == 0 and "resuming the interrupted run" in resumed.stderr
    a, b = tensors(uninterrupted), tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_reads_no_weights(hf_dir, tmp_path):
    model = copy_model_dir(hf_dir, tmp_path / "model")
    for shard in model.glob("*.safetensors"):  # a dry run must not need the tensor data
        data = shard.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        shard.unlink()
        shard.write_bytes(data[:header] + b"\0" * (len(data) - header))
    done = compress_cli("apply", str(RECIPE), str(model), "-o", str(tmp_path / "out"),
                        "--dry-run", "--tp", "2")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stderr.split())
    assert "210 modules -> int4-sym-g64" in text
    assert "estimated output size" in text and "estimated peak memory" in text
    assert "layers streamed from disk" in text and "free disk space: enough" in text
    assert "num_attention_heads 9 is not divisible by --tp 2" in text
    assert not (tmp_path / "out").exists()


GPTQ_RECIPE = """calibration: {source: stdlib, samples: 8, seq_len: 64, seed: 0}
passes:
  - pass: quantize
    format: int4
    group_size: 64
    method: gptq
"""


def test_killed_gptq_run_resumes_to_identical_tensors(hf_dir, tmp_path):
    """A calibrated pass resumes too: the inputs of the next layer are rebuilt by re-running
    the written layers, so the result is the same as an uninterrupted run's."""
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(GPTQ_RECIPE)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert compress_cli("apply", str(recipe), str(hf_dir), "-o", str(whole)).returncode == 0
    killed = compress_cli("apply", str(recipe), str(hf_dir), "-o", str(resumed),
                          fault="0:11:KILL")
    assert killed.returncode == -9
    done = compress_cli("apply", str(recipe), str(hf_dir), "-o", str(resumed))
    assert done.returncode == 0, done.stderr
    a, b = tensors(whole), tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_pass_rounds_a_layer_to_what_it_saves(tmp_path):
    """Before the calibrator re-runs a finished layer for the next layer's inputs, the layer
    holds what its file will hold (bfloat16 values, float32 compute): a resumed run, which
    re-runs it from that file, then computes the same inputs. Codes are untouched."""
    from support import tiny_llama

    from compress.formats import WeightFormat, codec
    from compress.offload import LayerStore
    from compress.passes.quantize import replace_with_quantized

    layer = tiny_llama().model.layers[0]
    fmt = WeightFormat(group_size=32)
    proj = layer.mlp.up_proj
    replace_with_quantized(layer, "mlp.up_proj", proj, codec(fmt).quantize(proj.weight.data, fmt))
    codes = layer.mlp.up_proj.weight_packed.clone()
    store = LayerStore("model.layers", tmp_path, None, torch.float32)
    store.final_dtype = torch.bfloat16
    before = [v for v in layer.state_dict().values() if v.is_floating_point()]
    assert not all(torch.equal(v, v.bfloat16().float()) for v in before)  # random: not bf16
    store.round_to_saved(layer)
    held = {k: v.clone() for k, v in layer.state_dict().items()}
    floats = [v for v in held.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    assert all(torch.equal(v, v.bfloat16().float()) for v in floats)
    assert torch.equal(layer.mlp.up_proj.weight_packed, codes)
    store.save(0, layer)
    store.load(0, layer)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in held.items())


def test_a_layer_whose_modules_share_a_tensor_is_saved(tmp_path):
    """NVFP4 GPTQ gives fused q/k/v one global-scale tensor; saved in the compute dtype (float32
    storage of a float32 run, no cast that would copy it), safetensors refused the shared
    memory (found on the H200 suite, nvfp4-gptq with --save-dtype float32)."""
    from support import tiny_llama

    from compress.offload import LayerStore

    layer = tiny_llama().model.layers[0]
    shared = torch.tensor([448.0 * 6.0])
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(layer.self_attn, name).register_buffer("weight_global_scale", shared)
    store = LayerStore("model.layers", tmp_path, None, torch.float32)
    store.final_dtype = torch.float32
    held = {k: v.clone() for k, v in layer.state_dict().items()}
    store.save(0, layer)
    store.load(0, layer)
    state = layer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in held.items())
    scales = [state[f"self_attn.{n}.weight_global_scale"] for n in ("q_proj", "k_proj", "v_proj")]
    assert all(torch.equal(s, shared) for s in scales)


# SparseGPT 2:4 on three layers (SparseGPT's column loop is slow on 2 cores), then INT4 RTN on
# every layer: the last pass writes layers 0-2 in 2:4 + INT4 storage and the rest as INT4.
SPARSE_RECIPE = r"""calibration: {source: stdlib, samples: 4, seq_len: 64, seed: 0}
passes:
  - pass: sparsify
    method: sparsegpt
    pattern: "2:4"
    targets: ['re:model\.layers\.[0-2]\..*']
  - pass: quantize
    format: int4
    group_size: 64
"""


@pytest.fixture(scope="module")
def sparse_streamed(hf_dir, tmp_path_factory) -> tuple[Path, Path]:
    recipe = tmp_path_factory.mktemp("sparse") / "sparse-int4.yaml"
    recipe.write_text(SPARSE_RECIPE)
    out = recipe.parent / "streamed"
    done = compress_cli("apply", str(recipe), str(hf_dir), "-o", str(out),
                        "--save-dtype", "float32")
    assert done.returncode == 0, done.stderr
    return recipe, out


def test_sparsify_streams_and_equals_the_in_memory_run(sparse_streamed, smollm2_copy,
                                                       tmp_path):
    """SparseGPT 2:4 then INT4 from an HF directory streams layer by layer (each layer is
    converted to 2:4 storage as the last pass writes it) and writes the tensors that the same
    recipe writes for the model held in memory."""
    import compress

    recipe, streamed = sparse_streamed
    assert json.loads((streamed / "report.json").read_text())["streamed"] is True
    held = tmp_path / "held"
    report = compress.apply(smollm2_copy.model, recipe, held, tokenizer=smollm2_copy.tokenizer,
                            save_dtype="float32")
    assert report["streamed"] is False
    a, b = tensors(streamed), tensors(held)
    assert sorted({k.split(".")[2] for k in a if k.endswith("weight_meta")}) == ["0", "1", "2"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((streamed / "config.json").read_text())
    assert "sparse24_pending" not in config["compress"]["structure"]
    assert config["compress"]["structure"]["sparse24"]


@pytest.mark.parametrize("fault", ["0:1:KILL", "1:11:KILL"])
def test_killed_sparsify_run_resumes_to_identical_tensors(sparse_streamed, hf_dir, tmp_path,
                                                          fault):
    """Killed in the sparsify pass, or in the last pass after some layers were written in 2:4
    storage: the rerun rebuilds those layers' modules and ends with the same tensors."""
    recipe, streamed = sparse_streamed
    out = tmp_path / "resumed"
    args = ("apply", str(recipe), str(hf_dir), "-o", str(out), "--save-dtype", "float32")
    assert compress_cli(*args, fault=fault).returncode == -9
    done = compress_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "resuming the interrupted run" in done.stderr
    a, b = tensors(streamed), tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
