"""Pre-CRMSNorm at run time (Jiang et al. 2023): the weightless norm of a residual stream stored
in d-1 values, and the rebuild of a converted model's norms and shapes on load."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress.runtime.modules import (
    QuantizedLinear,
    Sparse24Linear,
    activation_like,
    get_module,
    set_module,
)


def crms_norm(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """RMSNorm of the zero-mean dim-vector whose first dim-1 entries are x: [..., dim-1]."""
    total = x.sum(-1, keepdim=True)
    mean_square = (x.pow(2).sum(-1, keepdim=True) + total.pow(2)) / dim
    return x * torch.rsqrt(mean_square + eps)


class CRMSNorm(nn.Module):
    """Weightless RMSNorm of a compressed zero-mean vector (the stream stored in dim-1 values)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim-1]; statistics in float32 like the models' own norms
        return crms_norm(x.float(), self.dim, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim} (stored {self.dim - 1}), eps={self.eps}"


def sync_shape_attrs(module: nn.Module) -> None:
    """Keep in/out feature counts consistent with a (possibly resized) weight."""
    shape = tuple(module.weight.shape)
    if isinstance(module, Conv1D):
        module.nx, module.nf = shape
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = shape


def norm_module(dim: int, eps: float, compressed: bool) -> nn.Module:
    if compressed:
        return CRMSNorm(dim, eps)
    return nn.RMSNorm(dim, eps=eps, elementwise_affine=False)


def load_rmsnorm(model: nn.Module, record: dict) -> None:
    """The "rmsnorm" structure loader: reshape a freshly built model before weights load."""
    if record.get("untied"):
        model.config.tie_word_embeddings = False
    compressed = record["mode"] == "crmsnorm"
    for name, spec in record.get("norms", {}).items():
        set_module(model, name, norm_module(spec["dim"], spec["eps"], compressed))
    for name in record.get("identity", []):
        set_module(model, name, nn.Identity())
    for name, out in record.get("biases", {}).items():
        module = get_module(model, name)
        module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype),
                                   requires_grad=False)
    for key, shape in record.get("shapes", {}).items():
        name, _, pname = key.rpartition(".")
        module = get_module(model, name)
        dtype = getattr(module, pname).dtype
        setattr(module, pname, nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False))
        sync_shape_attrs(module)


def fuse_rmsnorms(model: nn.Module) -> int:
    """Run every RMSNorm of the model that computes weight * (x / rms(x)) through the one-pass
    Triton kernel (compress/kernels/rmsnorm.py) where kernels run (CUDA): transformers' norm is
    ~6 small kernels a call, ~65 calls a decode step of an 8B model. Also the rmsnorm pass's
    weightless RMSNorms and CRMSNorms (nine kernels a call eager). Which norms qualify is
    checked on a random row, not read from class names (Gemma's (1 + weight) norm fails the
    check and stays as it is). Patches the instances' forward; the state dict is unchanged.
    Returns how many norms now run fused."""
    from compress.kernels.rmsnorm import add_rmsnorm
    from compress.runtime.modules import kernel_unavailable

    reference = activation_like(model)
    fused = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if (not type(module).__name__.endswith("RMSNorm") or not isinstance(eps, float)
                or getattr(module, "fused_rmsnorm", False)):
            continue
        crms_dim = module.dim if isinstance(module, CRMSNorm) else None
        if isinstance(weight, torch.Tensor):
            if weight.dim() != 1:
                continue
            width, like = weight.numel(), weight
        elif weight is None and reference is not None and (
                crms_dim or len(getattr(module, "normalized_shape", ())) == 1):
            width, like = (crms_dim - 1 if crms_dim else module.normalized_shape[0]), reference
        else:
            continue
        x = torch.randn(4, width, device=like.device, dtype=like.dtype)
        if kernel_unavailable(x) is not None:
            continue
        with torch.no_grad():
            want, got = module(x), add_rmsnorm(x, None, weight, eps, crms_dim)[0]
        if want.shape != got.shape or not torch.allclose(want.float(), got.float(), rtol=1e-2,
                                                         atol=1e-2):
            continue
        module.forward = _fused_forward.__get__(module)
        module.fused_rmsnorm, module.fused_crms_dim = True, crms_dim
        fused += 1
    return fused


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from compress.kernels.rmsnorm import add_rmsnorm
    from compress.runtime.modules import kernel_unavailable

    if kernel_unavailable(x) is not None:   # moved to the CPU since: the module's own forward
        return type(self).forward(self, x)
    weight, eps, crms_dim = _norm_arguments(self)
    return add_rmsnorm(x, None, weight, eps, crms_dim)[0]


def fuse_residual_norms(model: nn.Module) -> int:
    """Fold each decoder layer's attention residual add into its post-attention norm: the
    kernel's residual input (compress/kernels/rmsnorm.py) makes the add and the norm one launch
    where the layer runs two, 32 fewer a decode step of an 8B model, and the stream is read
    once. A layer qualifies when its post_attention_layernorm runs fused (call fuse_rmsnorms
    first) and its forward computes h + mlp(post(h + attn(inp(h)))), handing the attention its
    arguments unchanged: checked with the attention and the MLP stood in for by probes (Gemma,
    which norms the sublayers' outputs before adding them, fails it and keeps its forward).
    The MLP's add goes into down_proj's matmul where down_proj is compressed and the MLP
    returns its output unchanged (checked): at one row, the stream is a bias of the kernel's
    epilogue (modules.dispatch_linear), 32 launches fewer again. (Folding it into the next
    layer's input norm instead would change what a layer hands the next, which the model's
    layer loop and output_hidden_states read.) Patches the layers' forward; weights and state
    dict unchanged. Returns how many layers now run it."""
    fused = 0
    like = activation_like(model)   # what the probes run in
    for layer in model.modules():
        norm = getattr(layer, "post_attention_layernorm", None)
        if (not getattr(norm, "fused_rmsnorm", False) or "forward" in layer.__dict__
                or not all(isinstance(getattr(layer, n, None), nn.Module)
                           for n in ("input_layernorm", "self_attn", "mlp"))):
            continue
        defaults = _adds_around_norm(layer, like)
        if defaults is None:
            continue
        layer.fused_residual_defaults = defaults
        layer.fused_residual_mlp = _returns_down_proj(layer.mlp, like)
        layer.forward = _residual_fused_forward.__get__(layer)
        layer.fused_residual = True
        fused += 1
    return fused


def _residual_fused_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    from compress.kernels.rmsnorm import add_rmsnorm
    from compress.runtime.modules import kernel_unavailable

    norm = self.post_attention_layernorm
    if (args or self.training or not getattr(norm, "fused_rmsnorm", False)
            or kernel_unavailable(hidden_states) is not None):   # (training: dropout, Phi-3's)
        return type(self).forward(self, hidden_states, *args, **kwargs)
    # the attention gets every named argument of the layer's forward, defaults included, as
    # transformers' layers pass them (checked by _adds_around_norm)
    out = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                         **{**self.fused_residual_defaults, **kwargs})
    attn = out[0] if isinstance(out, tuple) else out
    if attn.shape != hidden_states.shape or attn.dtype != hidden_states.dtype:
        hidden = hidden_states + attn      # the kernel adds two rows of one dtype
        return hidden + self.mlp(norm(hidden))
    weight, eps, crms_dim = _norm_arguments(norm)
    normed, hidden = add_rmsnorm(attn, hidden_states, weight, eps, crms_dim)
    down = getattr(self.mlp, "down_proj", None)
    if not (self.fused_residual_mlp and isinstance(down, (QuantizedLinear, Sparse24Linear))):
        return hidden + self.mlp(normed)
    # the MLP returns down_proj's output itself (checked): its matmul adds the stream
    # (dispatch_linear), and where down_proj was not called the add happens here
    down.__dict__["pending_residual"] = hidden
    try:
        out = self.mlp(normed)
    finally:
        left = down.__dict__.pop("pending_residual", None)
    return out if left is None else hidden + out


class _Probe(nn.Module):
    """Stands in for a layer's attention (pair: returns (output, None) as transformers'
    attention modules do) or its MLP while _adds_around_norm runs: a fixed function of its
    input that records the other arguments it was called with."""

    def __init__(self, scale: float, pair: bool):
        super().__init__()
        self.scale, self.pair, self.calls = scale, pair, []

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self.calls.append((args, kwargs))
        out = torch.tanh(hidden_states.float() * self.scale).to(hidden_states.dtype)
        return (out, None) if self.pair else out


def _adds_around_norm(layer: nn.Module, like: torch.Tensor | None) -> dict | None:
    """The defaults of layer's named forward arguments if its forward computes
    h + mlp(post(h + attn(inp(h)))) and hands the attention those arguments unchanged, else
    None. Run with probes in place of attn and mlp, a distinct marker object for every
    argument, once as the layer's class runs it and once fused, on a random input in the
    model's device and activation dtype (like)."""
    from compress.runtime.modules import kernel_unavailable

    norm = layer.post_attention_layernorm
    weight, _, crms_dim = _norm_arguments(norm)
    width = (weight.numel() if weight is not None else crms_dim - 1 if crms_dim
             else getattr(norm, "normalized_shape", (None,))[0])
    try:
        params = list(inspect.signature(type(layer).forward).parameters.values())[2:]
    except (TypeError, ValueError):
        return None
    if like is None or layer.training or not isinstance(width, int) or any(
            p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) for p in params):
        return None   # (training: the fused forward would defer to the layer's, unchecked)
    named = [p for p in params if p.kind != p.VAR_KEYWORD]
    if any(p.default is p.empty for p in named):
        return None
    defaults = {p.name: p.default for p in named}
    kwargs = {name: object() for name in defaults}
    if len(named) < len(params):   # **kwargs: passed on too
        kwargs["compress_probe"] = object()
    x = torch.randn(1, 3, width, generator=torch.Generator().manual_seed(0)).to(like.device,
                                                                               like.dtype)
    if kernel_unavailable(x) is not None:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    probes = _Probe(1.5, pair=True), _Probe(-0.75, pair=False)
    layer._modules["self_attn"], layer._modules["mlp"] = probes
    layer.fused_residual_defaults, layer.fused_residual_mlp = defaults, False
    try:
        with torch.no_grad():
            want = type(layer).forward(layer, x, **kwargs)
            got = _residual_fused_forward(layer, x, **kwargs)
    except (RuntimeError, TypeError, ValueError, AttributeError):
        return None
    finally:
        layer._modules["self_attn"], layer._modules["mlp"] = attn, mlp
        del layer.fused_residual_defaults, layer.fused_residual_mlp
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return None
    for probe in probes:   # called once in each run, with the same arguments (by identity)
        if len(probe.calls) != 2:
            return None
        (args_a, kw_a), (args_b, kw_b) = probe.calls
        if args_a or args_b or kw_a.keys() != kw_b.keys() or any(
                kw_a[k] is not kw_b[k] for k in kw_a):
            return None
    # the formula, not the rounding: the kernel's float32 -> 16-bit conversion may differ from
    # torch's by an ulp (Triton's interpreter truncates); a wrong formula is off by O(1)
    scale = want.abs().max().item()
    if not torch.allclose(want.float(), got.float(), rtol=2e-2, atol=2e-2 * scale):
        return None
    return defaults


def _returns_down_proj(mlp: nn.Module, like: torch.Tensor) -> bool:
    """Is mlp's output its down_proj's output itself, nothing applied after it (Llama, Qwen,
    Mistral)? Then a compressed down_proj can add the residual stream in its matmul's epilogue.
    Run once on a random row in like's device and dtype, down_proj's output caught by a
    forward hook."""
    down = getattr(mlp, "down_proj", None)
    width = getattr(down, "out_features", None)
    if not isinstance(down, nn.Module) or like is None or not isinstance(width, int):
        return False
    caught = []
    hook = down.register_forward_hook(lambda module, args, out: caught.append(out))
    x = torch.randn(1, 1, width, generator=torch.Generator().manual_seed(0)).to(like.device,
                                                                               like.dtype)
    try:
        with torch.no_grad():
            out = mlp(x)
    except (RuntimeError, TypeError, ValueError, AttributeError):
        return False
    finally:
        hook.remove()
    return len(caught) == 1 and out is caught[0]


def _norm_arguments(norm: nn.Module) -> tuple[torch.Tensor | None, float, int | None]:
    """(weight, eps, crms_dim) of a norm fuse_rmsnorms accepted, as add_rmsnorm takes them."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return (weight if isinstance(weight, torch.Tensor) else None), eps, norm.fused_crms_dim
