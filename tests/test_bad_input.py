"""Bad input: one clear error line, a non-zero exit (2 for usage), and nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import support

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "int4-rtn.yaml"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code, _, err = support.run_cli(capsys, *args)
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe, message", [
    ("passes:\n  - pass: quantise\n", "unknown pass 'quantise'"),
    ("passes:\n  - pass: quantize\n    group_sise: 64\n", "passes[0].group_sise: unknown field"),
    ("calibration: {samples: 0}\npasses:\n  - pass: quantize\n",
     "calibration.samples: Input should be greater than or equal to 1"),
    ("passes: [\n", "not valid YAML"),
])
def test_recipe_errors_exit_2_before_loading(tmp_path, capsys, recipe, message):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "apply", str(write_recipe(tmp_path, recipe)), "no-such-model",
                        "-o", str(out))
    assert code == 2 and message in error_line(err)
    assert not out.exists()


def test_missing_model(tmp_path, capsys):
    code, err = run_cli(capsys, "apply", str(RECIPE), str(tmp_path / "nowhere"), "-o",
                        str(tmp_path / "out"))
    assert code == 2 and "not found" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_refused(tmp_path, capsys, hf_dir):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    code, err = run_cli(capsys, "apply", str(RECIPE), str(model_dir), "-o", str(tmp_path / "o"))
    line = error_line(err)
    assert code == 2 and "pickle" in line and "--allow-pickle" in line
    assert not (tmp_path / "o").exists()


def test_corrupt_safetensors(tmp_path, capsys, hf_dir):
    model_dir = tmp_path / "corrupt"
    model_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((hf_dir / name).read_bytes())
    data = (hf_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 3])  # truncated
    code, err = run_cli(capsys, "apply", str(RECIPE), str(model_dir), "-o", str(tmp_path / "o"))
    line = error_line(err)  # (was `code == 1 and A or B`: passed on B whatever the exit code)
    assert code == 1 and "model.safetensors" in line and "corrupt" in line
    assert not (tmp_path / "o").exists()


def test_non_empty_output_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, "apply", str(RECIPE), "smollm2-135m", "-o", str(out))
    assert code == 2 and "--overwrite" in error_line(err)
    assert (out / "precious.txt").read_text() == "keep me"
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_output_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    code, err = run_cli(capsys, "apply", str(RECIPE), "smollm2-135m", "-o", str(out))
    assert code == 2 and "is a file" in error_line(err)
    assert out.read_text() == "x"


def test_unwritable_output_directory(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits: use a place no one can write
        parent = Path("/proc/compress-no-such-dir")
    else:
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o500)
    code, err = run_cli(capsys, "apply", str(RECIPE), "smollm2-135m", "-o", str(parent / "out"))
    assert code == 2 and "cannot write" in error_line(err)


def test_calibration_file_empty(tmp_path, capsys):
    text = tmp_path / "empty.txt"
    text.write_text("   \n\n  ")
    recipe = write_recipe(tmp_path, f"calibration: {{source: {text}}}\npasses:\n"
                                    "  - pass: quantize\n")
    from compress.calib import calibration_windows
    from compress.errors import UsageError
    from compress.recipe import load_recipe

    with pytest.raises(UsageError, match="holds no text"):
        calibration_windows(None, load_recipe(recipe).calibration)


def test_unknown_architecture_named_before_weights(tmp_path, capsys):
    model_dir = tmp_path / "t5"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "t5"}))
    import torch
    from safetensors.torch import save_file

    save_file({"shared.weight": torch.zeros(2, 2)}, str(model_dir / "model.safetensors"))
    code, err = run_cli(capsys, "apply", str(RECIPE), str(model_dir), "-o", str(tmp_path / "o"))
    line = error_line(err)
    assert code == 2 and "unsupported architecture 't5'" in line and "llama" in line


def test_calibration_text_shorter_than_one_sample(tmp_path, smollm2):
    from compress.calib import CalibrationConfig, calibration_windows
    from compress.errors import UsageError

    text = tmp_path / "short.txt"
    text.write_text("Return the number of items in a container.")
    with pytest.raises(UsageError, match="fewer than one sample of seq_len=512"):
        calibration_windows(smollm2.tokenizer, CalibrationConfig(source=str(text)))


def test_config_that_does_not_match_the_weights(tmp_path, capsys, hf_dir):
    from support import copy_model_dir

    model = copy_model_dir(hf_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 1024
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "o"
    code, err = run_cli(capsys, "apply", str(RECIPE), str(model), "-o", str(out))
    line = error_line(err)
    assert code == 1 and "has shape" in line and "but the config implies" in line
    assert "1536" in line and "1024" in line
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_nan_weight_names_the_module(tmp_path, capsys, hf_dir):
    from safetensors.torch import load_file, save_file
    from support import copy_model_dir

    model = copy_model_dir(hf_dir, tmp_path / "model")
    shard = model / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.3.mlp.up_proj.weight"][7, 11] = float("nan")
    shard.unlink()  # a hard link to the shared copy: replace, don't write into it
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "o"
    code, err = run_cli(capsys, "apply", str(RECIPE), str(model), "-o", str(out))
    line = error_line(err)
    assert code == 1 and "model.layers.3.mlp.up_proj" in line and "NaN or Inf" in line
    assert not out.exists() and "--restart to discard it" in line  # the partial run is kept


def test_model_needing_remote_code(tmp_path, capsys, hf_dir):
    from support import copy_model_dir

    model = copy_model_dir(hf_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (model / "config.json").write_text(json.dumps(config))
    code, err = run_cli(capsys, "apply", str(RECIPE), str(model), "-o", str(tmp_path / "o"))
    assert code == 2 and "--trust-remote-code" in error_line(err)


def test_ignore_pattern_matching_nothing_warns(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "passes:\n  - pass: quantize\n    group_size: 64\n"
                                    "    ignore: [lm_head, mlp.gate_prj]\n")
    code, err = run_cli(capsys, "apply", str(recipe), "smollm2-135m", "-o", str(tmp_path / "o"),
                        "--dry-run")
    assert code == 0 and "ignore pattern 'mlp.gate_prj' matches no module" in " ".join(
        err.split())


def test_pattern_splitting_a_fused_group_is_refused(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "passes:\n  - pass: quantize\n    group_size: 64\n"
                                    "    ignore: [lm_head, k_proj]\n")
    out = tmp_path / "o"
    code, err = run_cli(capsys, "apply", str(recipe), "smollm2-135m", "-o", str(out))
    line = error_line(err)
    assert code == 2 and "q_proj" in line and "fused" in line and "together" in line
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (("apply", str(RECIPE), "-o", "out"), "Missing argument 'model'"),
    (("apply", str(RECIPE), "smollm2-135m", "-o", "out", "--bogus"), "No such option: --bogus"),
])
def test_command_line_mistakes_exit_2_with_clicks_message(tmp_path, capsys, monkeypatch,
                                                          args, message):
    """typer (>= 0.20 vendors its own click) raises its own copy of click's usage errors:
    they are usage errors all the same (exit 2, click's message), not "a bug in compress"."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, *args)
    assert code == 2 and message in err and "bug in compress" not in err
    assert not (tmp_path / "out").exists()
