"""First-layer precomputation at run time (Graef 2024): the table that replaces the token
embedding, the modules of layer 0 that read its columns, and their rebuild on load.
The pass that computes the table is compress/passes/precompute.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError, UsageError
from compress.models import ARCHES, Arch, arch_for, decoder_layers, resolve_path
from compress.runtime.modules import set_module

TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "int8": torch.int8}


# Model types whose layer 0 is laid out like a family in ARCHES apart from its FFN holding
# experts: used for accounting from a config only (no runtime support).
ACCOUNTING_ALIASES = {"mixtral": "mistral"}


@dataclass(frozen=True)
class Dims:
    """The numbers of a config that the trick depends on."""

    model_type: str
    d: int              # embedding width
    q: int              # query width (heads * head_dim; d for most models)
    e: int              # key/value width (kv_heads * head_dim)
    heads: int
    f: int              # FFN hidden width (per expert)
    vocab: int
    layers: int
    experts: int        # FFN experts per layer (1 for dense models)
    mlp_matrices: int   # 3 for gated FFNs (gate, up, down), 2 otherwise
    tied: bool          # the LM head shares the embedding
    parallel: bool      # attention and FFN read the same input

    @property
    def widths(self) -> tuple[int, int, int, int]:
        """Segments of a table row: residual, q, k, v."""
        return (self.d, self.q, self.e, self.e)

    @property
    def row(self) -> int:
        return sum(self.widths)


def dims_of(config, parallel: bool | None = None) -> Dims:
    """Read Dims from a transformers config; `parallel` overrides (for hypothetical models)."""
    model_type = getattr(config, "model_type", "")
    arch = ARCHES.get(ACCOUNTING_ALIASES.get(model_type, model_type))
    if arch is None:
        raise UsageError(f"precompute: no accounting for model type {model_type!r}; supported "
                         f"are {', '.join(sorted([*ARCHES, *ACCOUNTING_ALIASES]))}")
    if model_type in ARCHES:
        arch = arch_for(config)
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    f = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return Dims(model_type=model_type, d=d, q=heads * head_dim, e=kv_heads * head_dim,
                heads=heads, f=f, vocab=config.vocab_size, layers=config.num_hidden_layers,
                experts=experts or 1, mlp_matrices=len(arch.mlp_in) + 1,
                tied=bool(getattr(config, "tie_word_embeddings", False)),
                parallel=arch.parallel if parallel is None else parallel)


def fused_columns(arch: Arch, dims: Dims) -> torch.Tensor:
    """For each table q|k|v column, its index in the output of a fused qkv projection."""
    index = torch.arange(dims.q + 2 * dims.e)
    if arch.qkv_per_head:  # fused output is [q k v] per head: regroup as all q, all k, all v
        index = index.view(dims.heads, 3, dims.q // dims.heads).transpose(0, 1).reshape(-1)
    return index


def decode_rows(table: torch.Tensor, scale: torch.Tensor | None, widths: tuple[int, ...],
                dtype: torch.dtype) -> torch.Tensor:
    """Stored rows [..., W] (and their scales [..., 4]) -> rows in `dtype`."""
    if scale is None:
        return table.to(dtype)
    expanded = scale.repeat_interleave(torch.tensor(widths, device=scale.device), dim=-1)
    return (table.float() * expanded).to(dtype)


class RowHandoff:
    """The q|k|v part of the rows gathered in the current forward, for layer 0 to read.

    The model calls its embedding, then layer 0, in every forward (prefill and each decode
    step); the handoff carries what an nn.Embedding's output cannot (it must stay d wide).
    """

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.head: nn.Module | None = None  # an LM head whose weight views the table


class PrecomputedEmbedding(nn.Module):
    """Replaces the token embedding: gathers table rows, returns the residual [B, S, d]."""

    def __init__(self, vocab: int, widths: tuple[int, ...], table_dtype: str,
                 dtype: torch.dtype, handoff: RowHandoff):
        super().__init__()
        self.widths, self.table_dtype, self.handoff = tuple(widths), table_dtype, handoff
        self.register_buffer("table", torch.zeros(vocab, sum(widths),
                                                  dtype=TABLE_DTYPES[table_dtype]))
        self.register_buffer("table_scale", torch.ones(vocab, len(widths))
                             if table_dtype == "int8" else None)
        # follows model.to(dtype): the dtype the rows are handed out in
        self.register_buffer("out_dtype_probe", torch.empty(0, dtype=dtype), persistent=False)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> rows [..., W]."""
        scale = None if self.table_scale is None else self.table_scale[ids]
        return decode_rows(self.table[ids], scale, self.widths, self.out_dtype_probe.dtype)

    def share_head(self, head: nn.Module) -> None:
        """Make `head.weight` a view of the residual columns (they hold the embedding)."""
        # [V, d] with the row width as stride: BLAS reads it in place, no copy per forward
        head.weight = nn.Parameter(self.table[:, :self.widths[0]], requires_grad=False)
        self.handoff.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, S] -> residual [B, S, d]; q|k|v [B, S, q + 2e] to the handoff
        head = self.handoff.head
        if head is not None and head.weight.data_ptr() != self.table.data_ptr():
            self.share_head(head)  # model.to(device/dtype) copied the two apart: share again
        rows = self.rows(ids)
        d = self.widths[0]
        self.handoff.rows = rows[..., d:]
        return rows[..., :d].contiguous()

    def extra_repr(self) -> str:
        return f"vocab={self.table.shape[0]}, widths={self.widths}, table_dtype={self.table_dtype}"


class TableColumns(nn.Module):
    """Layer 0's q, k or v projection (or fused qkv): columns of the rows just gathered."""

    def __init__(self, handoff: RowHandoff, start: int, stop: int,
                 index: torch.Tensor | None = None):
        super().__init__()
        self.handoff, self.start, self.stop = handoff, start, stop
        self.register_buffer("index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, d], unused: what layer 0 computed from it is in the table
        rows = self.handoff.rows
        if rows is None or rows.shape[:-1] != x.shape[:-1]:
            raise CompressError("layer 0 of a precomputed model reads table rows: call the "
                                "model with input_ids, not inputs_embeds")
        if self.index is not None:
            return rows.index_select(-1, self.index)
        return rows[..., self.start:self.stop]

    def extra_repr(self) -> str:
        permuted = ", permuted" if self.index is not None else ""
        return f"columns={self.start}:{self.stop}{permuted}"


class FoldedFFN(nn.Module):
    """Layer 0's FFN in a parallel block: its output is already in the table's residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _set_path(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(resolve_path(model, parent), child, module)


def install_runtime(model: nn.Module, arch: Arch, dims: Dims, table_dtype: str,
                    head_in_table: bool = False) -> PrecomputedEmbedding:
    """Swap the embedding and layer 0's norm/projections (and FFN) for table readers.

    head_in_table: the LM head's weight becomes a view of the table's residual columns (a tied
    serial model whose table has the model's dtype: those columns are the embedding).
    """
    handoff = RowHandoff()
    dtype = next(model.parameters()).dtype
    embedding = PrecomputedEmbedding(dims.vocab, dims.widths, table_dtype, dtype, handoff)
    _set_path(model, arch.embed, embedding)
    if head_in_table:
        embedding.share_head(resolve_path(model, arch.lm_head))
    layer = decoder_layers(model, arch)[0]
    set_module(layer, arch.attn_norm, nn.Identity())
    q, e = dims.q, dims.e
    if arch.fused_qkv:
        # table column of each fused output column
        index = torch.argsort(fused_columns(arch, dims))
        set_module(layer, arch.q, TableColumns(handoff, 0, q + 2 * e, index))
    else:
        for path, start, stop in ((arch.q, 0, q), (arch.k, q, q + e), (arch.v, q + e, q + 2 * e)):
            set_module(layer, path, TableColumns(handoff, start, stop))
    if dims.parallel:
        if arch.mlp_norm:
            set_module(layer, arch.mlp_norm, nn.Identity())
        set_module(layer, arch.mlp, FoldedFFN())
    return embedding


def load_precompute(model: nn.Module, record: dict[str, Any]) -> None:
    """The "precompute" structure loader: rebuild the runtime before the weights are loaded."""
    arch = arch_for(model.config)
    dims = dims_of(model.config, parallel=record["parallel"])
    if list(dims.widths) != list(record["widths"]):
        raise CompressError(f"precompute: the artifact's table widths {record['widths']} do not "
                            f"match its config ({list(dims.widths)}); the artifact is corrupt")
    table_dtype, head_in_table = record["table_dtype"], record["output_embedding"] == "table"
    dtype = next(model.parameters()).dtype
    if head_in_table and TABLE_DTYPES[table_dtype] != dtype:
        # loaded in another dtype than it was saved in: the head must match the model
        table_dtype = {v: k for k, v in TABLE_DTYPES.items()}[dtype]
    install_runtime(model, arch, dims, table_dtype, head_in_table)


