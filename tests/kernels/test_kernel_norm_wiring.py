"""compress.runtime.norms.fuse_rmsnorms: the loaded model's RMSNorms run the Triton kernel (here
the interpreter, COMPRESS_KERNELS=always) with the same logits; norms of another formula stay."""

from __future__ import annotations

import torch

from compress.runtime.norms import fuse_rmsnorms


def tiny(family: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def test_llama_norms_run_fused_with_the_same_logits(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    model = tiny("llama")
    for norm in model.modules():  # non-trivial weights, so a kernel that ignored them fails
        if type(norm).__name__.endswith("RMSNorm"):
            norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_rmsnorms(model) == 2 * 2 + 1      # two a layer and the final norm
        got = model(ids).logits
    assert all(getattr(m, "fused_rmsnorm", False) for m in model.modules()
               if type(m).__name__.endswith("RMSNorm"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert fuse_rmsnorms(model) == 0                 # already fused: nothing to do twice


def test_a_norm_of_another_formula_is_left_alone(monkeypatch):
    """Gemma's RMSNorm scales by (1 + weight): the check on a random row keeps it unfused."""
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    model = tiny("gemma3_text", sliding_window=8, layer_types=["sliding_attention"] * 2)
    assert fuse_rmsnorms(model) == 0


def test_nothing_is_fused_where_kernels_do_not_run(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "auto")     # CPU tensors: the reference runs
    assert fuse_rmsnorms(tiny("llama")) == 0


def test_rmsnorm_pass_norms_run_fused_with_the_same_logits(monkeypatch):
    """A GPT-NeoX (LayerNorm) model converted by the rmsnorm pass: its weightless RMSNorms or
    CRMSNorms all run the kernel, with the logits of the eager modules."""
    from compress.calib import CalibrationConfig
    from compress.models import arch_for
    from compress.passes import Context, run_pass
    from compress.passes.rmsnorm import RMSNormConfig

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for mode in ("rmsnorm", "crmsnorm"):
        model = tiny("gpt_neox")
        ctx = Context(model, None, arch_for(model.config), CalibrationConfig(),
                      torch.device("cpu"))
        norms = run_pass(ctx, RMSNormConfig(mode=mode)).summary["norms"]
        with torch.no_grad():
            want = model(ids).logits
            assert fuse_rmsnorms(model) == norms == 2 * 2 + 1
            got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_llama_rope_runs_fused_with_the_same_logits(monkeypatch):
    """compress.runtime.rope.fuse_rope: the family's RoPE becomes the one-launch kernel
    (checked on random heads first) in the fused model only, logits unchanged; another model of
    the family in the process keeps transformers' RoPE; a second call finds nothing to do;
    where kernels do not run nothing is fused."""
    from transformers.models.llama import modeling_llama

    from compress.kernels import rope_gather
    from compress.runtime.rope import fuse_rope

    # the wrapper lives in the modeling module: restored after the test
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb",
                        modeling_llama.apply_rotary_pos_emb)
    model, other = tiny("llama"), tiny("llama")
    monkeypatch.setenv("COMPRESS_KERNELS", "auto")
    assert fuse_rope(model) == 0                     # CPU tensors: transformers' own RoPE
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    calls = []
    real = rope_gather.rope_qk
    monkeypatch.setattr(rope_gather, "rope_qk", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_rope(model) == 2                 # both layers
        calls.clear()
        got = model(ids).logits
        assert len(calls) == 2                       # one launch a layer
        other(ids)
        assert len(calls) == 2                       # not fused: transformers' RoPE
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert fuse_rope(model) == 0
