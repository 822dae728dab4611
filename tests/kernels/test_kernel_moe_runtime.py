"""ExpertMLPs' grouped path (compress/runtime/moe.py StackedExperts + compress/kernels/moe.py)
against its per-expert loop, on a tiny random Qwen3-MoE built from a config, experts compressed
in INT4 (sym, asym), NVFP4, MXFP4; no host sync; the stored tensors unchanged."""

from __future__ import annotations

import pytest
import torch

from compress.formats import WeightFormat, codec
from compress.runtime import moe
from compress.runtime.modules import QuantizedLinear, reset_dispatch_counts
from compress.runtime.moe import ExpertMLPs

FORMATS = {"int4-sym": WeightFormat(group_size=32), "int4-asym": WeightFormat(group_size=16,
                                                                             symmetric=False),
           "nvfp4": WeightFormat(type="nvfp4", group_size=16),
           "mxfp4": WeightFormat(type="mxfp4", group_size=32)}
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64, num_experts=6, num_experts_per_tok=2,
              moe_intermediate_size=32)


@pytest.fixture(autouse=True)
def kernels_on_cpu(monkeypatch):
    """The kernels under Triton's interpreter (tests/kernels/conftest.py), as on CUDA."""
    monkeypatch.setenv("COMPRESS_KERNELS", "always")


def tiny_moe(fmt: WeightFormat | None):
    """Qwen3-MoE from a config (random weights), experts split into Linears, then every
    expert projection RTN-quantized to fmt (NVFP4: gate and up get their own global scales)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.models import split_experts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **CONFIG)).eval()
    split_experts(model)   # recorded in the structure, as a pass does
    if fmt is not None:
        for expert in experts_of(model):
            for name in expert.names:
                q = codec(fmt).quantize(getattr(expert, name).weight.data, fmt)
                setattr(expert, name, QuantizedLinear.from_quantized(q, None, torch.float32))
    reset_dispatch_counts(model)   # unfuse_experts ran the loop once (its check)
    return model


def experts_of(model) -> ExpertMLPs:
    return model.model.layers[0].mlp.experts


def routing(rng, tokens=3, top_k=2, experts=6):
    """Distinct experts per token; token 0 and 1 share an expert, most experts unused."""
    index = torch.tensor([[4, 1], [1, 0], [4, experts]][:tokens])   # experts (6): masked slot
    weights = torch.rand(tokens, top_k, generator=rng)
    return index, weights


def assert_close_to_loop(got, want, rng):
    """The grouped kernel against the per-expert loop. The M = 1 INT loop keeps >= 18 bits of
    sum |x||w| (kernels/NOTES.md v3), which is several times the largest output here: 1e-5 of
    max |want| failed by 16% on one seed in 192 elements (4.4e-8, 2026-12-03); 1e-4 leaves that
    precision a margin of 8."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * float(want.abs().max()),
                               msg=lambda m: f"{m} (seed {rng.initial_seed()})")


@pytest.mark.parametrize("name", list(FORMATS))
def test_grouped_path_equals_the_per_expert_loop(name, rng):
    experts = experts_of(tiny_moe(FORMATS[name]))
    hidden = torch.randn(3, 64, generator=rng)
    index, weights = routing(rng)
    with torch.no_grad():
        want = experts.per_expert_forward(hidden, index, weights)
        got = experts(hidden, index, weights)
    assert set(experts.kernel_calls) == {f"triton/moe-{FORMATS[name].name}/grouped"}
    assert_close_to_loop(got, want, rng)


def test_model_logits_equal_with_and_without_the_grouped_path(monkeypatch):
    """NVFP4 (gate and up with different global scales: two row segments in one launch)."""
    model = tiny_moe(FORMATS["nvfp4"])
    ids = torch.tensor([[5, 77, 201]])
    with torch.no_grad():
        grouped = model(ids).logits
        monkeypatch.setattr(moe, "GROUPED_MAX_ROWS", 0)
        loop = model(ids).logits
    assert "triton/moe-nvfp4/grouped" in experts_of(model).kernel_calls
    assert "per-expert loop" in experts_of(model).kernel_calls
    torch.testing.assert_close(grouped, loop, rtol=1e-4, atol=1e-4 * float(loop.abs().max()))


def test_grouped_forward_does_no_host_sync(monkeypatch, rng):
    """What a CUDA graph cannot capture (a device-to-host read) raises on the CPU too."""
    experts = experts_of(tiny_moe(FORMATS["int4-asym"]))
    hidden = torch.randn(3, 64, generator=rng)
    index, weights = routing(rng)
    with torch.no_grad():
        want = experts.per_expert_forward(hidden, index, weights)

        def sync(*args, **kwargs):
            raise AssertionError("host sync in the grouped path")

        for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, sync)
        monkeypatch.setattr(torch, "nonzero", sync)
        monkeypatch.setattr(torch, "where", sync)
        got = experts(hidden, index, weights)   # first call: stacks too
        got2 = experts(hidden, index, weights)
        monkeypatch.undo()
    assert_close_to_loop(got, want, rng)
    assert torch.equal(got, got2)


def test_stacking_keeps_tensors_and_memory(rng):
    """After the grouped call the experts' buffers are views into the stacks (no second copy),
    with the same names, shapes, dtypes and values; moving or casting restacks."""
    experts = experts_of(tiny_moe(FORMATS["int4-asym"]))
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    hidden = torch.randn(3, 64, generator=rng)
    index, weights = routing(rng)
    with torch.no_grad():
        first = experts(hidden, index, weights)
    after = experts.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype
               for k in before)
    stacked = experts._stacked
    for e, expert in enumerate(experts):
        gate, up, down = expert.projections()
        for p, stack in ((gate, stacked.gate_up), (up, stacked.gate_up), (down, stacked.down)):
            for name, key in (("weight_packed", "packed"), ("weight_scale", "scale"),
                              ("weight_zero_point", "zero")):
                assert (p._buffers[name].untyped_storage().data_ptr()
                        == stack[key].untyped_storage().data_ptr())
    experts.to(torch.float64)   # scales become float64 copies: the stacks are rebuilt
    assert experts._stacked is None
    with torch.no_grad():
        again = experts(hidden, index, weights)
    assert experts._stacked.gate_up["scale"].dtype == torch.float64
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)


def test_uncompressed_or_prefill_calls_take_the_loop(monkeypatch, rng):
    experts = experts_of(tiny_moe(None))
    hidden = torch.randn(3, 64, generator=rng)
    index, weights = routing(rng)
    with torch.no_grad():
        experts(hidden, index, weights)
    assert experts._stacked.reason.startswith("not every projection")
    assert set(experts.kernel_calls) == {"per-expert loop"}
    monkeypatch.setattr(moe, "GROUPED_MAX_ROWS", 5)   # 6 rows: prefill-sized
    compressed = experts_of(tiny_moe(FORMATS["int4-sym"]))
    with torch.no_grad():
        compressed(hidden, index, weights)
    assert set(compressed.kernel_calls) == {"per-expert loop"}


def test_artifact_is_unchanged_by_the_grouped_path_and_loads_into_it(tmp_path):
    """Saved before and after a grouped call: the same tensors; loaded: grouped again, same
    logits."""
    from safetensors.torch import load_file

    import compress
    from compress.formats.artifact import save_artifact

    model = tiny_moe(FORMATS["nvfp4"])
    ids = torch.tensor([[5, 77, 201]])
    save_artifact(model, None, tmp_path / "before", "", {})
    with torch.no_grad():
        want = model(ids).logits
    assert "triton/moe-nvfp4/grouped" in experts_of(model).kernel_calls
    save_artifact(model, None, tmp_path / "after", "", {})
    before, after = (load_file(tmp_path / d / "model.safetensors") for d in ("before", "after"))
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               for k in before)
    loaded = compress.load(tmp_path / "after")
    with torch.no_grad():
        got = loaded(ids).logits
    assert "triton/moe-nvfp4/grouped" in experts_of(loaded).kernel_calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
