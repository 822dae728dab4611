"""Mixture-of-experts models stream layer by layer like every other model: each layer's expert
tensors are read when the layer's turn comes, whether the checkpoint stores them per expert
(original checkpoints; Mixtral's under block_sparse_moe) or fused 3D (transformers' own layout),
split into the per-expert Linears split_experts makes in memory; the artifact is the one of the
model loaded whole, tensor by tensor, and a killed run resumes to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support import artifact_tensors, tiny_moe_dir

import compress

ROOT = Path(__file__).resolve().parents[1]
# 512 calibration tokens, top-2 of 4 experts: every expert sees more than min_tokens, so GPTQ
# calibrates the experts (no rounding-to-nearest fallback; checked)
CALIBRATION = {"samples": 8, "seq_len": 64, "batch_size": 4}
PASSES = {"rtn": {"pass": "quantize", "method": "rtn", "group_size": 32},
          "gptq": {"pass": "quantize", "method": "gptq", "group_size": 32}}


def recipe(method: str):
    from compress.recipe import parse_recipe

    return parse_recipe({"calibration": CALIBRATION, "passes": [PASSES[method]]})


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    base = tmp_path_factory.mktemp("moe")
    return {(family, fused): tiny_moe_dir(base / f"{family}-{'fused' if fused else 'split'}",
                                          family, fused)
            for family, fused in [(f, fused) for f in ("mixtral", "qwen3_moe", "qwen2_moe")
                                  for fused in (False, True)] + [("gpt_oss", True)]}


def stored_names(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return [n for n in handle.keys() if n.startswith("model.layers.0.") and "expert" in n]


def test_checkpoints_store_experts_per_expert_or_fused(moe_dirs):
    """The two layouts the reader meets (names as the safetensors headers give them)."""
    split = stored_names(moe_dirs["mixtral", False])
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in split and len(split) == 12
    assert sorted(stored_names(moe_dirs["qwen3_moe", True])) == [
        "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]


@pytest.mark.parametrize("family, fused", [
    (family, fused) for family in ("mixtral", "qwen3_moe", "qwen2_moe") for fused in (False, True)
] + [("gpt_oss", True)])   # gpt-oss: fused with biases, gate/up interleaved
def test_lazy_load_reads_what_the_whole_load_holds(moe_dirs, family, fused):
    from compress.models import decoder_layers, load_model

    path = moe_dirs[family, fused]
    whole, lazy = load_model(str(path)), load_model(str(path), lazy=True)
    assert lazy.tensors is not None
    assert all(p.device.type == "meta" for p in decoder_layers(lazy.model, lazy.arch).parameters())
    held = {n: t for n, t in lazy.model.state_dict().items() if t.device.type != "meta"}
    for index in range(2):
        prefix = f"model.layers.{index}."
        held.update({prefix + n: t for n, t in lazy.tensors.read_prefix(prefix).items()})
    expected = whole.model.state_dict()
    assert held.keys() == expected.keys()
    assert all(torch.equal(held[n], expected[n]) for n in expected)
    assert lazy.model.compress_structure == whole.model.compress_structure


def test_a_layout_the_split_does_not_reproduce_is_refused_before_streaming(moe_dirs,
                                                                           monkeypatch):
    """The weights stay on disk until each layer's turn, so the split is checked on random
    weights of the experts class at load: here a class whose gate_up rows hold up first."""
    from torch import nn
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from compress.errors import CompressError
    from compress.models import load_model

    gate_first = MixtralExperts.forward

    def up_first(self, *args):
        gate_up = self.gate_up_proj
        self.gate_up_proj = nn.Parameter(gate_up.roll(gate_up.shape[1] // 2, dims=1))
        try:
            return gate_first(self, *args)
        finally:
            self.gate_up_proj = gate_up

    monkeypatch.setattr(MixtralExperts, "forward", up_first)
    with pytest.raises(CompressError, match="cannot split them into per-expert Linears"):
        load_model(str(moe_dirs["mixtral", True]), lazy=True)


def apply(path: Path, out: Path, method: str, monkeypatch, whole: bool = False) -> list[int]:
    """compress.apply on the directory: streamed, or (whole) with the model loaded whole first,
    as MoE models were before they streamed (from_pretrained + split_experts, then the same
    layer-by-layer passes and layer files). Returns the number of decoder layers in memory
    after each layer is read."""
    from compress import offload, pipeline
    from compress.models import decoder_layers

    models, seen = [], []
    load_model, load = pipeline.load_model, offload.LayerStore.load

    def load_and_keep(*args, **kwargs):
        models.append(load_model(*args, **{**kwargs, "lazy": kwargs["lazy"] and not whole}))
        return models[-1]

    def load_and_count(self, index, layer):
        load(self, index, layer)
        layers = decoder_layers(models[0].model, models[0].arch)
        seen.append(sum(map(offload.is_materialized, layers)))

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "load_model", load_and_keep)
        patch.setattr(offload.LayerStore, "load", load_and_count)
        report = compress.apply(str(path), recipe(method), out)
    assert report["streamed"] is True and (models[0].tensors is None) == whole
    assert not report["passes"][0]["summary"].get("few_tokens_rtn")  # experts calibrated
    return seen


@pytest.mark.parametrize("family, fused, method", [
    (family, fused, method) for family in ("mixtral", "qwen3_moe") for fused in (False, True)
    for method in ("rtn", "gptq")] + [("gpt_oss", True, "gptq")])
def test_streamed_moe_artifact_equals_the_whole_load(moe_dirs, family, fused, method, tmp_path,
                                                    monkeypatch):
    path = moe_dirs[family, fused]
    assert apply(path, tmp_path / "whole", method, monkeypatch, whole=True)[0] == 2
    # each layer read when its turn comes (calibrated passes too): one in memory at a time
    assert apply(path, tmp_path / "streamed", method, monkeypatch) == [1, 1]
    a, b = artifact_tensors(tmp_path / "whole"), artifact_tensors(tmp_path / "streamed")
    down = "w2" if family == "mixtral" else "down_proj"
    assert f"model.layers.1.mlp.experts.3.{down}.weight_packed" in a
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_moe_artifact_equals_the_model_passed_in_memory(moe_dirs, tmp_path):
    """compress.apply on the model object (never streamed) gives the same GPTQ artifact. In
    float32: in a narrower save dtype a streamed run rounds each finished layer to it before
    computing the next layer's inputs (LayerStore.round_to_saved, for resume), a model in
    memory does not, for every family alike."""
    from compress.models import load_model

    path = moe_dirs["mixtral", False]
    loaded = load_model(str(path))
    compress.apply(loaded.model, recipe("gptq"), tmp_path / "memory",
                   tokenizer=loaded.tokenizer, save_dtype="float32")
    report = compress.apply(str(path), recipe("gptq"), tmp_path / "streamed",
                            save_dtype="float32")
    assert report["streamed"] is True
    a, b = artifact_tensors(tmp_path / "memory"), artifact_tensors(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_moe_run_resumes_to_the_same_artifact(moe_dirs, tmp_path):
    """GPTQ on a per-expert Mixtral checkpoint killed once layer 0 is written; rerun, it
    continues from layer 1 and writes what an uninterrupted run writes."""
    path = moe_dirs["mixtral", False]
    yaml = tmp_path / "gptq.yaml"
    yaml.write_text(recipe("gptq").to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "COMPRESS_FAULT_AFTER_LAYER"}
    env["PYTHONPATH"] = str(ROOT)

    def cli(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        extra = {"COMPRESS_FAULT_AFTER_LAYER": fault} if fault else {}
        return subprocess.run([sys.executable, "-m", "compress", "apply", str(yaml), str(path),
                               "-o", str(out)], check=False, capture_output=True, text=True,
                              timeout=600, env={**env, **extra},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    whole = cli(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert cli(tmp_path / "resumed", fault="0:0:KILL").returncode == -9
    done = cli(tmp_path / "resumed")
    assert done.returncode == 0, done.stderr
    assert "resuming the interrupted run" in done.stderr
    report = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert report["passes"][0]["summary"]["resumed_at_layer"] == 1
    a, b = artifact_tensors(tmp_path / "whole"), artifact_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
