"""rmsnorm: Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm (Jiang et al. 2023, arXiv 2305.14858), and
norm-weight folding (FlashNorm) for models already on RMSNorm. Exact: logits do not change.

Why it works. In a Pre-LN transformer every LayerNorm reads the residual stream x and first
subtracts its mean, so the mean is never used. Make every vector that is added into the stream
zero-mean once, offline (embedding rows, position rows, and each linear that writes into the
stream: W <- (I - 11^T/d) W, b <- b - mean(b)); then x is zero-mean, LayerNorm(x) equals
RMSNorm(x) with the same eps, and the LayerNorm's gamma/beta fold into the linears that read it:
W (gamma * n + beta) + b = (W diag(gamma)) n + (W beta + b). A zero-mean x is determined by its
first d-1 entries, so it can be stored with one dimension fewer (CRMSNorm, see docs/rmsnorm.md).
For RMSNorm models only the folding applies: W diag(w), norm weight -> 1 (FlashNorm).

The math is in the short pure functions below (weights as [out, in]); `rmsnorm()` walks the
Arch table (norm_readers, stream_writers, embeddings) once for every family.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress.errors import UsageError
from compress.models import Arch, decoder_layers
from compress.passes.base import Context, PassConfig, PassReport, register
from compress.runtime.artifact import structure
from compress.runtime.modules import get_module, set_module
from compress.runtime.norms import CRMSNorm, crms_norm, norm_module, sync_shape_attrs  # noqa: F401


class RMSNormConfig(PassConfig):
    """mode: auto (rmsnorm for LayerNorm models, fold for RMSNorm models), rmsnorm, crmsnorm,
    fold. untie: with tied embeddings, fold the final norm into an untied lm_head (costs
    vocab x hidden parameters); by default the final norm keeps its weight and the tie stays."""

    needs_family: ClassVar[bool] = True   # the attention/MLP layout of the Arch table

    @classmethod
    def family_problem(cls, arch: Arch) -> str | None:
        try:
            resolve_mode(arch, "auto")
        except UsageError as exc:
            return str(exc)
        return None

    kind: Literal["rmsnorm"] = Field("rmsnorm", alias="pass")
    mode: Literal["auto", "rmsnorm", "crmsnorm", "fold"] = "auto"
    untie: bool = False

    exact: ClassVar[bool] = True
    # After these the weights no longer hold what this pass must rewrite exactly (packed
    # codes, sparsity zeros that centring would fill in).
    comes_before: ClassVar[tuple[str, ...]] = ("quantize", "sparsify")
    order_rule: ClassVar[str] = ("must run before {later} (it rewrites the float weights "
                                 "exactly): move it earlier in the recipe")


# ---------------------------------------------------------------------------------------------
# Pure math: weights are [out, in] (Conv1D callers transpose), vectors float64 for exactness.

def center_rows(w: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean over the last dim. w: [..., D] (embedding rows)."""
    return w - w.mean(-1, keepdim=True)


Pair = tuple[torch.Tensor, torch.Tensor | None]  # (weight [out, in], bias [out] or None)


def center_outputs(w: torch.Tensor, b: torch.Tensor | None) -> Pair:
    """A stream writer made zero-mean: (I - 11^T/d) W and b - mean(b). w: [D, I], b: [D]."""
    return w - w.mean(0, keepdim=True), (None if b is None else b - b.mean())


def fold_norm_into_linear(w: torch.Tensor, b: torch.Tensor | None, gamma: torch.Tensor | None,
                          beta: torch.Tensor | None) -> Pair:
    """W (gamma * n + beta) + b == W' n + b' with W' = W diag(gamma), b' = W beta + b.
    w: [O, D], b: [O], gamma, beta: [D]."""
    new_b = b
    if beta is not None:
        new_b = w @ beta + (0 if b is None else b)
    return (w if gamma is None else w * gamma), new_b


def compress_writer(w: torch.Tensor, b: torch.Tensor | None) -> Pair:
    """A zero-mean writer keeps its first d-1 outputs (the last is minus their sum). w: [D, I]."""
    return w[:-1], (None if b is None else b[:-1])


def compress_reader(w: torch.Tensor) -> torch.Tensor:
    """A reader of a zero-mean d-vector stored as its first d-1 entries x':
    W x = W[:, :d-1] x' + W[:, d-1] (-sum x') = (W[:, :d-1] - W[:, d-1:]) x'. w: [O, D]."""
    return w[:, :-1] - w[:, -1:]


# ---------------------------------------------------------------------------------------------
# Module access: every linear as [out, in], whatever its storage.

def get_oi(module: nn.Module) -> Pair:
    """Weight [out, in] and bias of a Linear or GPT-2 Conv1D (weight stored [in, out]), float64."""
    w = module.weight.detach().double()
    b = None if getattr(module, "bias", None) is None else module.bias.detach().double()
    return (w.T if isinstance(module, Conv1D) else w), b


def set_oi(module: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Write weight [out, in] and bias back in the module's dtype and layout (shapes may shrink).
    Returns True when a bias was added to a module that had none."""
    dtype = module.weight.dtype
    module.weight = nn.Parameter((w.T if isinstance(module, Conv1D) else w).to(dtype).contiguous(),
                                 requires_grad=False)
    added = b is not None and getattr(module, "bias", None) is None
    if b is not None:
        module.bias = nn.Parameter(b.to(dtype).contiguous(), requires_grad=False)
    sync_shape_attrs(module)
    return added


def norm_affine(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    gamma = getattr(norm, "weight", None)
    beta = getattr(norm, "bias", None)
    return (None if gamma is None else gamma.detach().double(),
            None if beta is None else beta.detach().double())


# ---------------------------------------------------------------------------------------------
# The plan: which modules, by full name, from the Arch table

def _full(model: nn.Module, path: str) -> str:
    """The module name of an Arch path from the model root (base-model prefix when needed)."""
    try:
        model.get_submodule(path)
        return path
    except AttributeError:
        prefix = getattr(model, "base_model_prefix", "")
        model.get_submodule(f"{prefix}.{path}")
        return f"{prefix}.{path}"


def norm_plan(model: nn.Module, arch: Arch) -> list[tuple[str, list[str]]]:
    """Every norm that reads the stream (final norm last) with the linears reading its output."""
    base = _full(model, arch.layers)
    plan = []
    for i in range(len(decoder_layers(model, arch))):
        for norm, readers in arch.norm_readers():
            plan.append((f"{base}.{i}.{norm}", [f"{base}.{i}.{r}" for r in readers]))
    if arch.final_norm is not None and arch.lm_head is not None:
        plan.append((_full(model, arch.final_norm), [_full(model, arch.lm_head)]))
    return plan


def writer_names(model: nn.Module, arch: Arch) -> list[str]:
    base = _full(model, arch.layers)
    return [f"{base}.{i}.{w}" for i in range(len(decoder_layers(model, arch)))
            for w in arch.stream_writers()]


def embedding_names(model: nn.Module, arch: Arch) -> tuple[list[str], list[str]]:
    """(tables added into the stream: tokens, positions; norms applied to the embedding sum)."""
    tables, norms = [_full(model, arch.embed)], []
    for path in arch.extra_embeds:
        module = get_module(model, _full(model, path))
        if isinstance(module, nn.LayerNorm):
            norms.append(_full(model, path))
        elif isinstance(module, nn.Embedding):
            tables.append(_full(model, path))
    return tables, norms


def is_tied(model: nn.Module, arch: Arch) -> bool:
    if arch.lm_head is None:
        return False
    head = get_module(model, _full(model, arch.lm_head)).weight
    return head.data_ptr() == get_module(model, _full(model, arch.embed)).weight.data_ptr()


def untie(model: nn.Module, arch: Arch) -> int:
    """Give lm_head its own copy of the embedding; returns the parameters this adds."""
    head = get_module(model, _full(model, arch.lm_head))
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    return head.weight.numel()


# ---------------------------------------------------------------------------------------------
# The pass

def resolve_mode(arch: Arch, mode: str) -> str:
    if arch.placement != "pre":
        raise UsageError(f"rmsnorm: {arch.name} places its norms after the residual add "
                         "(post-LN); only pre-LN models can be converted exactly")
    if mode == "auto":
        return "rmsnorm" if arch.norm == "layer" else "fold"
    if arch.norm == "rms" and mode == "crmsnorm":
        raise UsageError(f"rmsnorm: mode crmsnorm needs a zero-mean residual stream, which "
                         f"only a LayerNorm model gives ({arch.name} uses RMSNorm): use mode fold")
    if arch.norm == "layer" and mode == "fold":
        raise UsageError(f"rmsnorm: {arch.name} uses LayerNorm: use mode rmsnorm (it recentres "
                         "and folds), not fold")
    return mode


def _check_float_linears(model: nn.Module, arch: Arch) -> None:
    names = [r for _, readers in norm_plan(model, arch) for r in readers]
    for name in names + writer_names(model, arch):
        module = get_module(model, name)
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise UsageError(f"rmsnorm: {name} is a {type(module).__name__}, not a float "
                             "Linear (already quantized?): run rmsnorm on the float model, "
                             "before quantize")


def _check_supported(model: nn.Module, arch: Arch) -> None:
    """Layouts the table does not describe: refuse them rather than convert them wrongly."""
    config = model.config
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        raise UsageError("rmsnorm: this BLOOM adds the normed input to the residual "
                         "(apply_residual_connection_post_layernorm): not a pre-LN block")
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise UsageError("rmsnorm: BLOOM with slow_but_exact tensor-parallel slicing is not "
                         "supported: set slow_but_exact false")
    decoder = getattr(getattr(model, "model", None), "decoder", None)
    if getattr(decoder, "project_in", None) is not None:
        raise UsageError("rmsnorm: OPT with word_embed_proj_dim != hidden_size (project_in/out) "
                         "is not supported")
    if arch.final_norm is not None:
        try:
            _full(model, arch.final_norm)
        except AttributeError:
            raise UsageError(f"rmsnorm: {arch.name} model has no final norm before the LM head, "
                             "so the head reads the raw stream and recentring would change "
                             "the logits") from None


@register(RMSNormConfig)
def rmsnorm(ctx: Context, cfg: RMSNormConfig) -> PassReport:
    mode = resolve_mode(ctx.arch, cfg.mode)
    report = PassReport("rmsnorm", summary={"mode": mode})
    _check_supported(ctx.model, ctx.arch)  # before any change: all or nothing
    _check_float_linears(ctx.model, ctx.arch)
    if mode == "fold":
        record = fold_rms(ctx.model, ctx.arch, cfg.untie, report)
    else:
        record = recentre(ctx.model, ctx.arch, report, compress_stream=mode == "crmsnorm")
    if record is None:
        report.summary["changed"] = False
        return report
    report.summary["changed"] = True
    structure(ctx.model)["rmsnorm"] = record
    return report


def fold_rms(model: nn.Module, arch: Arch, untie_head: bool, report: PassReport) -> dict | None:
    """FlashNorm: RMSNorm weights into the next linears; the norms keep a weight of ones, so
    the result is still a plain transformers model."""
    plan = norm_plan(model, arch)
    tied = is_tied(model, arch)
    if tied and not untie_head and arch.final_norm is not None:
        plan = plan[:-1]
        cost = get_module(model, _full(model, arch.embed)).weight.numel()
        report.summary["final_norm"] = ("kept: lm_head is tied to the embedding (untie: true "
                                        f"folds it at the cost of {cost} parameters)")
    plan = [(n, r) for n, r in plan if not torch.all(get_module(model, n).weight == 1)]
    if not plan:
        report.summary["note"] = "nothing to fold: every norm weight is already 1"
        return None
    if tied and any(n == _full(model, arch.final_norm) for n, _ in plan):
        report.summary["untied_params"] = untie(model, arch)
    for norm_name, readers in plan:
        norm = get_module(model, norm_name)
        gamma = norm.weight.detach().double()
        for name in readers:
            linear = get_module(model, name)
            set_oi(linear, *fold_norm_into_linear(*get_oi(linear), gamma, None))
        with torch.no_grad():
            norm.weight.fill_(1.0)
        report.modules[norm_name] = {"folded_into": readers}
    report.summary["norms_folded"] = len(plan)
    return {"mode": "fold", "untied": "untied_params" in report.summary}


def recentre(model: nn.Module, arch: Arch, report: PassReport,
             compress_stream: bool) -> dict | None:
    """Pre-LN -> Pre-RMSNorm (and, with compress_stream, Pre-CRMSNorm) in place."""
    plan = norm_plan(model, arch)
    if not isinstance(get_module(model, plan[0][0]), nn.LayerNorm):
        report.summary["note"] = ("nothing to convert: the norms are not LayerNorm (already "
                                  "converted?)")
        return None
    record: dict[str, Any] = {"mode": "crmsnorm" if compress_stream else "rmsnorm",
                              "norms": {}, "identity": [], "biases": {}, "shapes": {}}
    if is_tied(model, arch):
        # The embedding rows are recentred but the head must see the original ones.
        record["untied"] = True
        report.summary["untied_params"] = untie(model, arch)
    tables, embed_norms = embedding_names(model, arch)
    _recentre_embeddings(model, tables, embed_norms, record)
    writers = writer_names(model, arch)
    for name in writers:
        module = get_module(model, name)
        set_oi(module, *center_outputs(*get_oi(module)))
    dim = model.config.hidden_size
    for norm_name, readers in plan:
        norm = get_module(model, norm_name)
        gamma, beta = norm_affine(norm)
        for name in readers:
            linear = get_module(model, name)
            if set_oi(linear, *fold_norm_into_linear(*get_oi(linear), gamma, beta)):
                record["biases"][name] = linear.weight.shape[0]
        record["norms"][norm_name] = {"dim": dim, "eps": norm.eps}
        set_module(model, norm_name, norm_module(dim, norm.eps, compress_stream))
        report.modules[norm_name] = {"folded_into": readers}
    if compress_stream:
        _compress(model, tables, writers, [r for _, readers in plan for r in readers], record)
    report.summary.update(norms=len(plan), writers_centred=len(writers),
                          embeddings_centred=tables, biases_added=sorted(record["biases"]))
    return record


def _recentre_embeddings(model: nn.Module, tables: list[str], embed_norms: list[str],
                         record: dict) -> None:
    """Zero-mean embedding rows. An embedding LayerNorm (BLOOM) is a per-token function of the
    token table alone (no positions are added before it), so its output is baked into the
    table and the norm becomes the identity."""
    if embed_norms:
        assert len(tables) == 1, "an embedding norm after position tables is not supported"
        table = get_module(model, tables[0])
        with torch.no_grad():
            for name in embed_norms:
                table.weight.copy_(get_module(model, name)(table.weight))
                set_module(model, name, nn.Identity())
                record["identity"].append(name)
    for name in tables:
        table = get_module(model, name)
        with torch.no_grad():
            table.weight.copy_(center_rows(table.weight.double()).to(table.weight.dtype))


def _compress(model: nn.Module, tables: list[str], writers: list[str], readers: list[str],
              record: dict) -> None:
    """Store the zero-mean stream in d-1 values: tables and writers drop their last output,
    readers absorb it (compress_reader)."""
    for name in tables:
        table = get_module(model, name)
        table.weight = nn.Parameter(table.weight.detach()[:, :-1].contiguous(),
                                    requires_grad=False)
        sync_shape_attrs(table)
    for name in writers:
        module = get_module(model, name)
        set_oi(module, *compress_writer(*get_oi(module)))
    for name in readers:
        module = get_module(model, name)
        w, b = get_oi(module)
        set_oi(module, compress_reader(w), b)
    for name in tables + writers + readers:
        module = get_module(model, name)
        for pname, param in module.named_parameters(recurse=False):
            record["shapes"][f"{name}.{pname}"] = list(param.shape)


# ---------------------------------------------------------------------------------------------
# Loading an artifact: rebuild the norm modules, added biases and compressed shapes


