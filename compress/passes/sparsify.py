"""sparsify: N:M semi-structured (2:4 by default) or unstructured pruning of the decoder's linears.

Methods: magnitude (|W|, no data), Wanda (|W| times the L2 norm of each input feature, Sun et al.
2023) and SparseGPT (prune by w^2 / [H^-1]_jj and update the remaining weights through the
inverse Hessian, Frantar and Alistarh 2023). Wanda and SparseGPT run on the layer-wise
calibrator, so layer i+1 is calibrated on the outputs of the pruned layer i.

The pass leaves zeros in the weights and records structure(model)["sparsity"] = {name: "2:4"};
a later quantize pass keeps them. When the artifact is written, 2:4 modules are converted to the
compressed 2:4 storage (compress.formats.sparse24) unless `storage: dense`.
"""

from __future__ import annotations

import re
from typing import Callable, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress import distributed
from compress.calib import check_finite
from compress.errors import CompressError, UsageError
from compress.formats.artifact import BEFORE_SAVE
from compress.formats.sparse24 import check_nm, fits_24
from compress.hessian import inverse_cholesky, prepare_hessian, serial_on_cpu
from compress.models import layers_path
from compress.passes.base import Context, PassConfig, PassReport, register
from compress.passes.quantize import note_unsplit_experts, target_linears
from compress.runtime.artifact import structure
from compress.runtime.modules import (
    QuantizedLinear,
    Sparse24Linear,
    Sparse24QuantizedLinear,
    get_module,
    set_module,
)

PATTERN = re.compile(r"^(\d+):(\d+)$")


class SparsifyConfig(PassConfig):
    """Pruning of the linears matching targets minus ignore (fnmatch globs or "re:<regex>")."""

    layerwise: ClassVar[bool] = True

    kind: Literal["sparsify"] = Field("sparsify", alias="pass")
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    # "N:M": at most N non-zeros in every M consecutive inputs; "unstructured": `sparsity` zeros
    # per output row.
    pattern: str = "2:4"
    sparsity: float | None = Field(None, gt=0, lt=1)
    targets: list[str] = ["*"]
    ignore: list[str] = ["lm_head"]
    # compressed: 2:4 layout in the artifact (needs a pattern that is also 2:4 sparse);
    # dense: zeros stored in place, loadable by any runtime. Default: compressed when possible.
    storage: Literal["compressed", "dense"] | None = None
    block_size: int = Field(128, ge=1)     # SparseGPT: columns updated together
    damp: float = Field(0.01, gt=0)        # SparseGPT: damping, fraction of mean diag(H)

    @model_validator(mode="after")
    def _check(self) -> "SparsifyConfig":
        n, m = self.nm()
        if self.pattern == "unstructured":
            if self.sparsity is None:
                raise ValueError("pattern unstructured needs sparsity: a fraction such as 0.5")
        elif self.sparsity is not None:
            raise ValueError(f"sparsity is only for pattern unstructured; {self.pattern} "
                             f"fixes it at {1 - n / m:g}")
        if self.storage == "compressed" and not self.fits_24():
            raise ValueError(f"storage compressed is the 2:4 layout; pattern {self.pattern} is "
                             "not 2:4 sparse: use storage: dense")
        if self.method == "sparsegpt" and m and self.block_size % m:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M={m}")
        return self

    def nm(self) -> tuple[int, int]:
        """(N, M) of an N:M pattern; (0, 0) for unstructured."""
        if self.pattern == "unstructured":
            return 0, 0
        match = PATTERN.match(self.pattern)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"pattern {self.pattern!r}: write N:M with 0 < N < M (e.g. 2:4) "
                             "or unstructured")
        return int(match[1]), int(match[2])

    def fits_24(self) -> bool:
        n, m = self.nm()
        return m > 0 and fits_24(n, m)

    def compressed(self) -> bool:
        return self.storage == "compressed" or (self.storage is None and self.fits_24())

    comes_before: ClassVar[tuple[str, ...]] = ("quantize",)
    order_rule: ClassVar[str] = ("must come before {later}: quantization keeps the zeros of a "
                                 "sparse model, but pruning would undo the quantized grid; move "
                                 "sparsify first")


# ---------------------------------------------------------------------------------------------
# The math: pure functions on [O, I] matrices

def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive inputs. [O, I] -> bool."""
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the round(sparsity * I) lowest scores of every output row (Wanda's per-output
    comparison group). [O, I] -> bool keep mask."""
    drop = round(sparsity * scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        keep.scatter_(1, scores.topk(drop, dim=1, largest=False).indices, False)
    return keep


def select_mask(scores: torch.Tensor, n: int, m: int, sparsity: float | None) -> torch.Tensor:
    return unstructured_mask(scores, sparsity) if m == 0 else nm_mask(scores, n, m)


def wanda_scores(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2. w: [O, I]; x_norm: [I] the L2 norm of each input feature."""
    return w.abs() * x_norm.unsqueeze(0)


@serial_on_cpu
def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor, n: int, m: int,
                    sparsity: float | None = None, block_size: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """SparseGPT: prune w [O, I] to N:M (m > 0) or to `sparsity` (m == 0), choosing by
    w^2 / [H^-1]_jj^2 and compensating each pruned column on the later ones through the
    Cholesky factor of H^-1 (Frantar and Alistarh 2023, Algorithm 1). H: [I, I]. Returns the
    pruned float32 weight."""
    H, W = prepare_hessian(H.float(), w.float())
    U, _ = inverse_cholesky(H, damp, overwrite=True)   # H is prepare_hessian's copy
    del H
    # Work on W^T [I, O] (columns as contiguous rows); buffers follow W's device; no host sync.
    Wt = W.T.contiguous()
    columns = Wt.shape[0]
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2].contiguous()   # U is a transpose view
        Err1 = torch.empty_like(W1)
        d = torch.diag(U1)
        if m == 0:  # unstructured: one threshold over the block (the paper's adaptive mask)
            pruned = ~unstructured_block(W1.T ** 2 / d ** 2, sparsity).T
        else:
            pruned = torch.empty_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if m and i % m == 0:  # choose the N:M mask of the next m columns, updated so far
                scores = W1[i:i + m].T ** 2 / d[i:i + m] ** 2
                pruned[i:i + m] = ~nm_mask(scores, n, m).T
            err = torch.div(W1[i] * pruned[i], U1[i, i], out=Err1[i])  # (w - q) / d
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)  # W[:, i:] -= err * Hinv[i, i:]
            W1[i].masked_fill_(pruned[i], 0)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)   # lazy update of later blocks
    return Wt.T


def unstructured_block(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask dropping the `sparsity` fraction of lowest scores of the whole block."""
    drop = int(scores.numel() * sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if drop:
        keep[scores.flatten().topk(drop, largest=False).indices] = False
    return keep.reshape(scores.shape)


def verify(w: torch.Tensor, pattern: str, name: str) -> None:
    """Raise CompressError unless w [O, I] follows an N:M pattern (unstructured: nothing to check)."""
    match = PATTERN.match(pattern)
    if match:
        check_nm(w, int(match[1]), int(match[2]), name)


def layer_stats(w_old: torch.Tensor, w_new: torch.Tensor) -> dict[str, float]:
    return {"sparsity": float((w_new == 0).float().mean()),
            "rel_error": float((w_old.float() - w_new.float()).norm() / w_old.float().norm())}


# ---------------------------------------------------------------------------------------------
# The pass

def _prune(name: str, linear: nn.Linear, cfg: SparsifyConfig, stat: torch.Tensor | None) -> dict:
    """Prune one linear in place; stat is x_norm [I] (Wanda) or H [I, I] (SparseGPT)."""
    new, stats = _pruned(name, linear.weight.data, cfg, stat)
    _set_pruned(name, linear, cfg, new)
    return stats


def _set_pruned(name: str, linear: nn.Linear, cfg: SparsifyConfig, new: torch.Tensor) -> None:
    linear.weight.data = new.to(linear.weight.dtype)
    verify(linear.weight.data, cfg.pattern, name)


def _pruned(name: str, w: torch.Tensor, cfg: SparsifyConfig, stat: torch.Tensor | None
            ) -> tuple[torch.Tensor, dict]:
    """The pruned weight of one linear, and its statistics for the report."""
    n, m = cfg.nm()
    check_finite(name, w)
    method = cfg.method if stat is not None else "magnitude"
    if method == "sparsegpt":
        try:
            new = sparsegpt_prune(w, stat, n, m, cfg.sparsity, cfg.block_size, cfg.damp)
        except CompressError as exc:
            raise CompressError(f"{name}: {exc}") from None
    else:
        scores = w.abs() if method == "magnitude" else wanda_scores(w.float(), stat)
        new = w * select_mask(scores, n, m, cfg.sparsity)
    check_finite(name, new, "pruned weight")
    stats = layer_stats(w, new)
    if method != cfg.method:
        stats["note"] = "no calibration token reached it: magnitude"
    return new, stats


def _check_targets(linears: dict[str, nn.Linear], cfg: SparsifyConfig, prefix: str) -> None:
    n, m = cfg.nm()
    for name, linear in linears.items():
        in_features = linear.in_features
        if m and in_features % m:
            raise UsageError(f"sparsify: {name} has {in_features} inputs, not a multiple of "
                             f"M={m}; ignore it or choose another pattern")
        if cfg.compressed() and in_features % 8:
            raise UsageError(f"sparsify: {name} has {in_features} inputs; 2:4 storage needs a "
                             "multiple of 8: ignore it or set storage: dense")
        if cfg.method != "magnitude" and not name.startswith(prefix):
            raise UsageError(f"sparsify: {name} is outside the decoder layers, which "
                             f"{cfg.method} calibrates one by one: ignore it or use magnitude")


def _input_stats(step, local: dict[str, nn.Linear], groups: list[tuple[str, ...]],
                 method: str) -> dict[str, torch.Tensor]:
    """Per local linear name: x_norm [I] (wanda) or the Hessian [I, I] (sparsegpt), computed
    once per group of projections that read the same input. None for a linear no calibration
    token reached (an MoE expert the router never picked): it is pruned by magnitude."""
    reader = {name: next((g[0] for g in groups if name in g), name) for name in local}
    readers = sorted(set(reader.values()))
    stats, _ = step.gather(readers, gram=method == "sparsegpt", mean_square=method == "wanda")
    if method == "sparsegpt":   # one H per group, made in place from its Gram matrix
        hessians = {r: stats[r].take_hessian() for r in readers if stats[r].count}
        return {name: hessians.get(reader[name]) for name in local}
    # sqrt(mean x^2) is ||X_j|| up to a constant factor, which does not change the mask
    return {name: stats[reader[name]].mean_square.sqrt() if stats[reader[name]].count else None
            for name in local}


@register(SparsifyConfig)
def sparsify(ctx: Context, cfg: SparsifyConfig) -> PassReport:
    report = PassReport("sparsify", summary={"method": cfg.method, "pattern": cfg.pattern,
                                             "storage": "compressed" if cfg.compressed()
                                             else "dense"})
    linears = target_linears(ctx.model, cfg.targets, cfg.ignore)
    if not linears:
        raise UsageError(f"sparsify: no Linear layer matches targets {cfg.targets} minus ignore "
                         f"{cfg.ignore}")
    prefix = ctx.arch.layers + "."
    _check_targets(linears, cfg, prefix)
    # marked first: a streamed run records the structure with each layer it writes
    record(ctx.model, {name: cfg.pattern for name in linears}, cfg.compressed())
    if cfg.method == "magnitude":
        # layer by layer (each read and written in turn when the run streams), then the rest
        for _, layer_name, _ in ctx.layers():
            for name in [n for n in linears if n.startswith(layer_name + ".")]:
                report.modules[name] = _prune(name, linears[name], cfg, None)
        inside = layers_path(ctx.model, ctx.arch) + "."
        for name in [n for n in linears if not n.startswith(inside)]:
            report.modules[name] = _prune(name, linears[name], cfg, None)
    else:
        last = max(int(name[len(prefix):].split(".")[0]) for name in linears)
        for step in ctx.calibrator():
            local = {name[len(step.name) + 1:]: linear for name, linear in linears.items()
                     if name.startswith(step.name + ".")}
            if local:
                groups = (ctx.arch.linear_groups() if ctx.arch.known
                          else step.input_groups(list(local))[0])
                stats = _input_stats(step, local, groups, cfg.method)
                names = {short: f"{step.name}.{short}" for short in local}
                # several ranks: each module is pruned on one, every rank gets every result
                # (the cost: SparseGPT's sequential columns)
                pruned = distributed.spread(
                    [lambda name=names[s], w=linear.weight.data, stat=stats[s]:
                     _pruned(name, w, cfg, stat) for s, linear in local.items()],
                    [linear.in_features for linear in local.values()])
                for (short, linear), (new, module_stats) in zip(local.items(), pruned):
                    _set_pruned(names[short], linear, cfg, new)
                    report.modules[names[short]] = module_stats
            if step.index == last and ctx.store is None:
                step.layer.to("cpu")  # later layers are unchanged: no need to run them
                break   # (a streamed run passes them on: each is written in its turn)
    values = [m["sparsity"] for m in report.modules.values()]
    errors = [m["rel_error"] for m in report.modules.values()]
    report.summary.update(modules=len(linears), mean_sparsity=sum(values) / len(values),
                          mean_rel_error=sum(errors) / len(errors))
    note_unsplit_experts(ctx.model, report)
    return report


# ---------------------------------------------------------------------------------------------
# Structure: the marker other passes read, 2:4 storage on save, and its rebuild on load

def record(model: nn.Module, patterns: dict[str, str], compressed: bool) -> None:
    """Mark modules as sparse (the cross-pass contract) and queue 2:4 storage for them. The
    queue lives in the structure record, so a streamed run that is interrupted resumes it."""
    structure(model).setdefault("sparsity", {}).update(patterns)
    pending = set(structure(model).get(PENDING, []))
    pending = (pending | set(patterns)) if compressed else (pending - set(patterns))
    structure(model)[PENDING] = sorted(pending)
    if not pending:
        del structure(model)[PENDING]


# modules queued for 2:4 storage, converted when the last pass writes them (finalize_sparse)
PENDING = "sparse24_pending"


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight a sparse-marked module computes with, whatever module holds it now."""
    if isinstance(module, Sparse24Linear):
        return module.dense_weight()
    if isinstance(module, QuantizedLinear):
        return module.dequantized_weight()
    return module.weight.data


def finalize_sparse(model: nn.Module, include: Callable[[str], bool] = lambda name: True
                    ) -> None:
    """Before save: verify every sparse-marked module's pattern, then convert the 2:4 ones that
    asked for compressed storage. The in-memory model then computes with what is written.
    include: the modules to handle now (a streamed run converts each decoder layer as its last
    pass writes it, Context.close_layer, and the rest when the artifact is saved)."""
    record_ = structure(model)
    for name, pattern in record_.get("sparsity", {}).items():
        if include(name):
            verify(dense_weight(get_module(model, name)), pattern, name)
    storage = record_.setdefault("sparse24", {})
    pending = record_.get(PENDING, [])
    for name in [n for n in pending if include(n)]:
        module = get_module(model, name)
        if isinstance(module, (Sparse24Linear, Sparse24QuantizedLinear)):
            continue
        if isinstance(module, QuantizedLinear):
            sparse = Sparse24QuantizedLinear.from_quantized_module(module, name)
            storage[name] = {"format": module.fmt.model_dump()}
        elif isinstance(module, nn.Linear):
            sparse = Sparse24Linear.from_linear(module, name)
            storage[name] = {"values_dtype": str(sparse.weight_values.dtype).removeprefix("torch.")}
        else:
            raise CompressError(f"{name}: marked 2:4 but is a {type(module).__name__}, which "
                                "2:4 storage cannot hold; use storage: dense")
        set_module(model, name, sparse)
    if not storage:
        del record_["sparse24"]
    left = [n for n in pending if not include(n)]
    if left:
        record_[PENDING] = left
    else:
        record_.pop(PENDING, None)


BEFORE_SAVE.append(finalize_sparse)
