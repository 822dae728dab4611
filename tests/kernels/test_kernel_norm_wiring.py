"""compress.runtime.norms.fuse_rmsnorms: the loaded model's RMSNorms run the Triton kernel (here
the interpreter, COMPRESS_KERNELS=always) with the same logits; norms of another formula stay."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_attention_residual_add_runs_in_the_norm_kernel(family, monkeypatch):
    """fuse_residual_norms: each decoder layer's attention add and post-attention norm are one
    add_rmsnorm call with a residual; the logits of a prompt and of greedy cached decode steps
    are the unfused model's; a second call finds nothing to do."""
    from compress.kernels import rmsnorm
    from compress.runtime.norms import fuse_residual_norms

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    model = tiny(family)
    for norm in model.modules():
        if type(norm).__name__.endswith("RMSNorm"):
            norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    def run():
        logits = model(ids).logits
        steps = model.generate(ids[:1], max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=0)
        return logits, steps.sequences, torch.stack(steps.logits)

    calls = []
    real = rmsnorm.add_rmsnorm
    monkeypatch.setattr(rmsnorm, "add_rmsnorm",
                        lambda x, r, *a: calls.append(r is not None) or real(x, r, *a))
    with torch.no_grad():
        norms = fuse_rmsnorms(model)
        want = run()
        assert fuse_residual_norms(model) == 2
        calls.clear()
        model(ids)
        # one call a norm (Qwen3's q/k norms too); the post-attention ones with the residual
        assert len(calls) == norms and calls.count(True) == 2
        got = run()
        model.train()                                # training (dropout): the layer's own
        calls.clear()
        model(ids)
        assert calls.count(True) == 0
        model.eval()
    # the same float32 add, rounded as torch rounds it, then the same norm kernel: bit for bit
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert fuse_residual_norms(model) == 0


def test_bf16_layers_are_fused_too(monkeypatch):
    """In bf16 the kernel's rounding of the sum may differ from torch's by an ulp (here: the
    interpreter truncates): the layer check is about the formula, so bf16 layers fuse, with
    the unfused model's greedy tokens."""
    from compress.runtime.norms import fuse_residual_norms

    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    torch.manual_seed(0)   # wide enough for outputs of ~4, where a bf16 ulp is 1/32
    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=512,
                                  intermediate_size=1024, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fuse_rmsnorms(model)
        want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert fuse_residual_norms(model) == 2
        got = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)

def test_a_layer_of_another_formula_keeps_its_forward(monkeypatch):
    """The probe check reads what a layer's forward does, not its class name: a layer that
    norms the attention output before adding it (Gemma's order) or that does not hand the
    attention an argument it was given keeps its own forward; the same layer written the
    Llama way is fused."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from compress.runtime.norms import fuse_residual_norms

    class Plain(LlamaDecoderLayer):
        def forward(self, hidden_states, attention_mask=None, position_ids=None,
                    position_embeddings=None, **kwargs):
            attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                     attention_mask=attention_mask, position_ids=position_ids,
                                     position_embeddings=position_embeddings, **kwargs)
            hidden = hidden_states + attn
            return hidden + self.mlp(self.post_attention_layernorm(hidden))

    class Sandwich(LlamaDecoderLayer):
        def forward(self, hidden_states, attention_mask=None, position_ids=None,
                    position_embeddings=None, **kwargs):
            attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                     attention_mask=attention_mask, position_ids=position_ids,
                                     position_embeddings=position_embeddings, **kwargs)
            hidden = hidden_states + self.post_attention_layernorm(attn)
            return hidden + self.mlp(hidden)

    class Dropped(LlamaDecoderLayer):   # position_ids not passed on
        def forward(self, hidden_states, attention_mask=None, position_ids=None,
                    position_embeddings=None, **kwargs):
            attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                     attention_mask=attention_mask,
                                     position_embeddings=position_embeddings, **kwargs)
            hidden = hidden_states + attn
            return hidden + self.mlp(self.post_attention_layernorm(hidden))

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    for cls, fused in ((Sandwich, 0), (Dropped, 0), (Plain, 2)):
        model = tiny("llama")
        for layer in model.model.layers:
            layer.__class__ = cls
        fuse_rmsnorms(model)
        assert fuse_residual_norms(model) == fused, cls.__name__


def test_no_residual_add_is_fused_where_norms_are_not(monkeypatch):
    from compress.runtime.norms import fuse_residual_norms

    monkeypatch.setenv("COMPRESS_KERNELS", "auto")     # CPU tensors: transformers' own code
    model = tiny("llama")
    assert fuse_rmsnorms(model) == 0 and fuse_residual_norms(model) == 0


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


@pytest.mark.parametrize("name", ["int4", "nvfp4"])
def test_mlp_residual_add_runs_in_down_projs_epilogue(name, monkeypatch):
    """With compressed linears, the MLP's residual add moves into down_proj's matmul: at one
    row (greedy decode steps) as the kernel's bias, at more rows (the prompt) added after the
    kernel; the logits and tokens are the unfused model's up to that one rounding. An MLP
    that stops calling down_proj after fusion (here: patched to return zeros) still gets the
    stream added by the layer."""
    from test_kernel_fused_projections import FORMATS, quantized_llama

    from compress.runtime.fused import fuse_projections
    from compress.runtime.norms import fuse_residual_norms

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    model = quantized_llama(FORMATS[name])
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))

    def run():
        steps = model.generate(ids[:1], max_new_tokens=3, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=0)
        return model(ids).logits, steps.sequences, torch.stack(steps.logits)

    with torch.no_grad():
        fuse_rmsnorms(model)
        fuse_projections(model)
        want = run()
        assert fuse_residual_norms(model) == 2
        assert all(layer.fused_residual_mlp for layer in model.model.layers)
        got = run()
        down = model.model.layers[1].mlp.down_proj
        assert any(path.endswith("/decode +residual") for path in down.kernel_calls)
        assert "pending_residual" not in down.__dict__
        for layer in model.model.layers:
            layer.mlp.forward = lambda x: torch.zeros_like(x)
        zeroed = model(ids).logits
        for layer in model.model.layers:
            del layer.fused_residual, layer.forward    # transformers' own layer again
        zeroed_want = model(ids).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zeroed, zeroed_want, rtol=1e-5, atol=1e-5)


def test_an_mlp_that_changes_down_projs_output_adds_the_stream_itself(monkeypatch):
    """An MLP whose output is not down_proj's own (here scaled after it) keeps the add in the
    layer: no residual reaches down_proj, logits as before."""
    from test_kernel_fused_projections import FORMATS, quantized_llama

    from compress.runtime.norms import fuse_residual_norms

    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    model = quantized_llama(FORMATS["int4"])
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.forward = lambda x, mlp=mlp: 0.5 * type(mlp).forward(mlp, x)
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fuse_rmsnorms(model)
        want = model(ids).logits
        assert fuse_residual_norms(model) == 2
        assert not any(layer.fused_residual_mlp for layer in model.model.layers)
        got = model(ids).logits
    assert not any("+residual" in path for layer in model.model.layers
                   for path in layer.mlp.down_proj.kernel_calls)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_dequantized_baseline_runs_transformers_code(monkeypatch):
    """compress bench's default baseline (dequantized_copy of a loaded artifact, a deep copy)
    after every run-time fusion compress.load makes on CUDA: none of them in the copy (no
    patched forward, outside the scope in its forward, transformers' cache update), all still
    in the artifact's model, and the same logits."""
    from test_kernel_fused_projections import FORMATS, quantized_llama

    from compress.evaluation.bench import dequantized_copy
    from compress.runtime import fused, scope
    from compress.runtime.fused import fuse_projections
    from compress.runtime.kv_cache import fuse_static_cache
    from compress.runtime.norms import fuse_residual_norms
    from compress.runtime.rope import fuse_rope
    from transformers.cache_utils import StaticLayer
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(StaticLayer, "update", StaticLayer.update)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb",
                        modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(fused, "GATED_MLP", True)
    monkeypatch.setenv("COMPRESS_KERNELS", "always")
    model = quantized_llama(FORMATS["int4"])
    fuse_rmsnorms(model)
    assert fuse_residual_norms(model) == 2 and fuse_rope(model) == 2
    assert fuse_projections(model) == 4 and fuse_static_cache(model)
    assert "forward" in vars(model.model.layers[0].mlp)          # the gated epilogue
    dense = dequantized_copy(model)
    patched = [name for name, m in dense.named_modules() if "forward" in vars(m)]
    assert not patched
    seen = {}

    def note(name):
        def hook(*args):   # returns None: the output stays the layer's
            seen.setdefault(name, bool(scope.RUNNING.get()))
        return hook

    for name, m in (("artifact", model), ("baseline", dense)):
        m.model.layers[0].register_forward_hook(note(name))
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids).logits, dense(ids).logits
    assert seen == {"artifact": True, "baseline": False}
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
