"""How GPTQ (and round-to-nearest) fix the parameters of one quantization group.

`group_params(w, fmt, ...)` is the single point where a group's scale (and zero point) are
chosen; GPTQ calls it once per group. Two choices:
  - "minmax": the group's range maps onto the format's full range (the codec's own rule).
  - "mse": the range is shrunk by a factor p from a grid (clipping the largest weights) and the
    p with the smallest quantization error of the group is kept, per group. The error may be
    weighted per input column by `importance` (GPTQ passes diag(H), the mean squared input
    of each column, so that the columns whose inputs are large count more: the output error of
    a rounding error d_j on column j is about H_jj d_j^2).
Shrinking works for every format through the codec itself: the parameters of the group `p * w`
are those of a range clipped to p times the original; the original w is then encoded with them
(values beyond the range saturate). For FP formats the scale stays on its grid (FP8-E4M3
for NVFP4, powers of two for MXFP4) because the codec rounds it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch

from compress.formats import GroupParams, WeightFormat, codec

ScaleSearch = Literal["minmax", "mse"]

# Shrink factors tried by the "mse" search: 1.0 first (so ties keep min-max), down to 0.6.
MSE_GRID = tuple(1.0 - 0.02 * k for k in range(21))


def quant_error(w: torch.Tensor, p: GroupParams,
                importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group (optionally weighted) squared rounding error on the grid p. w: [..., g] ->
    [..., 1]."""
    err = codec(p.fmt).fake_quantize(w, p).sub_(w).square_()   # (q - w)^2 = (w - q)^2
    if importance is not None:
        err = err.mul_(importance)
    return err.sum(dim=-1, keepdim=True)


def _pick(better: torch.Tensor, new: GroupParams, best: GroupParams) -> GroupParams:
    return replace(best, scale=torch.where(better, new.scale, best.scale),
                   zero=None if best.zero is None else torch.where(better, new.zero, best.zero))


def mse_scale_search(w: torch.Tensor, fmt: WeightFormat, tensor_scale=None,
                     importance: torch.Tensor | None = None, grid=MSE_GRID) -> GroupParams:
    """Per-group grid minimizing the (weighted) rounding error over shrink factors.
    w: [..., g]; importance: broadcastable to w (e.g. [g] = diag(H) of the group's columns).
    Returns params shaped like the codec's group_params: [..., 1]."""
    c = codec(fmt)
    best = c.group_params(w, fmt, tensor_scale)
    best_err = quant_error(w, best, importance)
    for shrink in grid[1:]:
        candidate = c.group_params(w * shrink, fmt, tensor_scale)
        err = quant_error(w, candidate, importance)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = _pick(better, candidate, best)
    return best


def group_params(w: torch.Tensor, fmt: WeightFormat, tensor_scale=None,
                 importance: torch.Tensor | None = None,
                 search: ScaleSearch = "minmax") -> GroupParams:
    """The grid of groups along the last axis, by min-max or by the "mse" search."""
    if search == "mse":
        return mse_scale_search(w, fmt, tensor_scale, importance)
    return codec(fmt).group_params(w, fmt, tensor_scale)
