"""Data-parallel calibration over NCCL (`--gpus 2`): the artifact equals the one-GPU artifact up
to float rounding (tolerances: tests/test_distributed.py, which checks the same on CPU ranks),
and a rank killed mid-run stops the group with one line (no hang) and the run resumes."""

from __future__ import annotations

import json

import pytest
import torch
from support import assert_same_up_to_rounding, tiny_model_dir

import compress
from compress.errors import CompressError

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA devices (an H200 x2 or x4 host)")

CALIBRATION = "calibration: {source: stdlib, samples: 32, seq_len: 128, seed: 0, batch_size: 8}\n"
RECIPES = {
    "gptq": CALIBRATION + "passes:\n  - {pass: quantize, format: int4, group_size: 32, "
                          "method: gptq}\n",
    "sparsegpt": CALIBRATION + "passes:\n  - {pass: sparsify, method: sparsegpt, "
                               "pattern: \"2:4\", storage: dense}\n",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_two_gpus_equal_one(model_dir, tmp_path, kind):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES[kind])
    compress.apply(str(model_dir), recipe, tmp_path / "one", device="cuda")
    report = compress.apply(str(model_dir), recipe, tmp_path / "two", device="cuda", gpus=2)
    assert [r["device"] for r in report["ranks"]] == ["cuda:0", "cuda:1"]
    assert all(r["peak_memory_gb"] > 0 for r in report["ranks"])
    assert_same_up_to_rounding(tmp_path / "one", tmp_path / "two")


def test_a_killed_rank_stops_the_group_and_the_run_resumes(model_dir, tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES["gptq"])
    out = tmp_path / "two"
    monkeypatch.setenv("COMPRESS_FAULT_AFTER_LAYER", "0:0:KILL:1")
    with pytest.raises(CompressError, match=r"^rank 1 of 2 died \(SIGKILL\).*resume"):
        compress.apply(str(model_dir), recipe, out, device="cuda", gpus=2)
    partial = tmp_path / ".two.partial"
    assert json.loads((partial / "run.json").read_text())["current"] == {"pass": 0, "layer": 0}
    monkeypatch.delenv("COMPRESS_FAULT_AFTER_LAYER")
    report = compress.apply(str(model_dir), recipe, out, device="cuda", gpus=2)
    assert report["resumed"] is True and not partial.exists()
    compress.apply(str(model_dir), recipe, tmp_path / "one", device="cuda")
    assert_same_up_to_rounding(tmp_path / "one", out)
