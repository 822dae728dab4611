"""Pre-CRMSNorm at run time (Jiang et al. 2023): the weightless norm of a residual stream stored
in d-1 values, and the rebuild of a converted model's norms and shapes on load."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress.runtime.modules import get_module, set_module


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

    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
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
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
    return add_rmsnorm(x, None, getattr(self, "weight", None), eps, self.fused_crms_dim)[0]
