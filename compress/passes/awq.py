"""AWQ-style activation-aware scaling (Lin et al. 2023), folded exactly into the model.

For the linears that read one input x (q/k/v after the attention norm, gate/up after the MLP
norm, o after v, down after up), input channel j is multiplied by s_j inside the weight and the
input is divided by s_j in the op before (a norm's weight, or the rows of the linear before):
the float model is unchanged, but quantization error moves away from the channels with large
activations. s = mean|x|^alpha (normalized), alpha searched on a grid for the smallest error of
the quantized linears' outputs on the calibration tokens.

The error of an output y = x W^T is measured exactly over every calibration token through the
Gram matrix G = mean x x^T (the Hessian GPTQ uses, up to a factor 2):
    ||x (Q(W s)/s - W)^T||^2 summed over tokens = tr(D G D^T),  D = Q(W s)/s - W
so a grid point costs one O x I x I product, not a pass over the tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Quantizer = Callable[[torch.Tensor], torch.Tensor]   # W [O, I] -> dequantized Q(W)


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalized so that max(s) * min(s) = 1 (AWQ's normalization)."""
    s = mean_abs.float().clamp(min=1e-4).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(W: torch.Tensor, W_q: torch.Tensor, G: torch.Tensor) -> float:
    """Summed squared output error per token, tr(D G D^T) with D = W_q - W. G: [I, I]."""
    D = (W_q - W).float()
    return float(((D @ G) * D).sum())


def search_scale(mean_abs: torch.Tensor, G: torch.Tensor,
                 modules: list[tuple[torch.Tensor, Quantizer]], grid: int = 20,
                 expand: Callable[[torch.Tensor], torch.Tensor] = lambda s: s
                 ) -> tuple[torch.Tensor, float, float, float]:
    """Best s over alpha in {0, 1/grid, ..., (grid-1)/grid}. mean_abs: [C]; `expand` maps the C
    scales to the I input channels of the modules (identity, or a repeat for grouped heads).
    Returns (s [C], alpha, error at alpha=0 (plain quantization), best error)."""
    best = (torch.ones_like(mean_abs, dtype=torch.float32), 0.0, float("inf"))
    base = float("inf")
    for step in range(grid):
        alpha = step / grid
        s = awq_scales(mean_abs, alpha) if alpha else torch.ones_like(mean_abs, dtype=torch.float32)
        si = expand(s)
        error = sum(output_error(W, quantizer(W * si) / si, G) for W, quantizer in modules)
        if alpha == 0:
            base = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], base, best[2]


# ---------------------------------------------------------------------------------------------
# Folding (exact in float arithmetic up to rounding)

def scale_input_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    """W[:, j] *= s_j (the linear now expects inputs divided by s)."""
    linear.weight.data.mul_(s.to(linear.weight.dtype)[None, :])


def divide_output(module: nn.Module, s: torch.Tensor) -> None:
    """Divide the outputs of a norm (weight, bias) or a linear (rows, bias) by s."""
    s = s.to(module.weight.dtype)
    if module.weight.dim() == 2:
        module.weight.data.div_(s[:, None])
    else:
        module.weight.data.div_(s)
    if getattr(module, "bias", None) is not None:
        module.bias.data.div_(s)


def folds_exactly(module: nn.Module, size: int) -> bool:
    """Whether divide_output(module, s) divides the module's output by s: checked on a random
    input for a module with a 1-D weight of `size` (a norm; Gemma's (1 + w) norm fails it)."""
    import copy

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (size,):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, size, generator=gen).to(weight.device, weight.dtype)
    s = (torch.rand(size, generator=gen) + 0.5).to(weight.device)
    scaled = copy.deepcopy(module)
    divide_output(scaled, s)
    with torch.no_grad():
        want, got = module(x), scaled(x)
    return bool(torch.allclose(got * s.to(got.dtype), want, rtol=1e-3, atol=1e-5))


@dataclass
class Mapping:
    """Linears reading one input, and the op before them that absorbs 1/s."""

    prev: str                     # a norm, or a linear whose output rows are scaled
    linears: tuple[str, ...]
    group: tuple[str, ...]        # the Arch.linear_groups entry whose input is scaled
    heads: tuple[int, int] | None = None   # (repeat, head_dim) when prev is v and o reads GQA


def mappings(arch, config) -> tuple[list[Mapping], list[str]]:
    """Where scales can be folded for this architecture, and why others cannot."""
    skipped = []
    if not arch.known:
        why = (f"{arch.name}: no table entry; only norm -> linears mappings are inferred "
               "(found in each layer, checked to fold exactly)")
        return [], [why]
    if arch.placement != "pre" or arch.conv1d:
        return [], [f"{arch.name}: only pre-norm nn.Linear models are supported"]
    groups = arch.linear_groups()
    found = [Mapping(arch.attn_norm, groups[0], groups[0])]
    if arch.mlp_norm is not None:
        found.append(Mapping(arch.mlp_norm, tuple(arch.mlp_in), tuple(arch.mlp_in)))
    if not arch.fused_qkv:
        heads = getattr(config, "num_attention_heads", None)
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads)
        found.append(Mapping(arch.v, (arch.o,), (arch.o,), (heads // kv, head_dim)))
    else:
        skipped.append("v -> o (fused qkv projection)")
    if len(arch.mlp_in) == 2:   # gated MLP: act(gate) * up is linear in up's output
        found.append(Mapping(arch.mlp_in[1], (arch.mlp_out,), (arch.mlp_out,)))
    else:
        skipped.append("fc1 -> fc2 (a non-linear activation sits between)")
    return found, skipped


def gqa_expand(repeat: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """v's scales [kv * hd] -> o's input scales [kv * repeat * hd] (query head h reads kv head
    h // repeat)."""
    def expand(s: torch.Tensor) -> torch.Tensor:
        return s.view(-1, 1, head_dim).expand(-1, repeat, head_dim).reshape(-1)
    return expand


def gqa_reduce(mean_abs: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    """o's input statistics [kv * repeat * hd] -> one per v channel (mean over query heads)."""
    return mean_abs.view(-1, repeat, head_dim).mean(dim=1).reshape(-1)
