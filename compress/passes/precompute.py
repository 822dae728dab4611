"""precompute: store layer 0's per-token results in place of the embedding table (Graef 2024).

"Transformer tricks: Precomputing the first layer" (arXiv 2402.13388). Layer 0 reads only the
embedding of one token, so whatever in it depends on the token alone is computed once per
vocabulary entry and stored. Each table row is laid out as

    [ embedding (d) | q (q) | k (e) | v (e) ]    2(d + e) values when q = d; q, k pre-RoPE

(q = query heads x head_dim, e = K/V width). Serial blocks (Llama family) keep the embedding
for the residual; parallel attention/FFN blocks (GPT-J, Phi, GPT-NeoX with use_parallel_residual)
store the embedding plus layer 0's FFN output (skip connection and FFN folded), so layer 0's FFN
disappears too.

At run time the embedding module gathers rows and hands the q|k|v part to layer 0, whose norm
becomes an Identity and whose q/k/v projections become column slices of the rows; RoPE, the
attention, the KV cache and generation are the model's own. The layout is the one the Triton
gather+RoPE kernel reads (compress/kernels/rope_gather.py).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from compress.errors import UsageError
from compress.models import Arch, decoder_layers, resolve_path
from compress.passes.base import Context, PassConfig, PassReport, register
from compress.runtime.artifact import structure
from compress.runtime.modules import get_module
from compress.runtime.precompute import (  # noqa: F401  (re-exported for the pass's callers)
    ACCOUNTING_ALIASES,
    TABLE_DTYPES,
    Dims,
    FoldedFFN,
    PrecomputedEmbedding,
    RowHandoff,
    TableColumns,
    decode_rows,
    dims_of,
    fused_columns,
    install_runtime,
    load_precompute,
)

BATCHES = (1, 16, 256, 1024)


class PrecomputeConfig(PassConfig):
    """Replace the embedding table by precomputed first-layer rows."""

    needs_family: ClassVar[bool] = True   # the attention/MLP layout of the Arch table

    @classmethod
    def family_problem(cls, arch: Arch) -> str | None:
        return unsupported(arch)

    kind: Literal["precompute"] = Field("precompute", alias="pass")
    # Storage of the table; int8 keeps one float32 scale per row and segment (emb, q, k, v).
    table_dtype: Literal["float32", "bfloat16", "float16", "int8"] = "float32"
    # Largest allowed growth of the model's bytes, as a fraction (0.1 = +10%); None: no limit.
    # Checked before any work, from the shapes and dtypes: nothing is changed when refused.
    max_growth: float | None = None
    on_growth: Literal["error", "warn"] = "error"
    # Tied serial models: the LM head reads the table's embedding columns instead of keeping its
    # own copy (saves V x d; the head's matrix is then strided, measured ~25% slower on CPU).
    head_from_table: bool = True
    chunk: int = Field(4096, gt=0, description="vocabulary rows computed per batch")

    exact: ClassVar[bool] = True
    changes_layer0: ClassVar[bool] = False

    def order_error(self, index: int, passes: list[PassConfig]) -> str | None:
        # The table is computed from layer 0's final weights: anything changing them later
        # would be silently ignored.
        later = [p.kind for p in passes[index + 1:] if p.changes_layer0]
        if later:
            return ("precompute must come after every pass that changes layer 0; move it after "
                    + ", ".join(later))
        if any(isinstance(p, PrecomputeConfig) for p in passes[:index]):
            return "precompute appears twice; keep one"
        return None


# ---------------------------------------------------------------------------------------------
# Shapes and accounting (from a config alone: no weights)


def parameter_count(dims: Dims) -> int:
    """Weights of the whole model (matrices, norms, router; biases ignored as in the paper)."""
    attention = dims.d * (dims.q + 2 * dims.e) + dims.q * dims.d
    ffn = dims.experts * dims.mlp_matrices * dims.d * dims.f
    router = dims.d * dims.experts if dims.experts > 1 else 0
    per_layer = attention + ffn + router + 2 * dims.d
    embeddings = dims.vocab * dims.d * (1 if dims.tied else 2)
    return embeddings + dims.layers * per_layer + dims.d


def precompute_accounting(config, parallel: bool | None = None,
                          batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    """Memory, reads and FLOPs of layer 0 with and without the table, in values (not bytes).

    Follows the paper: weights eliminated are the Q, K, V matrices (and for parallel blocks the
    FFN's, all experts); norms and biases are not counted. Reads at batch B: the eliminated
    weights once plus B embedding rows, against B table rows. A tied output embedding of a
    serial block is read from the table's residual columns (they hold the embedding); a parallel
    block's residual holds x + FFN(x), so there the LM head keeps the embedding.
    """
    dims = dims_of(config, parallel)
    eliminated = dims.d * (dims.q + 2 * dims.e)
    if dims.parallel:
        eliminated += dims.experts * dims.mlp_matrices * dims.d * dims.f
    table = dims.vocab * dims.row
    embedding = dims.vocab * dims.d
    head_kept = dims.tied and dims.parallel
    net = table - eliminated - (0 if head_kept else embedding)
    total = parameter_count(dims)
    per_batch = {}
    for batch in batches:
        before = eliminated + batch * dims.d
        after = batch * dims.row
        per_batch[batch] = {"reads_before": before, "reads_after": after,
                            "read_reduction": before / after,
                            "reads_saved_per_token": (before - after) / batch,
                            "flops_saved_per_token": 2 * eliminated}
    return {"model_type": dims.model_type, "parallel": dims.parallel, "tied": dims.tied,
            "output_embedding_kept": head_kept,
            "row_width": dims.row, "weights_eliminated": eliminated, "table_values": table,
            "embedding_values": embedding, "net_change": net, "model_params": total,
            "net_change_fraction": net / total,
            # reads pay off below this batch size: eliminated + B d = B row
            "break_even_batch": eliminated / (dims.row - dims.d),
            "flops_per_token_before": 2 * eliminated, "flops_per_token_after": 0,
            "per_batch": per_batch}


# ---------------------------------------------------------------------------------------------
# The table: pure math on layer 0's modules

def unsupported(arch: Arch) -> str | None:
    """Why layer 0 of this family cannot be precomputed, or None."""
    if arch.encoder or arch.lm_head is None:
        return f"{arch.name} is an encoder; precompute is for decoder LMs"
    if arch.extra_embeds:
        return (f"{arch.name}'s layer 0 reads more than the token embedding "
                f"({', '.join(arch.extra_embeds)}), so it is not a function of the token alone")
    if arch.placement != "pre":
        return f"{arch.name} is post-norm; precompute needs a pre-norm first layer"
    return None


def first_layer_rows(layer: nn.Module, arch: Arch, emb: torch.Tensor, parallel: bool,
                     qkv_index: torch.Tensor | None = None) -> torch.Tensor:
    """Embeddings [n, d] -> table rows [n, d + q + 2e] = [residual | q | k | v], pre-RoPE."""
    h = get_module(layer, arch.attn_norm)(emb)
    if arch.fused_qkv:
        qkv = get_module(layer, arch.q)(h)[..., qkv_index]
    else:
        qkv = torch.cat([get_module(layer, p)(h) for p in (arch.q, arch.k, arch.v)], dim=-1)
    residual = emb
    if parallel:  # x + attn(n1(x)) + ffn(n2(x)): the skip and the FFN depend on the token only
        ffn_in = get_module(layer, arch.mlp_norm)(emb) if arch.mlp_norm else h
        residual = emb + get_module(layer, arch.mlp)(ffn_in)
    return torch.cat([residual, qkv], dim=-1)


def encode_table(rows: torch.Tensor, table_dtype: str, widths: tuple[int, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [V, W] -> stored table (and for int8 a float32 scale per row and segment [V, 4])."""
    if table_dtype != "int8":
        return rows.to(TABLE_DTYPES[table_dtype]), None
    # One scale per segment: residual, q, k and v differ in magnitude by orders.
    pieces = rows.float().split(list(widths), dim=-1)
    scale = torch.stack([p.abs().amax(-1) for p in pieces], -1).clamp_min(1e-12) / 127
    codes = torch.cat([(p / s[:, None]).round().clamp(-127, 127)
                       for p, s in zip(pieces, scale.unbind(-1))], -1)
    return codes.to(torch.int8), scale


# ---------------------------------------------------------------------------------------------
# Runtime: the embedding hands the q|k|v part of its rows to layer 0's projections


def removed_paths(arch: Arch, parallel: bool) -> list[str]:
    """Modules of layer 0 that the table replaces (relative to the layer)."""
    paths = [arch.attn_norm] + ([arch.q] if arch.fused_qkv else [arch.q, arch.k, arch.v])
    if parallel:
        paths += ([arch.mlp_norm] if arch.mlp_norm else []) + [arch.mlp]
    return paths


# ---------------------------------------------------------------------------------------------
# The pass

def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def table_bytes(dims: Dims, table_dtype: str) -> int:
    scales = dims.vocab * len(dims.widths) * 4 if table_dtype == "int8" else 0
    return dims.vocab * dims.row * TABLE_DTYPES[table_dtype].itemsize + scales


def _check_growth(cfg: PrecomputeConfig, growth: float, detail: str) -> None:
    if cfg.max_growth is None or growth <= cfg.max_growth:
        return
    message = (f"precompute would grow the model by {growth:+.1%} ({detail}), beyond "
               f"max_growth={cfg.max_growth:g}: raise max_growth, store the table in a smaller "
               "table_dtype, or leave this pass out (docs/precompute.md says when it pays off)")
    if cfg.on_growth == "error":
        raise UsageError(message)
    warnings.warn(message, stacklevel=2)


@register(PrecomputeConfig)
def precompute(ctx: Context, cfg: PrecomputeConfig) -> PassReport:
    """Compute the table from layer 0's current weights and install the runtime first layer."""
    model, arch = ctx.model, ctx.arch
    problem = unsupported(arch)
    if problem:
        raise UsageError(f"precompute: {problem}")
    if "precompute" in structure(model):
        raise UsageError("precompute: the first layer of this model is already precomputed")
    dims = dims_of(model.config)
    accounting = precompute_accounting(model.config)
    embed = resolve_path(model, arch.embed)
    layer = decoder_layers(model, arch)[0]
    tied = resolve_path(model, arch.lm_head).weight is embed.weight
    head_in_table = (tied and not dims.parallel and cfg.head_from_table
                     and TABLE_DTYPES[cfg.table_dtype] == embed.weight.dtype)
    output_embedding = "table" if head_in_table else ("kept" if tied else "untied")
    removed = [t for p in removed_paths(arch, dims.parallel)
               for t in _module_tensors(get_module(layer, p))]
    layer0_bytes = _bytes(removed)
    head_kept = tied and not head_in_table
    removed_bytes = layer0_bytes + (0 if head_kept else _bytes([embed.weight]))
    new_bytes = table_bytes(dims, cfg.table_dtype)
    model_bytes = _bytes(model.state_dict(keep_vars=True).values())
    net = new_bytes - removed_bytes
    _check_growth(cfg, net / model_bytes,
                  f"table {new_bytes:,} B, removed {removed_bytes:,} B of {model_bytes:,} B")

    qkv_index = fused_columns(arch, dims).to(embed.weight.device) if arch.fused_qkv else None
    with torch.no_grad():
        rows = torch.cat([first_layer_rows(layer, arch, embed.weight[i:i + cfg.chunk],
                                           dims.parallel, qkv_index)
                          for i in range(0, dims.vocab, cfg.chunk)])
        table, scale = encode_table(rows, cfg.table_dtype, dims.widths)
        error = (decode_rows(table, scale, dims.widths, rows.dtype) - rows).abs()
        runtime = install_runtime(model, arch, dims, cfg.table_dtype, head_in_table)
        runtime.table.copy_(table)
        if scale is not None:
            runtime.table_scale.copy_(scale)
    if tied:  # the LM head reads the table or keeps the weight; nothing may re-tie it
        model.config.tie_word_embeddings = False
    structure(model)["precompute"] = {"table_dtype": cfg.table_dtype, "widths": list(dims.widths),
                                      "parallel": dims.parallel,
                                      "output_embedding": output_embedding}

    summary = {
        "table_dtype": cfg.table_dtype, "row_layout": "[residual | q | k | v] pre-RoPE",
        "widths": list(dims.widths), "parallel": dims.parallel,
        "output_embedding": output_embedding,
        "table_bytes": new_bytes, "weight_bytes_removed": removed_bytes,
        "net_bytes": net, "net_growth": net / model_bytes, "model_bytes_before": model_bytes,
        "table_max_abs_error": error.max().item(),
        "table_rel_rms_error": (error.pow(2).mean().sqrt() / rows.pow(2).mean().sqrt()).item(),
        "per_batch": _per_batch_bytes(dims, layer0_bytes, embed.weight.element_size(),
                                      new_bytes // dims.vocab, accounting),
        "accounting_values": {k: v for k, v in accounting.items() if k != "per_batch"},
    }
    return PassReport("precompute", summary=summary,
                      modules={f"{arch.layers}.0.{p}": {"replaced": True}
                               for p in removed_paths(arch, dims.parallel)})


def _per_batch_bytes(dims: Dims, layer0_bytes: int, embed_itemsize: int, row_bytes: int,
                     accounting: dict[str, Any]) -> dict[int, dict[str, float]]:
    """First-layer reads per token (bytes, as stored) and FLOPs saved, at each batch size."""
    out = {}
    for batch, values in accounting["per_batch"].items():
        before = layer0_bytes + batch * dims.d * embed_itemsize
        after = batch * row_bytes
        out[batch] = {"read_bytes_before": before, "read_bytes_after": after,
                      "read_reduction": before / after,
                      "read_bytes_saved_per_token": (before - after) / batch,
                      "flops_saved_per_token": values["flops_saved_per_token"]}
    return out
