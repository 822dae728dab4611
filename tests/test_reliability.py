"""Never lose or corrupt a user's data (issue 19): one test per case of docs/reliability.md.

Tiny random Llamas with a byte tokenizer keep these fast; the kill tests run the CLI in a
subprocess (SIGKILL through COMPRESS_FAULT_AFTER_LAYER), the rest run it in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import support
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RTN = "calibration: {source: calib.txt, samples: 2, seq_len: 16}\npasses:\n" \
      "  - {pass: quantize, format: int4, group_size: 32, method: rtn}\n"


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return " ".join(errors[0].split())


def cli(capsys, *args: str) -> tuple[int, str]:
    code, _, err = support.run_cli(capsys, *args)
    return code, err


def flat(text: str) -> str:
    return " ".join(text.split())


def cli_process(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("COMPRESS_FAULT_AFTER_LAYER", None)
    if fault:
        env["COMPRESS_FAULT_AFTER_LAYER"] = fault
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True,
                          text=True, env=env, timeout=600, check=False,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def tensors(artifact: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(artifact.glob("*.safetensors")):
        found.update(load_file(str(file)))
    return found


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama as an HF directory; never modify it (copy with support.copy_model_dir)."""
    return support.tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working directory holding the recipe and its calibration text (real stdlib prose)."""
    import inspect

    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text(inspect.getdoc(json) * 4)
    (tmp_path / "r.yaml").write_text(RTN)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_artifact(tiny_dir, tmp_path_factory) -> Path:
    """The tiny Llama quantized by a streamed run (layer shards + index + checksums)."""
    import inspect

    base = tmp_path_factory.mktemp("artifact")
    (base / "calib.txt").write_text(inspect.getdoc(json) * 4)
    (base / "r.yaml").write_text(RTN)
    done = subprocess.run([sys.executable, "-m", "compress", "apply", "r.yaml", str(tiny_dir),
                           "-o", "a"], cwd=base, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return base / "a"


def killed_run(work: Path, model: Path, *extra: str) -> Path:
    """Start a run on `model` and SIGKILL it after layer 0; returns its partial directory."""
    killed = cli_process("apply", "r.yaml", str(model), "-o", "out", *extra, fault="0:0:KILL")
    assert killed.returncode == -9, killed.stderr
    partial = work / ".out.partial"
    assert (partial / "run.json").is_file()
    return partial


# ---------------------------------------------------------------------------------------------
# 1, 2, 7: resume never loses a run and never resumes a different one

def test_refused_or_failed_resume_keeps_the_partial_run(work, tiny_dir, capsys, monkeypatch):
    partial = killed_run(work, tiny_dir)
    layer0 = (partial / "layer-00000.safetensors").read_bytes()
    (work / "g64.yaml").write_text(RTN.replace("group_size: 32", "group_size: 64"))
    code, err = cli(capsys, "apply", "g64.yaml", str(tiny_dir), "-o", "out")
    assert code == 1 and "different recipe" in error_line(err) and "kept" in flat(err)
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out", "--dtype", "bfloat16")
    assert code == 1 and "different options" in error_line(err)
    assert (partial / "layer-00000.safetensors").read_bytes() == layer0

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing a layer")

    monkeypatch.setattr("compress.offload.LayerStore.save", crash)
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out")
    assert code == 1 and "rerun the same command to resume" in error_line(err)
    assert (partial / "layer-00000.safetensors").read_bytes() == layer0
    monkeypatch.undo()
    monkeypatch.chdir(work)
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out")
    assert code == 0 and "resuming the interrupted run" in flat(err)
    assert not partial.exists() and not (work / ".out.lock").exists()


def test_an_in_memory_recipe_does_not_replace_an_interrupted_run(work, tiny_dir, capsys):
    """rmsnorm holds the model in memory and saves through the same partial directory: it
    must refuse rather than clear the interrupted layer-wise run there."""
    partial = killed_run(work, tiny_dir)
    (work / "fold.yaml").write_text("passes:\n  - {pass: rmsnorm, mode: fold}\n")
    code, err = cli(capsys, "apply", "fold.yaml", str(tiny_dir), "-o", "out")
    assert code == 1 and "interrupted run of another recipe" in error_line(err)
    assert (partial / "run.json").is_file() and (partial / "layer-00000.safetensors").is_file()


def test_weights_edited_in_place_are_not_resumed(work, tiny_dir, capsys):
    model = support.copy_model_dir(tiny_dir, work / "model")
    partial = killed_run(work, model)
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    stat = shard.stat()
    data[-5] ^= 0x40                      # one weight byte; size and mtime unchanged
    shard.unlink()                        # (a hard link to the shared copy)
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, err = cli(capsys, "apply", "r.yaml", str(model), "-o", "out")
    assert code == 1 and "different model" in error_line(err)
    assert (partial / "run.json").is_file()
    code, err = cli(capsys, "apply", "r.yaml", str(model), "-o", "out", "--restart")
    assert code == 0 and "resuming" not in err


def test_temp_files_never_reach_the_artifact(work, tiny_dir, capsys):
    partial = killed_run(work, tiny_dir)
    (partial / "layer-00001.tmp").write_bytes(b"\0" * 4096)          # a kill mid-write
    (partial / "rest.safetensors.tmp").write_bytes(b"\0" * 4096)
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out")
    assert code == 0, err
    names = [p.name for p in (work / "out").iterdir()]
    assert not [n for n in names if "tmp" in n or n == "run.json"], names
    import compress

    compress.load(work / "out")  # checksums cover every shard that is there


def test_ctrl_c_of_a_fresh_run_keeps_it(work, tiny_dir):
    done = cli_process("apply", "r.yaml", str(tiny_dir), "-o", "out", fault="0:0:INT")
    assert done.returncode == 130, done.stderr
    assert sorted(p.name for p in work.iterdir()) == [".out.partial", "calib.txt", "r.yaml"]
    assert "--restart to discard it" in " ".join(done.stderr.split())
    restarted = cli_process("apply", "r.yaml", str(tiny_dir), "-o", "out", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert sorted(p.name for p in work.iterdir()) == ["calib.txt", "out", "r.yaml"]


# ---------------------------------------------------------------------------------------------
# 3: the output never touches the input

@pytest.mark.parametrize("where", ["model", ".", "model/inner", "parent"])
def test_output_overlapping_the_input_is_refused(work, tiny_dir, capsys, where):
    model = support.copy_model_dir(tiny_dir, work / "parent" / "model")
    (work / "abs.yaml").write_text(RTN.replace("calib.txt", str(work / "calib.txt")))
    os.chdir(work / "parent" if where == "." else work)
    target = {"model": str(model), ".": ".", "model/inner": str(model / "inner"),
              "parent": str(work / "parent")}[where]
    before = sorted(p.name for p in model.iterdir())
    code, err = cli(capsys, "apply", str(work / "abs.yaml"), str(model), "-o", target, "--overwrite",
                    "--allow-path", str(work))
    assert code == 2 and ("overlaps the input" in flat(err) or "current directory" in flat(err)), err
    assert sorted(p.name for p in model.iterdir()) == before


def test_overwrite_replaces_only_an_artifact(work, tiny_dir, tiny_artifact, capsys):
    precious = work / "out"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out", "--overwrite")
    assert code == 2 and "not a compress artifact" in error_line(err)
    assert (precious / "thesis.tex").read_text() == "keep me"
    support.copy_model_dir(tiny_artifact, work / "old")
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "old", "--overwrite")
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# 4, 5: corrupted artifacts

def test_flipped_byte_in_a_shard_is_refused_naming_it(tiny_artifact, tmp_path, capsys):
    import compress
    from compress.errors import CompressError

    artifact = support.copy_model_dir(tiny_artifact, tmp_path / "a")
    shard = artifact / "layer-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.unlink()
    shard.write_bytes(bytes(data))
    with pytest.raises(CompressError, match="layer-00001.safetensors does not match its checksum"):
        compress.load(artifact)
    code, err = cli(capsys, "generate", str(artifact), "Hello", "--max-new-tokens", "2")
    assert code == 1 and "layer-00001.safetensors" in error_line(err)
    os.environ["COMPRESS_NO_VERIFY"] = "1"   # the opt-out for speed loads it
    try:
        compress.load(artifact)
    finally:
        del os.environ["COMPRESS_NO_VERIFY"]


def test_nan_metrics_fail_every_gate():
    from compress.evaluation.report import failing

    nan, inf = float("nan"), float("inf")
    assert failing({"perplexity": nan}, 0.9) and failing({"top1_agreement": inf}, 0.9)
    assert failing({"perplexity": 1.0}, 0.9, {"perplexity": nan, "tasks": {}})
    assert failing({"x/acc": 1.0}, 0.9, {"tasks": {"x": {"acc": inf}}})
    assert failing({"perplexity": 0.99}, 0.9, {"perplexity": 7.5}) == []


def test_quantization_config_must_agree_with_the_metadata(tiny_artifact, tmp_path):
    import compress
    from compress.errors import CompressError
    from compress.integrity import write_checksums

    artifact = support.copy_model_dir(tiny_artifact, tmp_path / "a")
    config = json.loads((artifact / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["weights"]["group_size"] = 64       # what transformers/vLLM would run
    (artifact / "config.json").write_text(json.dumps(config))
    write_checksums(artifact)                 # consistent checksums: only the check can catch it
    with pytest.raises(CompressError, match="quantization_config and the compress metadata"):
        compress.load(artifact)


# ---------------------------------------------------------------------------------------------
# 6: one run per output

def test_a_second_run_on_a_locked_output_is_refused_with_the_pid(work, tiny_dir, capsys):
    from compress.lock import acquire, release

    fd = acquire(work / "out")                 # as a live run would hold it
    try:
        code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out")
    finally:
        release(work / "out", fd)
    assert code == 1 and f"process {os.getpid()}" in error_line(err)
    assert not (work / "out").exists() and not (work / ".out.partial").exists()


def test_a_stale_lock_is_taken_over(work, tiny_dir, capsys):
    (work / ".out.lock").write_text("999999999")   # a dead run's file; no one holds the flock
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out")
    assert code == 0, err
    assert not (work / ".out.lock").exists()


# ---------------------------------------------------------------------------------------------
# 8: evaluate's results

def test_evaluate_checks_where_it_writes_before_evaluating(tiny_artifact, capsys, monkeypatch):
    from compress.evaluation.report import results_path

    def never(*args, **kwargs):
        raise AssertionError("evaluated before checking the output")

    monkeypatch.setattr("compress.evaluation.report.evaluate", never)
    code, err = cli(capsys, "evaluate", str(tiny_artifact), "-o", "/proc/no/results.json")
    assert code == 2 and "cannot write" in error_line(err)
    assert results_path("/proc/self", None) is None         # read-only: stdout only
    assert results_path(str(tiny_artifact), None) == tiny_artifact / "evaluation.json"


# ---------------------------------------------------------------------------------------------
# 9, 10, 11: untrusted input

@pytest.mark.parametrize("source", ["/etc/passwd", "/proc/self/environ", "../outside.txt"])
def test_calibration_source_outside_allowed_paths(work, capsys, source):
    (work.parent / "outside.txt").write_text("secret " * 100)
    (work / "bad.yaml").write_text(RTN.replace("calib.txt", source))
    code, err = cli(capsys, "apply", "bad.yaml", "no-such-model", "-o", "out")
    line = error_line(err)
    assert code == 2 and "outside the current directory" in line and "--allow-path" in line
    assert "tokens" not in line


def test_allow_path_admits_a_calibration_file(work, capsys):
    from compress.recipe import load_recipe

    text = work.parent / "shared.txt"
    text.write_text("text")
    (work / "ok.yaml").write_text(RTN.replace("calib.txt", str(text)))
    assert load_recipe(work / "ok.yaml", allow_paths=[work.parent]).calibration.source == str(text)


def test_weight_map_outside_the_model_directory(work, tiny_dir, capsys):
    model = support.copy_model_dir(tiny_dir, work / "model")
    outside = work / "elsewhere.safetensors"
    os.link(model / "model.safetensors", outside)
    names = list(load_file(str(outside)))
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: str(outside) for n in names}}))
    code, err = cli(capsys, "apply", "r.yaml", str(model), "-o", "out")
    assert code == 1 and "is not a file inside the model directory" in error_line(err)


def test_oversized_recipe_is_refused_unread(work, capsys):
    (work / "big.yaml").write_text(RTN + "#" * (2 << 20))
    code, err = cli(capsys, "apply", "big.yaml", "no-such-model", "-o", "out")
    assert code == 2 and "at most 1 MB" in error_line(err)


def test_header_dtype_lying_about_its_bytes(work, tiny_dir, capsys):
    model = support.copy_model_dir(tiny_dir, work / "model")
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = "model.layers.0.mlp.up_proj.weight"
    header[name]["dtype"] = "F16"              # the bytes are F32
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    shard.unlink()
    shard.write_bytes(data[:8] + raw + data[8 + length:])
    code, err = cli(capsys, "apply", "r.yaml", str(model), "-o", "out")
    line = error_line(err)
    assert code == 1 and name in line and "F16" in line and "bytes" in line


# ---------------------------------------------------------------------------------------------
# 12: disk space

def test_too_little_free_space_is_refused_before_loading(work, tiny_dir, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9, 1000))
    monkeypatch.setattr("compress.pipeline.load_model", lambda *a, **k: pytest.fail("loaded"))
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out")
    assert code == 1 and "not enough free disk space" in error_line(err) and "GB needed" in flat(err)
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out", "--dry-run")
    assert code == 1 and "not enough free disk space" in error_line(err)


def test_enospc_is_one_line_and_keeps_the_run(work, tiny_dir, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file
    calls = []

    def fills_up(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second layer
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                  'StorageFull, message: "No space left on device" })')
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out")
    line = error_line(err)
    assert code == 1 and "no space left" in line and "GB more needed" in line
    assert "kept in" in line and (work / ".out.partial" / "layer-00000.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 13: recipe checks before the model loads

def test_group_size_and_duplicates_fail_before_loading(work, tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("compress.pipeline.load_model", lambda *a, **k: pytest.fail("loaded"))
    (work / "g48.yaml").write_text(RTN.replace("group_size: 32", "group_size: 48"))
    for extra in ([], ["--dry-run"]):
        code, err = cli(capsys, "apply", "g48.yaml", str(tiny_dir), "-o", "out", *extra)
        assert code == 2 and "not divisible by group_size 48" in error_line(err)
    (work / "twice.yaml").write_text(RTN + "  - {pass: quantize, format: int4}\n")
    code, err = cli(capsys, "apply", "twice.yaml", str(tiny_dir), "-o", "out", "--dry-run")
    assert code == 2 and "already has a quantize pass at passes[0]" in error_line(err)


# ---------------------------------------------------------------------------------------------
# 14: one line, exit 1 or 2, for every bad argument

@pytest.mark.parametrize("args, message", [
    (["apply", "r.yaml", "MODEL", "-o", "out", "--tp", "0"], "--tp 0"),
    (["apply", "r.yaml", "MODEL", "-o", "out", "--dtype", "float7"], "--dtype 'float7'"),
    (["apply", "r.yaml", "MODEL", "-o", "out", "--device", "banana"], "--device 'banana'"),
    (["apply", "r.yaml", "MODEL", "-o", "."], "current directory"),
    (["evaluate", "MODEL", "--seq-len", "0"], "--seq-len must be at least 2"),
    (["evaluate", "MODEL", "--batch-size", "0"], "--batch-size"),
    (["generate", "MODEL", "hi", "--dtype", "float7"], "--dtype 'float7'"),
])
def test_bad_arguments_are_one_line(work, tiny_dir, capsys, args, message):
    args = [str(tiny_dir) if a == "MODEL" else a for a in args]
    code, err = cli(capsys, *args)
    assert code == 2 and message in error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(work, tiny_dir, capsys):
    code, err = cli(capsys, "apply", "r.yaml", str(tiny_dir), "-o", "out", "--device", "cuda")
    assert code == 2 and "no CUDA device" in error_line(err)


def test_inspect_junk_config_and_truncated_shard(tiny_artifact, tmp_path, capsys):
    junk = support.copy_model_dir(tiny_artifact, tmp_path / "junk")
    (junk / "config.json").write_text("{not json")
    code, err = cli(capsys, "inspect", str(junk))
    assert code == 1 and "config.json is not valid JSON" in error_line(err)
    cut = support.copy_model_dir(tiny_artifact, tmp_path / "cut")
    shard = cut / "rest.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[: len(data) // 2])
    code, err = cli(capsys, "inspect", str(cut))
    assert code == 1 and "rest.safetensors is corrupt" in error_line(err)


def test_unknown_architecture_with_llama_fields(work, tiny_dir, capsys):
    model = support.copy_model_dir(tiny_dir, work / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="llamalike", architectures=["LlamalikeForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    code, err = cli(capsys, "apply", "r.yaml", str(model), "-o", "out")
    assert code in (1, 2) and "llamalike" in error_line(err)


# ---------------------------------------------------------------------------------------------
# Artifacts mutated at random: a load fails with one CompressError, or gives the same logits

def _mutations():
    from hypothesis import strategies as st

    flip = st.tuples(st.just("flip"), st.sampled_from(["config.json", "rest.safetensors",
                                                       "layer-00000.safetensors",
                                                       "layer-00001.safetensors",
                                                       "model.safetensors.index.json"]),
                     st.floats(0, 1, exclude_max=True), st.integers(1, 255))
    config = st.tuples(st.just("config"), st.sampled_from(
        ["rms_norm_eps", "hidden_size", "num_hidden_layers", "rope_theta", "vocab_size",
         "tie_word_embeddings", "compress", "quantization_config", "model_type"]),
        st.one_of(st.none(), st.integers(-3, 4096), st.floats(allow_nan=True),
                  st.text(max_size=8), st.booleans()), st.booleans())
    index = st.tuples(st.just("index"), st.integers(0, 10 ** 6),
                      st.sampled_from(["rest.safetensors", "layer-00000.safetensors",
                                       "/etc/passwd", "../a/rest.safetensors", "missing"]),
                      st.booleans())
    return st.one_of(flip, config, index)


def _mutate(artifact: Path, mutation, rewrite_checksums: bool) -> None:
    from compress.integrity import write_checksums

    kind = mutation[0]
    if kind == "flip":
        _, name, where, mask = mutation
        file = artifact / name
        data = bytearray(file.read_bytes())
        data[int(where * len(data))] ^= mask
        file.unlink()
        file.write_bytes(bytes(data))
    elif kind == "config":
        _, key, value, drop = mutation
        config = json.loads((artifact / "config.json").read_text())
        if drop:
            config.pop(key, None)
        else:
            config[key] = value
        (artifact / "config.json").write_text(json.dumps(config))
    else:
        _, pick, target, drop = mutation
        index = json.loads((artifact / "model.safetensors.index.json").read_text())
        names = sorted(index["weight_map"])
        name = names[pick % len(names)]
        if drop:
            del index["weight_map"][name]
        else:
            index["weight_map"][name] = target
        (artifact / "model.safetensors.index.json").write_text(json.dumps(index))
    if rewrite_checksums:   # as if the files had been rewritten consistently (no checksum help)
        write_checksums(artifact)


def test_mutated_artifacts_fail_cleanly_or_load_exactly(tiny_artifact, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import compress
    from compress.errors import CompressError

    ids = torch.arange(40).reshape(2, 20) * 5 % 256
    with torch.no_grad():
        reference = compress.load(tiny_artifact)(ids).logits

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutation=_mutations(), rewrite=st.booleans())
    def check(mutation, rewrite):
        """rewrite: the checksums are recomputed after the change, so only the loader's own
        checks stand between it and a crash (the values may then differ: a consistent edit of
        rms_norm_eps is a different model, not a corrupt one)."""
        artifact = support.copy_model_dir(tiny_artifact, tmp_path_factory.mktemp("m") / "a")
        _mutate(artifact, mutation, rewrite)
        try:
            model = compress.load(artifact)
        except CompressError as exc:
            assert "\n" not in str(exc), str(exc)
            return
        with torch.no_grad():
            logits = model(ids).logits
        assert rewrite or torch.equal(logits, reference), mutation

    check()


@pytest.mark.parametrize("edit, message", [
    ({"hidden_size": "abc"}, "hidden_size"),
    ({"num_attention_heads": 5}, "not a multiple of the number of attention heads"),
    ({"model_type": None}, "model_type"),
])
def test_junk_config_values_are_one_line(work, tiny_dir, capsys, edit, message):
    model = support.copy_model_dir(tiny_dir, work / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(edit)
    (model / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                   if v is not None}))
    code, err = cli(capsys, "apply", "r.yaml", str(model), "-o", "out")
    assert code == 1 and message in error_line(err)
    assert not (work / "out").exists() and not (work / ".out.lock").exists()


def test_parallel_file_hashes_equal_the_one_by_one_hashes(tmp_path):
    """file_sha256s (threads) gives each file's own sha256, in order."""
    import hashlib

    from compress.integrity import file_sha256s

    paths = []
    for n in range(5):
        path = tmp_path / f"f{n}.bin"
        path.write_bytes(bytes(range(256)) * (n * 40_000 + 1))
        paths.append(path)
    want = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert file_sha256s(paths) == want
    assert file_sha256s(paths[:1]) == want[:1] and file_sha256s([]) == []
