"""sparsify: N:M masks, Wanda, SparseGPT, 2:4 storage, order rules, and the pass on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from column_loop_reference import sparsegpt_prune_reference

from compress.errors import CompressError, UsageError
from compress.formats import WeightFormat, codec
from compress.formats import sparse24 as s24
from compress.passes.sparsify import (
    SparsifyConfig,
    nm_mask,
    select_mask,
    sparsegpt_prune,
    unstructured_mask,
    wanda_scores,
)
from compress.recipe import parse_recipe


def correlated_inputs(tokens: int, features: int, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features, like real activations. [tokens, features]"""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, features, generator=g)
    return base + 0.1 * torch.randn(tokens, features, generator=g)


def output_error(x: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    return float(((x @ (w - w_new).T) ** 2).sum())


# --- the math -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_mask_keeps_the_n_largest_of_every_group(n, m):
    scores = torch.rand(6, 8 * m)
    keep = nm_mask(scores, n, m)
    groups, kept = scores.reshape(6, -1, m), keep.reshape(6, -1, m)
    assert (kept.sum(-1) == n).all()
    # every kept score is at least every dropped score of its group
    low_kept = torch.where(kept, groups, torch.inf).amin(-1)
    high_dropped = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (low_kept >= high_dropped).all()


def test_unstructured_mask_drops_the_fraction_per_row():
    keep = unstructured_mask(torch.rand(5, 40), 0.3)
    assert (keep.sum(1) == 28).all()


def test_wanda_keeps_inputs_with_large_activations():
    w = torch.ones(3, 4)
    keep = nm_mask(wanda_scores(w, torch.tensor([1.0, 9.0, 0.5, 3.0])), 2, 4)
    assert keep.tolist() == [[False, True, False, True]] * 3


def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs():
    x = correlated_inputs(512, 64)
    H = 2 * x.T @ x / len(x)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    pruned = sparsegpt_prune(w, H, 2, 4, block_size=16)
    s24.check_nm(pruned, 2, 4, "pruned")
    magnitude = w * nm_mask(w.abs(), 2, 4)
    wanda = w * nm_mask(wanda_scores(w, x.norm(dim=0)), 2, 4)
    error = output_error(x, w, pruned)
    assert error < 0.5 * output_error(x, w, magnitude)
    assert error < 0.5 * output_error(x, w, wanda)


def test_sparsegpt_unstructured_reaches_the_ratio():
    x = correlated_inputs(256, 32)
    w = torch.randn(8, 32)
    pruned = sparsegpt_prune(w, 2 * x.T @ x / len(x), 0, 0, sparsity=0.5, block_size=16)
    assert (pruned == 0).float().mean() == 0.5
    assert output_error(x, w, pruned) < output_error(x, w, w * unstructured_mask(w.abs(), 0.5))


# --- 2:4 storage ---------------------------------------------------------------------------------

def random_24(rows: int, cols: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w = w * nm_mask(torch.rand(rows, cols, generator=g), 2, 4)
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])   # a group with one non-zero
    w[0, 4:8] = 0                                     # and one with none
    return w.to(dtype)


def test_meta_layout_matches_the_contract():
    w = torch.zeros(1, 8)
    w[0, 1], w[0, 3], w[0, 4] = 1.0, 2.0, 3.0   # group 0: p=(1, 3); group 1: p=(0, 1) padded
    tensors = s24.compress_dense(w, dtype=torch.float16)
    # nibble(g0) = 1 | 3 << 2 = 13 (low), nibble(g1) = 0 | 1 << 2 = 4 (high)
    assert tensors["weight_meta"].tolist() == [[13 | 4 << 4]]
    assert tensors["weight_values"].tolist() == [[1.0, 2.0, 3.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dense_round_trip(dtype):
    w = random_24(12, 48, dtype)
    tensors = s24.compress_dense(w)
    assert tensors["weight_meta"].shape == (12, 6) and tensors["weight_meta"].dtype == torch.uint8
    assert tensors["weight_values"].shape == (12, 24)
    back = s24.decompress_dense(tensors["weight_meta"], tensors["weight_values"])
    assert torch.equal(back.to(dtype), w.to(back.dtype).to(dtype))
    assert torch.equal(back.float(), w.to(tensors["weight_values"].dtype).float())


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_round_trip_keeps_codes_and_scales(symmetric):
    fmt = WeightFormat(type="int", bits=4, group_size=16, symmetric=symmetric)
    q = codec(fmt).quantize(random_24(8, 64), fmt)
    tensors = s24.compress_quantized(q)
    assert tensors["weight_packed"].shape == (8, 64 // 16)      # kept codes, int32 [O, I/16]
    assert tensors["weight_scale"].shape == (8, 4)              # unchanged, original positions
    assert tensors["weight_shape"].tolist() == [8, 64]
    back = s24.decompress_quantized(tensors, fmt)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_nvfp4_round_trip_keeps_codes_and_scales():
    fmt = WeightFormat(type="nvfp4", group_size=16)
    q = codec(fmt).quantize(random_24(8, 64), fmt)
    dense = codec(fmt).pack(q, torch.float32)
    tensors = s24.compress_quantized(q)
    assert tensors["weight_packed"].dtype == torch.uint8
    assert tensors["weight_packed"].shape == (8, 64 // 4)        # kept codes, 2 a byte
    assert torch.equal(tensors["weight_scale"].float(), dense["weight_scale"].float())
    back = s24.decompress_quantized(tensors, fmt)
    assert torch.equal(back.dequantize(), q.dequantize())
    assert (q.dequantize() != 0).sum() > 0.4 * q.codes.numel()   # not a trivially empty weight


def test_storage_rejects_a_dense_weight():
    w = random_24(4, 16)
    w[2, 8:11] = 1.0  # the group 8..11 of row 2 now has 3 non-zeros
    with pytest.raises(CompressError, match="row 2, inputs 8..11"):
        s24.compress_dense(w, "model.layers.0.mlp.up_proj")


# --- recipes --------------------------------------------------------------------------------------

def test_quantize_before_sparsify_is_an_error_naming_both():
    with pytest.raises(UsageError, match=r"passes\[1\] \(sparsify\).*before quantize"):
        parse_recipe({"passes": [{"pass": "quantize"}, {"pass": "sparsify"}]})
    parse_recipe({"passes": [{"pass": "sparsify"}, {"pass": "quantize"}]})


@pytest.mark.parametrize("spec,message", [
    ({"pattern": "unstructured"}, "needs sparsity"),
    ({"pattern": "4:8", "storage": "compressed"}, "not 2:4 sparse"),
    ({"pattern": "4:2"}, "0 < N < M"),
    ({"sparsity": 0.5}, "only for pattern unstructured"),
])
def test_bad_configs_fail_at_parse_time(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_recipe({"passes": [{"pass": "sparsify", **spec}]})


def test_storage_defaults():
    assert SparsifyConfig(pattern="2:4").compressed()
    assert SparsifyConfig(pattern="2:8").compressed()
    assert not SparsifyConfig(pattern="4:8").compressed()
    assert not SparsifyConfig(pattern="unstructured", sparsity=0.5).compressed()


# --- the pass on SmolLM2 ---------------------------------------------------------------------------

def _context(loaded, samples=16, seq_len=128):
    from compress.calib import CalibrationConfig
    from compress.passes import Context

    return Context(loaded.model, loaded.tokenizer, loaded.arch,
                   CalibrationConfig(samples=samples, seq_len=seq_len), torch.device("cpu"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_sparsegpt_int4_apply_save_load(smollm2, smollm2_copy, eval_windows, tmp_path):
    """SparseGPT 2:4 on two layers, INT4 on one of them: 2:4 holds everywhere, report and
    structure are written, and the loaded artifact computes the in-memory model's logits."""
    from compress.formats.artifact import save_artifact
    from compress.passes import run_pass
    from compress.runtime.artifact import load_artifact
    from compress.runtime.modules import Sparse24Linear, Sparse24QuantizedLinear

    recipe = parse_recipe({"passes": [
        {"pass": "sparsify", "method": "sparsegpt", "targets": [r"re:layers\.[01]\."]},
        {"pass": "quantize", "format": "int4", "group_size": 64, "symmetric": False,
         "targets": [r"re:layers\.0\."]}]})
    ctx = _context(smollm2_copy)
    reports = [run_pass(ctx, cfg).to_dict() for cfg in recipe.passes]
    sparse = reports[0]["modules"]
    assert len(sparse) == 14 and all(m["sparsity"] >= 0.5 for m in sparse.values())
    s24.check_nm(ctx.model.model.layers[0].mlp.down_proj.dequantized_weight(), 2, 4, "down")
    ids = eval_windows[:2, :64]
    save_artifact(ctx.model, ctx.tokenizer, tmp_path / "a", recipe.to_yaml(), {"passes": reports})
    in_memory = _logits(ctx.model, ids)   # after save: the model computes with what was written
    assert isinstance(ctx.model.model.layers[0].mlp.down_proj, Sparse24QuantizedLinear)
    assert isinstance(ctx.model.model.layers[1].self_attn.q_proj, Sparse24Linear)
    loaded = load_artifact(tmp_path / "a")
    assert torch.equal(_logits(loaded, ids), in_memory)
    structure = json.loads((tmp_path / "a" / "config.json").read_text())["compress"]["structure"]
    assert structure["sparsity"]["model.layers.1.mlp.up_proj"] == "2:4"
    for name in structure["sparsity"]:
        module = loaded.get_submodule(name)
        w = module.dense_weight() if isinstance(module, Sparse24Linear) else \
            module.dequantized_weight()
        s24.check_nm(w, 2, 4, name)
    # layers that were not targeted are untouched
    assert torch.equal(loaded.model.layers[5].mlp.up_proj.weight,
                       smollm2.model.model.layers[5].mlp.up_proj.weight)


def test_wanda_dense_export_loads_in_transformers(smollm2_copy, eval_windows, tmp_path):
    """storage: dense writes zeros in place; plain transformers (compressed-tensors for INT4)
    loads it and computes the same logits."""
    from transformers import AutoModelForCausalLM

    from compress.formats.artifact import save_artifact
    from compress.passes import run_pass

    recipe = parse_recipe({"passes": [
        {"pass": "sparsify", "method": "wanda", "storage": "dense",
         "targets": [r"re:layers\.0\.mlp"]},
        {"pass": "quantize", "format": "int4", "group_size": 64, "targets": [r"re:layers\.0\."]}]})
    ctx = _context(smollm2_copy, samples=8)
    for cfg in recipe.passes:
        run_pass(ctx, cfg)
    ids = eval_windows[:1, :64]
    save_artifact(ctx.model, ctx.tokenizer, tmp_path / "d", recipe.to_yaml(), {})
    in_memory = _logits(ctx.model, ids)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    assert torch.allclose(_logits(plain, ids), in_memory, atol=1e-3)


def test_save_refuses_a_marked_module_that_lost_its_pattern(smollm2_copy, tmp_path):
    from compress.formats.artifact import save_artifact
    from compress.passes import run_pass

    model = smollm2_copy.model
    run_pass(_context(smollm2_copy), SparsifyConfig(method="magnitude",
                                                    targets=[r"re:layers\.0\.mlp\.up"]))
    model.model.layers[0].mlp.up_proj.weight.data[3, :4] = 1.0
    with pytest.raises(CompressError, match="model.layers.0.mlp.up_proj.*row 3, inputs 0..3"):
        save_artifact(model, None, tmp_path / "x", "", {})
    assert not (tmp_path / "x").exists()


def test_targets_must_suit_the_method(smollm2_copy):
    from compress.passes import run_pass

    with pytest.raises(UsageError, match="lm_head is outside the decoder layers"):
        run_pass(_context(smollm2_copy), SparsifyConfig(method="wanda", targets=["lm_head"],
                                                        ignore=[]))
    with pytest.raises(UsageError, match="no Linear layer matches"):
        run_pass(_context(smollm2_copy), SparsifyConfig(targets=["nothing"]))


@pytest.mark.parametrize("nm", [(2, 4, None), (0, 0, 0.5)])
def test_sparsegpt_restructured_loop_matches_the_column_by_column_reference(nm):
    x = correlated_inputs(1024, 128)
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(4))
    H = 2 * x.T @ x / len(x)
    new = sparsegpt_prune(w, H, *nm, block_size=32)
    old = sparsegpt_prune_reference(w, H, *nm, block_size=32)
    assert ((new == 0) == (old == 0)).float().mean() > 0.995
    assert (new - old).norm() / old.norm() < 1e-4


def test_every_tensor_sparsify_creates_follows_its_inputs():
    """Under torch.device("meta") a tensor created without a device would land on meta."""
    x = correlated_inputs(256, 64)
    w, H = torch.randn(16, 64), 2 * x.T @ x / len(x)
    with torch.device("meta"):
        outs = [sparsegpt_prune(w, H, 2, 4, block_size=16),
                sparsegpt_prune(w, H, 0, 0, sparsity=0.5, block_size=16),
                w * select_mask(wanda_scores(w, x.norm(dim=0)), 2, 4, None),
                w * select_mask(w.abs(), 0, 0, 0.5)]
    assert all(t.device.type == "cpu" for t in outs)
