"""Every bundled recipe on CUDA: the GPU-made artifact against the CPU-made one, tensor by tensor
and by logits; both load on either device; the user commands run on CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

# How close the GPU-made artifact is to the CPU-made one. The calibration forward and the
# Hessians differ by float32 summation order, so a weight that lies on a rounding tie may take
# the neighbouring code. Round-to-nearest stops there; GPTQ/SparseGPT carry each changed code
# into every later column's update (and SparseGPT into the mask), so the two artifacts are two
# different solutions of one problem: on the H200 (2026-12-03) 18-79% of their integer words
# were equal (2:4 metadata the lowest) and scales differed by up to 7%. They are checked by
# quality: the GPU-made artifact's logits are no further from the float model's than the
# CPU-made one's (+15%); a layout or formula error fails that by far.
#   words:   share of equal integer words (a packed int32 holds 8 INT4 codes: one differing code
#            changes the word) over every integer tensor (None: not compared);
#   rel:     ||a - b|| / ||b|| of every float tensor (scales, unquantized weights, norms);
#   logits:  ||a - b|| / ||b|| of the logits of the two artifacts, both run on the CPU (None:
#            checked by quality, `quality`: GPU-made error <= quality x CPU-made error).
EXACT = {"words": 1.0, "rel": 1e-5, "logits": 1e-5}        # structural passes, float32 only
RTN = {"words": 0.995, "rel": 1e-3, "logits": 1e-3}        # round-to-nearest: ties only
CALIBRATED = {"words": None, "rel": None, "logits": None, "quality": 1.15}  # GPTQ, SparseGPT
# Wanda and head pruning choose from calibration statistics without error feedback: ties only
TIES = {"words": 0.90, "rel": 0.02, "logits": 0.03}
TOLERANCE = {"rmsnorm": EXACT, "precompute": EXACT, "int4-rtn": RTN, "nvfp4-rtn": RTN,
             "mxfp4-rtn": RTN, "sparse24-magnitude": RTN, "fold-norms-int4": RTN,
             "sparse24-wanda": TIES, "prune-heads-kv": TIES, "prune-heads-uniform": TIES}


def cli(*args: str) -> None:
    """Run `compress ARGS` in this process (imports are paid once for the whole suite)."""
    from compress.cli import main

    sys.argv = ["compress", *args]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, f"compress {' '.join(args)} exited with {exc.code}"


def tensors(artifact: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(artifact.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def logits(artifact: Path, device: str, ids: torch.Tensor) -> torch.Tensor:
    import compress

    model = compress.load(artifact, device=device, dtype=torch.float32)
    with torch.no_grad():
        out = model(ids.to(device)).logits.float().cpu()
    del model
    torch.cuda.empty_cache()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def small_calibration(recipe: Path, tmp_path: Path) -> Path:
    """The recipe with its passes unchanged and 16 calibration samples of 128 tokens (the tiny
    model needs no more; it keeps the suite to a few minutes)."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    if "calibration" in data:
        data["calibration"].update(samples=16, seq_len=128)
    path = tmp_path / recipe.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_on_cuda_matches_cpu(recipe, tiny_dir, tmp_path, ids):
    tol = TOLERANCE.get(recipe.stem, CALIBRATED)
    small = small_calibration(recipe, tmp_path)
    made = {}
    for device in ("cpu", "cuda"):
        made[device] = tmp_path / device
        # float32 storage: the tolerances compare what the two devices computed, not the
        # rounding to the default bfloat16 storage on top of it
        cli("apply", str(small), str(tiny_dir), "-o", str(made[device]), "--device", device,
            "--save-dtype", "float32")
    cpu, gpu = tensors(made["cpu"]), tensors(made["cuda"])
    assert cpu.keys() == gpu.keys()
    equal_words = total_words = 0
    for key in cpu:
        a, b = gpu[key], cpu[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if not a.dtype.is_floating_point:
            equal_words += int((a == b).sum())
            total_words += a.numel()
    words = equal_words / total_words if total_words else 1.0
    worst = max((rel(gpu[k].float(), cpu[k].float()) for k in cpu
                 if cpu[k].dtype.is_floating_point), default=0.0)
    on_cpu = logits(made["cpu"], "cpu", ids)
    gpu_made_on_cpu = logits(made["cuda"], "cpu", ids)
    close = rel(gpu_made_on_cpu, on_cpu)
    print(f"\nCLOSENESS {recipe.stem}: equal words {words:.4f}, worst float tensor {worst:.2e}, "
          f"logits {close:.2e}", end="")
    assert tol["words"] is None or words >= tol["words"], words
    assert tol["rel"] is None or worst <= tol["rel"], worst
    if tol["logits"] is not None:
        assert close <= tol["logits"], close
    else:   # two solutions of the same problem: the GPU's is as good as the CPU's
        from transformers import AutoModelForCausalLM

        source = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        with torch.no_grad():
            exact = source(ids).logits.float()
        error_cpu, error_gpu = rel(on_cpu, exact), rel(gpu_made_on_cpu, exact)
        print(f", error vs float: CPU-made {error_cpu:.4f}, GPU-made {error_gpu:.4f}", end="")
        assert error_gpu <= tol["quality"] * error_cpu, (error_gpu, error_cpu)
    # the GPU-made artifact on the GPU (Triton kernels) against itself on the CPU (references)
    assert rel(logits(made["cuda"], "cuda", ids), gpu_made_on_cpu) <= 1e-3


@pytest.fixture(scope="module")
def gpu_artifact(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("made") / "int4-gptq"
    cli("apply", "int4-gptq", str(tiny_dir), "-o", str(out), "--device", "cuda")
    return out


def test_generate_bench_evaluate_compare_on_cuda(gpu_artifact, tiny_dir, tmp_path):
    cli("generate", str(gpu_artifact), "def add(a, b):", "--max-new-tokens", "8",
        "--device", "cuda")
    cli("bench", str(gpu_artifact), "--prompt-len", "32", "--new-tokens", "8", "--repeats", "1",
        "--device", "cuda")
    cli("evaluate", str(gpu_artifact), "--baseline", str(tiny_dir), "--seq-len", "128",
        "--max-tokens", "1024")
    cli("compare", str(tiny_dir), "int4-rtn", "sparse24-int4", "-o", str(tmp_path / "sweep"),
        "--tasks", "", "--seq-len", "128", "--max-tokens", "1024")
    assert (tmp_path / "sweep" / "compare.md").exists()
