"""Data-parallel calibration (compress.distributed): two gloo ranks on the CPU write the artifact
one process writes, up to float rounding; a rank that dies stops the run with one line and
leaves a run that resumes on two ranks.

Tolerance: each rank sums the statistics of its share of the samples and the shares are then
summed, so the Hessians differ from one process's by float32 rounding (the order of the sums).
Scales and weights move continuously with them (observed here: <= 1.2e-5 relative; asserted
1e-4). A GPTQ code or a SparseGPT mask entry changes only where a weight lies within that
rounding of a decision boundary: at most 0.1% of them may differ (none did in our runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import assert_same_up_to_rounding, tiny_model_dir

import compress
from compress.errors import CompressError, UsageError

CALIBRATION = "calibration: {source: stdlib, samples: 16, seq_len: 64, seed: 0, batch_size: 4}\n"
GPTQ = CALIBRATION + """passes:
  - {pass: quantize, format: int4, group_size: 32, method: gptq}
"""
SPARSEGPT = CALIBRATION + """passes:
  - {pass: sparsify, method: sparsegpt, pattern: "2:4", storage: dense}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_sparsegpt_on_two_ranks_equals_one_process(model_dir, tmp_path):
    path = recipe(tmp_path, SPARSEGPT)
    # float32 storage: the comparison allows summation-order rounding, not bfloat16 storage's
    compress.apply(str(model_dir), path, tmp_path / "one", device="cpu", save_dtype="float32")
    report = compress.apply(str(model_dir), path, tmp_path / "two", device="cpu", gpus=2,
                            save_dtype="float32")
    assert [r["device"] for r in report["ranks"]] == ["cpu", "cpu"]
    assert_same_up_to_rounding(tmp_path / "one", tmp_path / "two")


def test_gptq_on_two_ranks_resumes_after_a_rank_dies_and_equals_one_process(
        model_dir, tmp_path, monkeypatch):
    path = recipe(tmp_path, GPTQ)
    out = tmp_path / "two"
    monkeypatch.setenv("COMPRESS_FAULT_AFTER_LAYER", "0:0:KILL:1")  # rank 1, after layer 0
    with pytest.raises(CompressError) as failed:
        compress.apply(str(model_dir), path, out, device="cpu", gpus=2, save_dtype="float32")
    message = str(failed.value)
    assert failed.value.exit_code == 1 and "\n" not in message
    assert message.startswith("rank 1 of 2 died (SIGKILL)")
    assert "rerun the same command to resume" in message
    partial = tmp_path / ".two.partial"
    assert not out.exists()
    assert json.loads((partial / "run.json").read_text())["current"] == {"pass": 0, "layer": 0}
    assert [p.name for p in partial.glob("layer-*")] == ["layer-00000.safetensors"]

    monkeypatch.delenv("COMPRESS_FAULT_AFTER_LAYER")
    report = compress.apply(str(model_dir), path, out, device="cpu", gpus=2, save_dtype="float32")
    assert report["resumed"] is True and len(report["ranks"]) == 2
    assert report["passes"][0]["summary"]["resumed_at_layer"] == 1
    assert not partial.exists()
    compress.apply(str(model_dir), path, tmp_path / "one", device="cpu", save_dtype="float32")
    assert_same_up_to_rounding(tmp_path / "one", out)


def test_requests_that_cannot_run_on_several_ranks_fail_before_any_process_starts(
        model_dir, tmp_path, monkeypatch):
    def refused(text: str, **options) -> str:
        with pytest.raises(UsageError) as error:
            compress.apply(str(model_dir), recipe(tmp_path, text), tmp_path / "out", **options)
        return str(error.value)

    prune = CALIBRATION + "passes:\n  - {pass: prune_heads, uniform: 1}\n"
    assert "'prune_heads' does not run on several GPUs" in refused(prune, device="cpu", gpus=2)
    few = GPTQ.replace("samples: 16", "samples: 2")
    assert "fewer than --gpus 3" in refused(few, device="cpu", gpus=3)
    assert "at least 1" in refused(GPTQ, device="cpu", gpus=0)
    if not torch.cuda.is_available():
        assert "--device cpu" in refused(GPTQ, gpus=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets them
    assert "group of 4" in refused(GPTQ, device="cpu", gpus=2)
    assert not (tmp_path / "out").exists()


def _collectives_on_each_rank() -> None:
    """Run on two gloo ranks: sum_stats, spread and share against what one process computes
    (an assertion that fails reaches the launcher as the rank's error), then rank 1 fails."""
    from compress import distributed
    from compress.calib import InputStats

    def tokens(r: int) -> torch.Tensor:
        return torch.randn(5 + r, 6, generator=torch.Generator().manual_seed(r))

    def stats_of(x: torch.Tensor | None) -> InputStats:
        return InputStats() if x is None else InputStats(len(x), x.T @ x, x.abs().sum(0),
                                                         x.pow(2).sum(0))

    with distributed.joined("cpu"):
        me = distributed.rank()
        stats = {"both": stats_of(tokens(me)), "rank 1 only": stats_of(tokens(1) if me else None),
                 "nobody": stats_of(None)}
        distributed.sum_stats(stats, ["gram", "abs_sum", "square_sum"])
        want = {"both": stats_of(torch.cat([tokens(0), tokens(1)])),
                "rank 1 only": stats_of(tokens(1))}
        for key, entry in want.items():
            assert stats[key].count == entry.count, key
            for f in ("gram", "abs_sum", "square_sum"):
                assert torch.allclose(getattr(stats[key], f), getattr(entry, f), atol=1e-5), f
        assert stats["nobody"].count == 0 and stats["nobody"].gram is None
        ran = distributed.spread([lambda i=i: {"by": me, "t": torch.full((2,), float(i))}
                                  for i in range(3)], [3.0, 1.0, 1.0])
        assert [r["by"] for r in ran] == [0, 1, 1], ran
        assert [r["t"].tolist() for r in ran] == [[0, 0], [1, 1], [2, 2]], ran
        shared = distributed.share({"codes": torch.arange(4, dtype=torch.int8) * me, "n": me}, 1)
        assert shared["codes"].tolist() == [0, 1, 2, 3] and shared["n"] == 1, shared
    if me == 1:
        raise UsageError("checks passed; this error is the test's")


def test_statistics_solves_and_results_cross_ranks_and_a_rank_error_is_one_line(tmp_path):
    from compress.distributed import launch

    with pytest.raises(CompressError) as failed:
        launch(2, _collectives_on_each_rank, (), {}, tmp_path)
    assert str(failed.value) == "rank 1: checks passed; this error is the test's"
    assert failed.value.exit_code == 2


def test_solves_go_to_the_least_loaded_rank_costliest_first():
    from compress.distributed import owners

    # GPTQ of a Llama layer: columns of q/k/v, o, gate/up, down
    assert owners([4096, 4096, 4096, 14336], 2) == [1, 1, 1, 0]
    assert owners([4096, 4096, 4096, 14336], 4) == [1, 2, 3, 0]
    assert owners([1.0, 1.0, 1.0], 2) == [0, 1, 0]
    assert owners([], 3) == []
