"""GPTQ math on small random matrices, fallback and --strict, overrides, NaN handling, and one
sequential GPTQ run on SmolLM2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from column_loop_reference import gptq_quantize_reference
from support import tiny_llama

from compress.errors import CompressError, UsageError
from compress.formats import WeightFormat, codec
from compress.passes.gptq import gptq_quantize

FORMATS = [WeightFormat(type="int", group_size=64), WeightFormat(type="int", group_size=32,
                                                                 symmetric=False),
           WeightFormat(type="int", group_size=None), WeightFormat(type="int", bits=8),
           WeightFormat(type="nvfp4", group_size=16), WeightFormat(type="mxfp4", group_size=32)]


def correlated_inputs(n: int = 1024, features: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are strongly correlated (low-rank mix + noise), with uneven scales,
    like a transformer's hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g) @ torch.randn(12, features, generator=g)
    x = x + 0.1 * torch.randn(n, features, generator=g)
    return x * torch.linspace(0.2, 3.0, features)


def output_error(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> float:
    return float(((x @ (w_q - w).T) ** 2).mean())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(fmt, act_order):
    x = correlated_inputs()
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    H = 2 * x.T @ x / len(x)
    q, info = gptq_quantize(w, H, fmt, block_size=32, act_order=act_order)
    rtn = codec(fmt).quantize(w, fmt)
    assert output_error(x, w, q.dequantize()) < 0.5 * output_error(x, w, rtn.dequantize())
    # same storage layout as round-to-nearest, and the codes round-trip through packing
    assert q.codes.shape == rtn.codes.shape and q.scale.shape == rtn.scale.shape
    again = codec(fmt).unpack(codec(fmt).pack(q), fmt)
    assert torch.equal(again.dequantize(), q.dequantize())
    assert info.damp == 0.01 and info.act_order == act_order


@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[1], FORMATS[4]], ids=lambda f: f.name)
def test_gptq_keeps_a_24_sparsity_mask(fmt):
    x = correlated_inputs()
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    keep = w.abs().reshape(32, 32, 4).topk(2, dim=-1).indices
    mask = torch.zeros(32, 32, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(32, 128)
    w_sparse = w * mask
    H = 2 * x.T @ x / len(x)
    q, _ = gptq_quantize(w_sparse, H, fmt, mask=mask)
    w_q = q.dequantize()
    assert torch.all(w_q[~mask] == 0)
    assert (w_q[mask] != 0).float().mean() > 0.7       # kept weights were not all zeroed
    rtn = codec(fmt).quantize(w_sparse, fmt).dequantize()
    assert output_error(x, w_sparse, w_q) < output_error(x, w_sparse, rtn)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_restructured_loop_matches_the_column_by_column_reference(fmt, act_order, masked):
    """The vectorized loop (W^T rows, one rank-1 update, group parameters once per group) gives
    the codes of the old column-by-column loop; only float-rounding ties may differ."""
    x = correlated_inputs(features=256)
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    mask = None
    if masked:
        keep = w.abs().reshape(40, 64, 4).topk(2, dim=-1).indices
        mask = torch.zeros(40, 64, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(40, 256)
    H = 2 * x.T @ x / len(x)
    new, _ = gptq_quantize(w, H, fmt, block_size=48, act_order=act_order, mask=mask)
    old = gptq_quantize_reference(w, H, fmt, block_size=48, act_order=act_order, mask=mask)
    assert (new.codes == old.codes).float().mean() > 0.995
    assert new.scale.dtype == old.scale.dtype and new.scale.shape == old.scale.shape
    torch.testing.assert_close(new.scale, old.scale, rtol=1e-3, atol=0)
    if old.zero is not None:
        assert (new.zero == old.zero).float().mean() > 0.99
    rel = (new.dequantize() - old.dequantize()).norm() / old.dequantize().norm()
    assert rel < 0.02


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_every_tensor_gptq_creates_follows_its_inputs(fmt):
    """Under `torch.device("meta")` a tensor created without an explicit device lands on meta
    and mixing it with the CPU inputs fails: GPTQ must take every device from W and H."""
    x = correlated_inputs(features=128)
    w, H = torch.randn(16, 128) * 0.05, 2 * x.T @ x / len(x)
    codec(fmt)   # import the codec (its module-level constants) outside the meta context
    with torch.device("meta"):
        q, _ = gptq_quantize(w, H, fmt, block_size=16, act_order=True)
        q2, _ = gptq_quantize(w, H, fmt, block_size=16)
    for t in (q.codes, q.scale, q2.codes, q2.scale):
        assert t.device.type == "cpu"


def test_damping_escalates_and_fails_cleanly():
    x = correlated_inputs(features=64)
    H = 2 * x.T @ x / len(x)
    w = torch.randn(16, 64) * 0.05
    shifted = H - 0.05 * torch.diag(H).mean() * torch.eye(64)   # indefinite: 1% damping fails
    _, info = gptq_quantize(w, shifted, FORMATS[0])
    assert info.damp == pytest.approx(0.1)
    with pytest.raises(CompressError, match="layer.x"):
        gptq_quantize(w, -H, FORMATS[0], name="layer.x")


def test_fallback_is_reported_and_strict_refuses_it():
    from compress.passes.calibrated import _gptq_or_fallback
    from compress.passes.quantize import ModulePlan, QuantizeConfig

    class Ctx:
        strict = False

    w, H = torch.randn(16, 64), -torch.eye(64)       # no damping makes -I factorizable
    plan = ModulePlan(FORMATS[0], "gptq")
    q, info = _gptq_or_fallback(Ctx(), QuantizeConfig(method="gptq"), "model.layers.0.",
                                ["self_attn.q_proj"], w, H, plan)
    assert "rtn" in info["fallback"]   # (the pass lists the fallback's modules from this)
    assert torch.equal(q.codes, codec(FORMATS[0]).quantize(w, FORMATS[0]).codes)
    Ctx.strict = True
    with pytest.raises(CompressError, match="--strict"):
        _gptq_or_fallback(Ctx(), QuantizeConfig(method="gptq"), "model.layers.0.",
                          ["self_attn.q_proj"], w, H, plan)


# ---------------------------------------------------------------------------------------------
# Overrides

def test_overrides_parse_and_apply():
    from compress.calib import CalibrationConfig
    from compress.models import arch_for
    from compress.passes import Context, run_pass
    from compress.recipe import parse_recipe

    recipe = parse_recipe({"passes": [{
        "pass": "quantize", "format": "int4", "group_size": 32,
        "overrides": [{"targets": ["re:layers\\.(0|1)\\.mlp\\.down_proj$"], "format": "int8"},
                      {"targets": ["*.o_proj"], "format": "nvfp4"},
                      # q/k/v are one fused matrix in serving runtimes: overridden together
                      {"targets": ["*.q_proj", "*.k_proj", "*.v_proj"], "group_size": None,
                       "symmetric": False}]}]})
    cfg = recipe.passes[0]
    model = tiny_llama()
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(), torch.device("cpu"))
    report = run_pass(ctx, cfg)
    formats = {name: m["format"] for name, m in report.modules.items()}
    assert formats["model.layers.1.mlp.down_proj"] == "int8-sym-g32"
    assert formats["model.layers.0.self_attn.o_proj"] == "nvfp4"
    assert formats["model.layers.0.self_attn.q_proj"] == "int4-asym-per-channel"
    assert formats["model.layers.1.self_attn.v_proj"] == "int4-asym-per-channel"
    assert formats["model.layers.0.mlp.gate_proj"] == "int4-sym-g32"


@pytest.mark.parametrize("override,message", [
    ({"targets": ["*"], "group_sise": 8}, "unknown field"),
    ({"targets": ["*"], "group_size": 0}, "overrides\\[0\\].*group_size"),
    ({"targets": [], "format": "int8"}, "targets"),
    ({"targets": ["*"], "method": "awq"}, "method"),
])
def test_bad_overrides_fail_at_parse_time(override, message):
    from compress.recipe import parse_recipe

    with pytest.raises(UsageError, match=message):
        parse_recipe({"passes": [{"pass": "quantize", "overrides": [override]}]})


# ---------------------------------------------------------------------------------------------
# NaN / Inf: named module, nothing written (through the CLI)

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer alone (read from the GGUF, no model load): the CLI needs one."""
    from transformers import AutoTokenizer

    from compress.runtime.checkpoint import Checkpoint

    source = Checkpoint.open("smollm2-135m")
    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(source.path, **source.pretrained_kwargs()).save_pretrained(path)
    return path


def _poisoned(tokenizer_dir: Path, out: Path, tensor: str, value: float) -> Path:
    """A small random Llama with one non-finite value in `tensor`, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    model.state_dict()[tensor].view(-1)[3] = value    # state_dict tensors share storage
    model.save_pretrained(out)
    for file in tokenizer_dir.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    return out


@pytest.mark.parametrize("tensor,value,method,named", [
    ("model.layers.1.mlp.down_proj.weight", float("nan"), "rtn",
     "weight of model.layers.1.mlp.down_proj"),
    ("model.layers.1.post_attention_layernorm.weight", float("inf"), "gptq",
     "Hessian of the input of model.layers.1.mlp.gate_proj"),
])
def test_non_finite_stops_the_run_and_writes_no_artifact(tokenizer_dir, tmp_path, tensor, value,
                                                     method, named):
    model_dir = _poisoned(tokenizer_dir, tmp_path / "model", tensor, value)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {samples: 4, seq_len: 32}\npasses:\n"
                      f"  - {{pass: quantize, format: int4, group_size: 32, method: {method}}}\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "compress", "apply", str(recipe), str(model_dir),
                          "-o", str(out)], capture_output=True, text=True, check=False)
    assert run.returncode != 0
    message = " ".join((run.stdout + run.stderr).split())
    assert named in message and "NaN or Inf" in message
    assert not out.exists() and "--restart to discard it" in message  # the partial run is kept


# ---------------------------------------------------------------------------------------------
# Sequential GPTQ (and AWQ) on the real model

def test_gptq_and_awq_beat_rtn_on_smollm2(smollm2, eval_windows):
    """Quantize the first 3 layers of SmolLM2 three ways; compare the logits with the float
    model's on held-out evaluation text (16 calibration samples x 128 tokens)."""
    import copy

    from compress.calib import CalibrationConfig
    from compress.passes import Context, QuantizeConfig, run_pass

    ids = eval_windows[:2]
    with torch.no_grad():
        reference = smollm2.model(ids).logits
    errors = {}
    for label, extra in {"rtn": {}, "gptq": {"method": "gptq"},
                         "awq+rtn": {"awq": True}}.items():
        model = copy.deepcopy(smollm2.model)
        ctx = Context(model, smollm2.tokenizer, smollm2.arch,
                      CalibrationConfig(samples=16, seq_len=128), torch.device("cpu"))
        cfg = QuantizeConfig(format="int4", group_size=64, targets=["re:layers\\.[0-2]\\."],
                             **extra)
        report = run_pass(ctx, cfg)
        assert report.summary["modules"] == 21
        with torch.no_grad():
            errors[label] = float(((model(ids).logits - reference) ** 2).mean())
        del model
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    assert errors["awq+rtn"] < errors["rtn"], errors


def test_pass_keeps_zeros_of_modules_marked_sparse():
    """The sparsify pass's contract: modules in structure(model)["sparsity"] keep their zeros
    through GPTQ (and AWQ scaling); other modules are not masked."""
    from compress.calib import CalibrationConfig
    from compress.models import arch_for
    from compress.passes import Context, QuantizeConfig, run_pass
    from compress.runtime.artifact import structure

    model = tiny_llama()
    sparse = "model.layers.1.mlp.up_proj"
    weight = model.get_submodule(sparse).weight.data
    keep = weight.abs().reshape(weight.shape[0], -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros(*weight.shape[:1], weight.shape[1] // 4, 4, dtype=torch.bool)
    mask = mask.scatter_(-1, keep, True).reshape(weight.shape)
    weight.mul_(mask)
    structure(model)["sparsity"] = {sparse: "2:4"}
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(samples=4, seq_len=32),
                  torch.device("cpu"))
    ctx._calib_ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    run_pass(ctx, QuantizeConfig(format="int4", group_size=32, method="gptq", awq=True))
    w_q = model.get_submodule(sparse).dequantized_weight()
    assert torch.all(w_q[~mask] == 0) and (w_q[mask] != 0).float().mean() > 0.7
    dense = model.get_submodule("model.layers.1.mlp.gate_proj").dequantized_weight()
    assert (dense == 0).float().mean() < 0.2


def test_calibrated_pass_quantizes_every_target_and_reports_the_method():
    from compress.calib import CalibrationConfig
    from compress.models import arch_for
    from compress.passes import Context, QuantizeConfig, run_pass

    model = tiny_llama()
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(samples=4, seq_len=32),
                  torch.device("cpu"))
    ctx._calib_ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantizeConfig(format="int4", group_size=32, method="gptq", ignore=[],
                         overrides=[{"targets": ["*.k_proj"], "method": "rtn"}])
    report = run_pass(ctx, cfg)
    methods = {name: m["method"] for name, m in report.modules.items()}
    assert len(methods) == 15 and methods["lm_head"] == "rtn"      # outside the layers: RTN
    assert methods["model.layers.0.self_attn.k_proj"] == "rtn"
    assert methods["model.layers.0.self_attn.q_proj"] == "gptq"
    assert report.modules["model.layers.0.self_attn.q_proj"]["damp"] == 0.01
    assert report.summary["fallback_count"] == 0


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_nvfp4_shares_one_global_scale_per_fused_group(method):
    """q/k/v (and gate/up) become one matrix in vLLM, which keeps one global scale for it:
    GPTQ and round-to-nearest alike (llm-compressor fuses them for both too)."""
    from compress.calib import CalibrationConfig
    from compress.formats import codec
    from compress.models import arch_for
    from compress.passes import Context, QuantizeConfig, run_pass

    model = tiny_llama()
    with torch.no_grad():          # give k a different range, so per-tensor scales would differ
        model.model.layers[0].self_attn.k_proj.weight.mul_(3)
    attn = model.model.layers[0].self_attn
    qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(samples=4, seq_len=32),
                  torch.device("cpu"))
    ctx._calib_ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantizeConfig(format="nvfp4", method=method)
    run_pass(ctx, cfg)
    layer = model.model.layers[0]
    qkv = [getattr(layer.self_attn, n).weight_global_scale for n in ("q_proj", "k_proj",
                                                                                "v_proj")]
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[1], qkv[2])
    fmt = cfg.weight_format()      # the scale of the fused matrix: from k's larger range
    assert torch.equal(qkv[0].float(), codec(fmt).tensor_scale(qkv_weight, fmt).float())
    gate, up = (getattr(layer.mlp, n).weight_global_scale for n in ("gate_proj",
                                                                              "up_proj"))
    assert torch.equal(gate, up)
    assert not torch.equal(qkv[0], gate)     # separate groups keep separate scales
    assert not torch.equal(layer.self_attn.o_proj.weight_global_scale, qkv[0])  # o: its own


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_nvfp4_solve_equals_one_solve_per_member(act_order):
    """The quantize pass stacks the NVFP4 members of a fused group (q/k/v) into one GPTQ solve
    (compress/passes/calibrated.py): with their shared global scale, the rows are independent
    given H, so the stacked codes and scales must be those of one solve per member."""
    fmt = WeightFormat(type="nvfp4", group_size=16)
    x = correlated_inputs()
    H = 2 * x.T @ x / len(x)
    g = torch.Generator().manual_seed(3)
    members = [torch.randn(rows, 128, generator=g) * s for rows, s in ((48, 1.0), (16, 3.0),
                                                                       (16, 0.5))]
    shared = codec(fmt).tensor_scale(torch.cat(members), fmt)
    stacked, _ = gptq_quantize(torch.cat(members), H, fmt, block_size=32, act_order=act_order,
                               scale_search="mse", global_scale=shared)
    start = 0
    for w in members:
        alone, _ = gptq_quantize(w, H, fmt, block_size=32, act_order=act_order,
                                 scale_search="mse", global_scale=shared)
        rows = slice(start, start + len(w))
        start = rows.stop
        assert torch.equal(alone.codes, stacked.codes[rows])
        assert torch.equal(alone.scale, stacked.scale[rows])
        assert torch.equal(alone.global_scale, stacked.global_scale)


@pytest.mark.parametrize("fmt_kwargs,masked", [({"group_size": 32}, False),
                                               ({"group_size": 32, "symmetric": False}, True),
                                               ({"type": "nvfp4", "group_size": 16}, False)])
def test_block_graph_buffers_give_the_eager_codes(monkeypatch, fmt_kwargs, masked):
    """The CUDA-graph column loop (compress.passes.gptq._BlockGraph) copies each block into
    static buffers and replays; here the replay is the eager body, so its buffer handling is
    checked on the CPU against the eager loop, full and short last block, mask or not."""
    from compress.formats import WeightFormat
    from compress.passes import gptq

    torch.manual_seed(0)
    w = torch.randn(48, 160)
    x = torch.randn(512, 160)
    H = 2 * x.T @ x / 512
    fmt = WeightFormat(**fmt_kwargs)
    mask = (torch.rand(48, 160) > 0.5) if masked else None
    eager, _ = gptq.gptq_quantize(w, H, fmt, block_size=64, act_order=True, mask=mask)
    monkeypatch.setattr(gptq, "graphs_enabled", lambda _w: True)
    monkeypatch.setattr(gptq._BlockGraph, "capture", classmethod(lambda cls, *a: cls(*a)))
    replayed, _ = gptq.gptq_quantize(w, H, fmt, block_size=64, act_order=True, mask=mask)
    assert torch.equal(eager.codes, replayed.codes)
    assert torch.equal(eager.scale, replayed.scale)


def test_block_graph_is_freed_without_a_garbage_collection():
    """A _BlockGraph in no reference cycle is freed as soon as GPTQ drops it. One freed later by
    the cyclic collector could be freed during the next module's capture, which invalidates
    that capture and breaks torch's CUDA generator for the process (H200, seventh session)."""
    import gc
    import weakref

    from compress.formats import WeightFormat
    from compress.passes import gptq

    fmt = WeightFormat(type="nvfp4", group_size=16)
    gc.disable()
    try:
        graph = gptq._BlockGraph(codec(fmt), fmt, 32, 48, False, True, torch.ones(1),
                                 torch.device("cpu"))
        graph.replay()                          # the eager body runs on its buffers
        alive = weakref.ref(graph)
        del graph
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fake_quantize_equals_decode_of_encode(fmt):
    """The MSE scale search's shortcut (no int8 round trip) gives decode(encode(w)) bit for bit,
    clipped groups and an all-zero group included."""
    c = codec(fmt)
    g = fmt.group_size or 96
    w = torch.randn(24, 3, g, generator=torch.Generator().manual_seed(1)) * 0.05
    w[0, 0] = 0
    tensor_scale = c.tensor_scale(w.reshape(24, -1), fmt)
    for shrink in (1.0, 0.8, 0.6):
        p = c.group_params(w * shrink, fmt, tensor_scale)
        assert torch.equal(c.fake_quantize(w, p), c.decode(c.encode(w, p), p))


def test_solve_runs_on_one_cpu_thread_and_restores_the_count():
    from compress.hessian import serial_on_cpu

    seen = []
    solve = serial_on_cpu(lambda w: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)    # whatever the machine: two before the call, one inside
    try:
        solve(torch.zeros(2, 2))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    """U^T U = (H + d mean(diag H) I)^-1 with U upper triangular, also when H is scratch."""
    from compress.hessian import inverse_cholesky

    x = correlated_inputs(features=96)
    H = (2 * x.T @ x / len(x)).double()
    want = torch.linalg.inv(H + 0.01 * torch.diag(H).mean() * torch.eye(96, dtype=H.dtype))
    for overwrite in (False, True):
        U, damp = inverse_cholesky(H.clone(), 0.01, overwrite=overwrite)
        assert damp == 0.01
        assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
        torch.testing.assert_close(U.T @ U, want, rtol=1e-9, atol=1e-9)


def test_no_hessian_outlives_its_group(monkeypatch):
    """When a solve starts, no other group's Hessian is alive: not layer i-1's (a loop variable
    and the last solve's closure kept an 8B down_proj's 0.8 GiB H through the next layer: H200
    trace) and not the earlier groups' of the same layer (0.19 GiB beside down_proj's)."""
    import weakref

    import compress.passes.calibrated as calibrated
    from compress.calib import CalibrationConfig
    from compress.models import arch_for
    from compress.passes import Context, QuantizeConfig, run_pass

    seen: list[tuple[str, weakref.ref]] = []
    stale: list[str] = []
    solve = calibrated.gptq_quantize

    def recording(w, H, *args, **kwargs):
        stale.extend(f"{name} alive at {kwargs['name']}" for name, ref in seen
                     if ref() is not None and ref() is not H)
        seen.append((kwargs["name"], weakref.ref(H)))
        return solve(w, H, *args, **kwargs)

    monkeypatch.setattr(calibrated, "gptq_quantize", recording)
    model = tiny_llama()
    ctx = Context(model, None, arch_for(model.config), CalibrationConfig(samples=4, seq_len=32),
                  torch.device("cpu"))
    ctx._calib_ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    run_pass(ctx, QuantizeConfig(format="int4", group_size=32, method="gptq", ignore=[]))
    assert len({name.split(".")[2] for name, _ in seen}) >= 2   # several layers were solved
    assert not stale


@pytest.mark.parametrize("act_order", [False, True])
def test_consumed_hessian_gives_the_same_codes_and_a_kept_one_is_untouched(act_order):
    """consume_h lets GPTQ use H as its scratch (GPU memory): same result, and without it the
    caller's H is left as it was (the dead-input fix and the permutation work on a copy)."""
    x = correlated_inputs()
    x[:, 5] = 0                                           # a dead input: H[5, 5] = 0
    H = 2 * x.T @ x / len(x)
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    kept = H.clone()
    q, _ = gptq_quantize(w, H, FORMATS[0], block_size=32, act_order=act_order)
    assert torch.equal(H, kept)
    q2, _ = gptq_quantize(w, H, FORMATS[0], block_size=32, act_order=act_order, consume_h=True)
    assert torch.equal(q.codes, q2.codes) and torch.equal(q.scale, q2.scale)
    assert not torch.equal(H, kept)                       # it was the scratch space


def test_inverse_cholesky_retries_when_the_inverse_does_not_factorize(monkeypatch):
    """The factor of H is freed before H^-1 is factorized, so when that second factorization
    fails, H comes back as the inverse of H^-1: the retry must still give the upper factor of
    the inverse of H damped ten times more."""
    from compress import hessian

    x = correlated_inputs(features=64)
    H = (2 * x.T @ x / len(x)).double()
    calls = []
    factorize = torch.linalg.cholesky_ex

    def failing_second(A, *args, **kwargs):
        calls.append(len(calls))
        L, info = factorize(A, *args, **kwargs)
        return L, (torch.ones_like(info) if len(calls) == 2 else info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_second)
    U, damp = hessian.inverse_cholesky(H.clone(), 0.01, overwrite=True)
    assert damp == pytest.approx(0.1) and len(calls) == 4
    want = torch.linalg.inv(H + 0.1 * torch.diag(H).mean() * torch.eye(64, dtype=H.dtype))
    torch.testing.assert_close(U.T @ U, want, rtol=1e-8, atol=1e-8)
