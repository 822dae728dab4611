"""compress.runtime.fused.fuse_projections: q/k/v and gate/up run as one matmul (here the
interpreter's kernels, COMPRESS_KERNELS=always) with the logits of the separate matmuls, the
state dict unchanged and no second copy of the weights; what cannot be fused is left alone."""

from __future__ import annotations

import pytest
import torch

from compress.formats import WeightFormat, codec
from compress.runtime.fused import fuse_projections
from compress.runtime.modules import QuantizedLinear, set_module

FORMATS = {"int4": WeightFormat(group_size=32), "int4-asym": WeightFormat(group_size=32,
                                                                         symmetric=False),
           "int8": WeightFormat(bits=8, group_size=None), "mxfp4": WeightFormat(type="mxfp4",
                                                                               group_size=32),
           "nvfp4": WeightFormat(type="nvfp4", group_size=16)}


def quantized_llama(fmt: WeightFormat, global_scale: float | None = 1000.0):
    """A tiny Llama whose decoder linears are QuantizedLinear in fmt (NVFP4: one global scale
    for all, as fused_global_scales gives q/k/v and gate/up; None: each its own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64))
    c = codec(fmt)
    for name, linear in list(model.named_modules()):
        if isinstance(linear, torch.nn.Linear) and ".layers." in name:
            shared = (torch.tensor([global_scale]) if fmt.type == "nvfp4" and global_scale
                      else None)
            q = c.quantize(linear.weight.data, fmt, tensor_scale=shared)
            set_module(model, name, QuantizedLinear.from_quantized(q, None, torch.float32))
    return model.eval()


@pytest.mark.parametrize("name", list(FORMATS))
def test_fused_groups_give_the_separate_logits_in_the_same_memory(name, monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    model = quantized_llama(FORMATS[name])
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_projections(model) == 2 * 2          # q/k/v and gate/up in each layer
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    attn = model.model.layers[0].self_attn
    # the members' packed words are rows of the stack: one copy of the weights
    stack = attn.q_proj.fused_group.stack.weight_packed
    assert attn.k_proj.weight_packed.untyped_storage().data_ptr() == \
        stack.untyped_storage().data_ptr()
    assert "(fused)" in attn.v_proj.kernel_path and attn.v_proj.fused_group.cache is None
    # the gated MLP epilogue is on by default (fused.GATED_MLP, since its H200 A/B)
    assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    assert fuse_projections(model) == 0                 # already fused


def test_without_the_gated_epilogue_the_mlp_keeps_its_forward(monkeypatch):
    """fused.GATED_MLP off (bench_e2e --no-gated-mlp): gate/up fused, the MLP's forward
    transformers' own."""
    from compress.runtime import fused

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    monkeypatch.setattr(fused, "GATED_MLP", False)
    model = quantized_llama(FORMATS["int4"])
    assert fuse_projections(model) == 2 * 2
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    mlp = model.model.layers[0].mlp
    assert mlp.up_proj.fused_group is mlp.gate_proj.fused_group


@pytest.mark.parametrize("name", ["int4-asym", "nvfp4"])
def test_a_silu_gated_mlp_runs_in_the_gate_up_epilogue(name, monkeypatch):
    """One token (the M = 1 kernel): silu(gate) * up comes out of the gate/up matmul (its
    gated epilogue), with the logits of transformers' three steps; more tokens (the tc path)
    take the product after the stacked matmul."""
    from compress.runtime import fused

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    monkeypatch.setattr(fused, "GATED_MLP", True)
    model = quantized_llama(FORMATS[name])
    gen = torch.Generator().manual_seed(2)
    one, three = torch.randint(0, 128, (1, 1), generator=gen), torch.randint(0, 128, (1, 3),
                                                                              generator=gen)
    with torch.no_grad():
        want = [model(ids).logits for ids in (one, three)]
        fuse_projections(model)
        stack = model.model.layers[0].mlp.gate_proj.fused_group.stack
        got = model(one).logits
        assert stack.kernel_path.endswith("/decode gated")
        got3 = model(three).logits
    assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got3, want[1], rtol=1e-4, atol=1e-4)


def test_a_gated_mlp_whose_projections_are_replaced_runs_its_own_forward(monkeypatch):
    """bench_e2e puts the original linears back after a row: the MLP then computes with
    them, not with the stack it was fused with."""
    from compress.runtime import fused

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    monkeypatch.setattr(fused, "GATED_MLP", True)
    model = quantized_llama(FORMATS["int4"])
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(3))
    fuse_projections(model)
    mlp = model.model.layers[0].mlp
    mlp.gate_proj, mlp.up_proj = (torch.nn.Linear(64, 96, bias=False) for _ in range(2))
    with torch.no_grad():
        got = model(ids).logits
        mlp.__dict__.pop("forward")
        want = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_mlp_of_another_activation_keeps_its_forward(monkeypatch):
    from compress.runtime import fused

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    monkeypatch.setattr(fused, "GATED_MLP", True)
    model = quantized_llama(FORMATS["int4"])
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert fuse_projections(model) == 2 * 2             # gate/up still one matmul
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)


def test_a_moved_member_runs_on_its_own_again(monkeypatch):
    """Replacing a member's buffers (a load, a .to()) ends the fusion for that group: each
    member then computes with its own (new) weights."""
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    model = quantized_llama(FORMATS["int4"])
    ids = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(1))
    fuse_projections(model)
    k = model.model.layers[1].self_attn.k_proj
    k.weight_scale = k.weight_scale * 2                  # new contents, no longer a view
    with torch.no_grad():
        got = model(ids).logits
        for layer in model.model.layers:                 # the same weights, unfused
            for m in layer.modules():
                m.__dict__.pop("forward", None)
        want = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_members_of_different_global_scales_stay_apart(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    assert fuse_projections(quantized_llama(FORMATS["nvfp4"], global_scale=None)) == 0


def test_a_loaded_artifact_is_fused_only_on_cuda(tmp_path):
    """compress.load fuses on CUDA (with the norms); on the CPU the modules stay as loaded."""
    import compress
    from support import tiny_llama

    compress.apply(tiny_llama(), [{"pass": "quantize", "group_size": 32}], tmp_path / "a")
    model = compress.load(tmp_path / "a")
    assert not any(hasattr(m, "fused_group") for m in model.modules())


def test_the_qkv_group_asks_l2_for_the_layers_next_weights_at_one_row(monkeypatch):
    """fused.L2_PREFETCH_MIB (compress/kernels/prefetch.py): after each layer's q/k/v matmul at
    one row, one launch asks for that budget of o_proj's tensors and then the gate/up stack's,
    each target by the same fraction of its rows; logits unchanged; nothing at more rows or
    with the budget 0 (here the kernel returns its plan: the interpreter runs no PTX)."""
    from compress.kernels import prefetch
    from compress.runtime import fused

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    model = quantized_llama(FORMATS["int4-asym"])
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    assert fuse_projections(model) == 2 * 2
    asked = []
    real = prefetch.prefetch_l2
    monkeypatch.setattr(prefetch, "prefetch_l2",
                        lambda ranges, plan=False: asked.append(real(ranges, plan)))
    with torch.no_grad():
        model(ids)                                   # L2_PREFETCH_MIB = 0: off
        assert asked == []
        layer = model.model.layers[1]
        o, stack = layer.self_attn.o_proj, layer.mlp.gate_proj.fused_group.stack
        o_bytes = sum(o._buffers[n].numel() * o._buffers[n].element_size()
                      for n in fused.STACKED)
        monkeypatch.setattr(fused, "L2_PREFETCH_MIB", (o_bytes + 1024) / 2 ** 20)
        got = model(ids).logits
        assert len(asked) == 2                       # one launch a layer
        model(torch.randint(0, 128, (1, 3)))         # a prompt: none
        assert len(asked) == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    pieces = asked[1].tolist()
    starts = {base for base, _ in pieces}
    for t in (o.weight_packed, o.weight_scale, o.weight_zero_point):   # o_proj whole
        assert t.data_ptr() in starts
        assert sum(n for b, n in pieces if t.data_ptr() <= b < t.data_ptr() + t.nbytes) == \
            t.nbytes // 16 * 16
    # then 1 KiB of the gate/up stack, split over its tensors by their sizes (the same rows)
    head = [(t, sum(n for b, n in pieces if t.data_ptr() <= b < t.data_ptr() + t.nbytes))
            for t in (stack.weight_packed, stack.weight_scale, stack.weight_zero_point)]
    total = sum(t.nbytes for t, _ in head)
    for t, got_bytes in head:
        assert abs(got_bytes - 1024 * t.nbytes / total) <= 16


def test_the_prefetch_budget_from_the_environment(monkeypatch):
    """COMPRESS_L2_PREFETCH_MIB sets fused.L2_PREFETCH_MIB for a process (compress bench):
    a number of MiB, 0 when unset, one clear error otherwise."""
    from compress.errors import UsageError
    from compress.runtime import fused

    monkeypatch.delenv("COMPRESS_L2_PREFETCH_MIB", raising=False)
    assert fused._l2_prefetch_mib() == 0
    monkeypatch.setenv("COMPRESS_L2_PREFETCH_MIB", "24.5")
    assert fused._l2_prefetch_mib() == 24.5
    monkeypatch.setenv("COMPRESS_L2_PREFETCH_MIB", "lots")
    with pytest.raises(UsageError, match="COMPRESS_L2_PREFETCH_MIB must be a number of MiB"):
        fused._l2_prefetch_mib()
