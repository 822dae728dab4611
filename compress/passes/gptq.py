"""GPTQ (Frantar et al. 2022): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the inputs.

Pure math on tensors: the quantize pass (compress/passes/quantize.py) gathers the Hessians with
the layer-wise Calibrator and calls `gptq_quantize` per module (or per group of modules that
read the same input and share a format: their rows are independent given H, so they are
quantized as one stacked matrix).
"""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass

import torch

from compress.formats import GroupParams, QuantizedWeight, WeightFormat, codec
from compress.hessian import fix_dead_inputs, inverse_cholesky, serial_on_cpu
from compress.passes import qparams

GRAPH_ENV = "COMPRESS_GPTQ_GRAPH"   # "0": run the column loop eagerly on CUDA too


KERNEL_ENV = "COMPRESS_GPTQ_KERNEL"   # "0": no Triton block kernel (the torch loop instead)


def graphs_enabled(w: torch.Tensor) -> bool:
    return w.is_cuda and os.environ.get(GRAPH_ENV, "1") != "0"


def block_kernel_enabled(w: torch.Tensor, fmt: WeightFormat) -> bool:
    """INT blocks with static parameters run compress/passes/gptq_kernel.py on CUDA."""
    return w.is_cuda and fmt.type == "int" and os.environ.get(KERNEL_ENV, "1") != "0"


def _solve_column(c, W1, U1, codes1, Err1, i: int, p: GroupParams, keep1) -> None:
    """Column i of a block, in place: encode it, record its scaled error, spread the error
    over the block's later columns (W1 is W^T: a column is a contiguous row)."""
    q = c.encode(W1[i], p)
    codes1[i] = q
    err = torch.div(W1[i] - c.decode(q, p), U1[i, i], out=Err1[i])
    W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)  # W[:, i:] -= err * Hinv[i, i:]
    if keep1 is not None:
        W1[i + 1:] *= keep1[i + 1:]                   # kept zeros stay zero


def _solve_columns(c, W1, U1, codes1, Err1, params, keep1) -> None:
    """Every column of a block whose parameters are fixed up front (params(i) -> GroupParams)."""
    for i in range(W1.shape[0]):
        _solve_column(c, W1, U1, codes1, Err1, i, params(i), keep1)


class _BlockGraph:
    """The column loop of one full block (static parameters) captured once as a CUDA graph and
    replayed for every block of the matrix. Eagerly the loop is ~10 small kernels a column
    whose launch cost on the host exceeds their GPU time (the H200 spent ~150 us a column on
    a [28672, 4096] weight); replayed, they run back to back. Inputs are copied into the
    graph's static buffers before each replay; the last, shorter block runs eagerly."""

    def __init__(self, c, fmt, block: int, out_features: int, has_zero: bool, has_keep: bool,
                 tensor_scale, device):
        f32 = {"device": device, "dtype": torch.float32}
        self.W1 = torch.zeros(block, out_features, **f32)
        self.U1 = torch.empty(block, block, **f32)
        self.scale = torch.empty(block, out_features, **f32)
        self.err = torch.empty(block, out_features, **f32)
        self.zero = torch.zeros(block, out_features, device=device, dtype=torch.int8) \
            if has_zero else None
        self.keep = torch.ones(block, out_features, device=device, dtype=torch.bool) \
            if has_keep else None
        self.codes = torch.empty(block, out_features, device=device, dtype=torch.int8)
        p = GroupParams(fmt, self.scale, self.zero, tensor_scale)
        self.U1.copy_(torch.eye(block, **f32))       # warm-up values: any finite ones do
        self.scale.fill_(1.0)
        # The body names the buffers, not self: with no reference cycle the graph is freed
        # when its matrix is done, never by a garbage collection (see capture)
        W1, U1, codes, err, keep = self.W1, self.U1, self.codes, self.err, self.keep
        self.body = lambda: _solve_columns(c, W1, U1, codes, err,
                                           lambda i: p.map(lambda t: t[i]), keep)
        self.replay = self.body                        # until captured (tests run it so)

    @classmethod
    def capture(cls, *args) -> _BlockGraph | None:
        """The captured loop, or None (eager) where this torch cannot capture it."""
        try:
            self = cls(*args)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body()                            # allocations settle before capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # No garbage collection during the capture: one that frees an earlier CUDA graph
            # resets it inside this capture, which invalidates the capture and leaves torch's
            # CUDA generator marked as capturing, so every later random op on the GPU fails
            # ("Offset increment outside graph capture": the H200 suite, seventh session).
            # torch.cuda.graph no longer collects before capturing (force_cudagraph_gc).
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(graph):
                    self.body()
            finally:
                if collecting:
                    gc.enable()
            self.graph, self.replay = graph, graph.replay
            return self
        except RuntimeError as exc:
            warnings.warn(f"GPTQ's column loop runs eagerly: CUDA graph capture failed ({exc})",
                          RuntimeWarning, stacklevel=2)
            return None

    def run(self, W1, U1, p: GroupParams, keep1) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [B, O], scaled errors [B, O]) of the block; the views stay valid until the
        next run."""
        self.W1.copy_(W1)
        self.U1.copy_(U1)
        self.scale.copy_(p.scale)
        if self.zero is not None:
            self.zero.copy_(p.zero)
        if self.keep is not None:
            self.keep.copy_(keep1)
        self.replay()
        return self.codes, self.err


@dataclass
class GptqInfo:
    damp: float            # damping actually used (escalated when the factorization failed)
    act_order: bool


def _static_params(w: torch.Tensor, fmt: WeightFormat, g: int, tensor_scale,
                   importance: torch.Tensor, search: qparams.ScaleSearch) -> GroupParams:
    """Group parameters of the whole matrix up front ("static groups"). w: [O, I],
    importance: [I] -> params [O, I/g, 1]."""
    wg = w.reshape(w.shape[0], -1, g)
    return qparams.group_params(wg, fmt, tensor_scale, importance.reshape(-1, g), search)


@serial_on_cpu
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False,
                  mask: torch.Tensor | None = None, name: str = "",
                  static_groups: bool = False, scale_search: qparams.ScaleSearch = "minmax",
                  global_scale: torch.Tensor | None = None, consume_h: bool = False
                  ) -> tuple[QuantizedWeight, GptqInfo]:
    """w: [O, I], H: [I, I] (2/n sum x x^T), mask: bool [O, I] of weights allowed to be non-zero.
    Returns the quantized weight (same layout as round-to-nearest) and what was used.

    Without act_order, group parameters are taken from the already-updated weights when the
    column loop reaches each group (as in the paper). With act_order, columns are processed in
    order of decreasing H[i, i] but group parameters are fixed from the original weights first
    ("static groups", llm-compressor's actorder=weight): the stored layout stays the plain
    [O, I/g] one, so no weight_g_idx is needed and every kernel reads it unchanged.
    static_groups without act_order fixes every group's parameters from the original weights
    too (llm-compressor's GPTQ does this by default). scale_search chooses how a group's
    parameters are found (compress/passes/qparams.py: min-max or a diag(H)-weighted MSE search).
    global_scale: NVFP4's per-tensor scale when it is shared with other tensors (fused q/k/v).
    consume_h: the caller does not read H again, so a float32 H becomes the scratch space of
    the inversion (no [I, I] copy: 822 MB for an 8B model's down_proj).
    Raises CompressError when the Hessian cannot be factorized at any damping."""
    c = codec(fmt)
    out_features, in_features = w.shape
    g = fmt.group_for(in_features)
    # from the whole tensor (or the fused group) first; None for formats without one
    tensor_scale = global_scale if global_scale is not None else c.tensor_scale(w, fmt)
    # H first, W after its inversion: on a GPU the float32 copy of the weight (0.22 GiB of an
    # 8B down_proj) is then not alive beside the inversion
    H = H.float() if consume_h or H.dtype != torch.float32 else H.clone()
    dead = fix_dead_inputs(H)
    importance = torch.diag(H).clone()   # mean squared input of each column (before damping)
    perm = torch.argsort(importance, descending=True) if act_order else None
    if perm is not None:   # in place: one [I, I] temporary at a time, none kept
        H.copy_(H.index_select(0, perm))
        H.copy_(H.index_select(1, perm))
    U, used = inverse_cholesky(H, damp, name=name, overwrite=True)   # H is ours (or consumed)
    del H
    W = w.to(torch.float32, copy=True)
    W[:, dead] = 0
    if mask is not None:
        mask = mask.to(torch.bool)
        W = W * mask
    static = _static_params(W, fmt, g, tensor_scale, importance, scale_search) \
        if act_order or static_groups else None
    # Work on W^T [I, O] (columns of W as contiguous rows) in processing order; every buffer
    # is created where W is, and nothing in the loops reads a value back to the host. One
    # copy, then W goes: W[:, perm].T.contiguous() held three float32 copies of the weight at
    # once, GPTQ's GPU peak (0.44 GiB each for an 8B model's fused gate/up; issue 15's trace).
    Wt = W.T.contiguous() if perm is None else W.T[perm]
    del W
    keep_t = None if mask is None else (mask.T.contiguous() if perm is None else mask.T[perm])
    group_of = torch.arange(in_features, device=Wt.device) // g
    if perm is not None:
        group_of = group_of[perm]           # column k in processing order is in this group
    codes_t = torch.empty(in_features, out_features, dtype=torch.int8, device=Wt.device)
    if static is not None:
        scales, zeros = static.scale[..., 0].float(), None if static.zero is None else \
            static.zero[..., 0]
    else:
        scales = torch.empty(out_features, in_features // g, device=Wt.device)
        zeros = None if fmt.symmetric else torch.empty_like(scales, dtype=torch.int8)
    p = None
    graph = None
    kernel = static is not None and block_size <= 128 and block_kernel_enabled(Wt, fmt)
    if kernel:
        from compress.passes.gptq_kernel import gptq_block
    elif static is not None and in_features >= block_size and graphs_enabled(Wt):
        graph = _BlockGraph.capture(c, fmt, block_size, out_features, zeros is not None,
                                    keep_t is not None, tensor_scale, Wt.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        if static is not None:   # parameters of every column of the block, gathered once
            columns = group_of[i1:i2]
            block_p = GroupParams(fmt, scales, zeros, tensor_scale).map(
                lambda t, columns=columns: t.T[columns])
            keep1 = None if keep_t is None else keep_t[i1:i2]
            if kernel:
                Err1 = gptq_block(Wt[i1:i2], U[i1:i2, i1:i2], block_p.scale, block_p.zero,
                                  keep1, fmt.bits, codes_t[i1:i2])
            elif graph is not None and i2 - i1 == block_size:
                codes_t[i1:i2], Err1 = graph.run(Wt[i1:i2], U[i1:i2, i1:i2], block_p, keep1)
            else:
                W1, Err1 = Wt[i1:i2].clone(), torch.empty_like(Wt[i1:i2])
                _solve_columns(c, W1, U[i1:i2, i1:i2].contiguous(), codes_t[i1:i2], Err1,
                               lambda i, bp=block_p: bp.map(lambda t: t[i]), keep1)
        else:
            W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2].contiguous()   # U is a transpose view
            Err1 = torch.empty_like(W1)
            for i in range(i2 - i1):
                if (i1 + i) % g == 0:   # first column of a group: parameters from the updated W
                    ahead = W1[i:i + g] if i + g <= i2 - i1 else torch.cat([W1[i:], Wt[i2:]])[:g]
                    col = i1 + i            # natural order here: act_order implies static
                    p = qparams.group_params(ahead.T, fmt, tensor_scale, importance[col:col + g],
                                             scale_search).map(lambda t: t[:, 0])  # [O]
                    scales[:, (i1 + i) // g] = p.scale
                    if zeros is not None:
                        zeros[:, (i1 + i) // g] = p.zero
                _solve_column(c, W1, U1, codes_t[i1:i2], Err1, i, p,
                              None if keep_t is None else keep_t[i1:i2])
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)     # lazy update of later blocks
        if keep_t is not None:
            Wt[i2:] *= keep_t[i2:]
    codes = codes_t.T if perm is None else codes_t[torch.argsort(perm)].T
    return QuantizedWeight(fmt, codes.contiguous(), scales, zeros, tensor_scale), \
        GptqInfo(used, act_order)
