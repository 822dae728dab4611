"""W4A16 (and W8A16): activations times group-wise integer weights, decoded in registers.

Reads compressed-tensors "pack-quantized" tensors exactly as stored (compress/formats/intq.py),
so loading needs no repack:
    weight_packed      int32 [N, ceil(K/P)]   P = 32/bits codes a word, element j at bits j*bits,
                                              stored as code + 2^(bits-1)
    weight_scale       float [N, K/g]         (float32, bfloat16 or float16)
    weight_zero_point  int32 [ceil(N/P), K/g] optional, packed the same way along N
w[n, k] = (code - zero) * scale[n, k // g]; y = x @ w^T (+ bias).

One entry point, `int_matmul`, picks the path by M (see compress/kernels/_common.py): the
decode kernel (compress/kernels/decode.py) for a few rows, the tc kernel (compress/kernels/tc.py)
up to the dequant limit, then decode-once (tc.py) + cuBLAS. The kernels live there, shared with
the FP4 formats; this file checks the INT tensors and holds the reference.
"""

from __future__ import annotations

import dataclasses

import torch

from compress.kernels import _common as C
from compress.kernels.decode import FMT_INT, words_matmul
from compress.kernels.tc import tc_dequantize, tc_matmul

# ---------------------------------------------------------------------------------------------
# Host wrapper

def _check_int(packed, scale, zero, bits, n, k):
    per = 32 // bits
    C.check(bits in (4, 8), f"integer kernel supports 4 and 8 bits, not {bits}")
    C.check(packed.dtype == torch.int32 and packed.shape == (n, -(-k // per)),
            f"weight_packed must be int32 [{n}, {-(-k // per)}], got {packed.dtype} "
            f"{list(packed.shape)}")
    C.check(scale.dim() == 2 and scale.shape[0] == n and k % scale.shape[1] == 0,
            f"weight_scale must be [{n}, K/group] with the group dividing {k}, got "
            f"{list(scale.shape)}")
    if zero is not None:
        C.check(zero.dtype == torch.int32 and zero.shape == (-(-n // per), scale.shape[1]),
                f"weight_zero_point must be int32 [{-(-n // per)}, {scale.shape[1]}], got "
                f"{zero.dtype} {list(zero.shape)}")
    for t in (packed, scale) + (() if zero is None else (zero,)):
        C.check(t.is_contiguous(), "packed weight tensors must be contiguous")


def int_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None, shape: tuple[int, int], bits: int = 4,
               bias: torch.Tensor | None = None, path: str | None = None,
               split_k: int | None = None, config: C.Config | None = None,
               gated: bool = False) -> torch.Tensor:
    """x [..., K] @ dequant(W [N, K])^T + bias -> [..., N] in x.dtype. path/split_k/config
    override the choice by M and the tuned config (tests, benchmarks, autotune use them).
    gated: W stacks a SiLU-gated MLP's gate and up; returns silu(gate) * up, [..., N / 2] (in
    the M = 1 kernel's epilogue, else after the matmul)."""
    n, k = shape
    _check_int(packed, scale, zero, bits, n, k)
    x2 = C.activation_2d(x, k)
    m = x2.shape[0]
    path = path or C.choose_path(m, decode=True, device=x.device)
    C.check(path in ("decode", "tc", "dequant"), f"no {path!r} path for INT weights")
    family = f"int{bits}" + ("-asym" if zero is not None else "")
    cfg = config or (C.kernel_config(path, family, m, n, k, x.device) if path != "dequant"
                     else None)
    if gated and (path != "decode" or cfg.block_m > 1):
        return C.silu_mul(int_matmul(x, packed, scale, zero, shape, bits, bias, path, split_k,
                                     cfg))
    if path == "dequant":
        per, group = 32 // bits, k // scale.shape[1]

        def decode_rows(n0, n1, out):   # zero points: PER rows a word, n0 a multiple of PER
            z = None if zero is None else zero[n0 // per:-(-n1 // per)]
            return tc_dequantize(FMT_INT, packed[n0:n1], scale[n0:n1], z, None, n1 - n0, k,
                                 bits, group, x.dtype, out)

        return C.dequant_linear(x2, decode_rows, n, k, bias).reshape(*x.shape[:-1], n)
    if split_k is not None:
        cfg = dataclasses.replace(cfg, split_k=split_k)
    args = (x2, FMT_INT, packed, scale, zero, None, n, k, bits, k // scale.shape[1], bias, cfg,
            x.dtype)
    y = words_matmul(*args, gated=gated) if path == "decode" else tc_matmul(*args)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   shape: tuple[int, int], bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight decoded to dtype, [N, K] (the prefill path, then cuBLAS)."""
    n, k = shape
    _check_int(packed, scale, zero, bits, n, k)
    return tc_dequantize(FMT_INT, packed, scale, zero, None, n, k, bits, k // scale.shape[1],
                         dtype)


# ---------------------------------------------------------------------------------------------
# Reference

def _unpack_ref(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    vals = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*words.shape[:-1], words.shape[-1] * per)[..., :length] - (1 << (bits - 1))


def int_dequantize_ref(packed, scale, zero, shape, bits: int = 4) -> torch.Tensor:
    """float32 [N, K], written independently of compress.formats.intq (tests compare both)."""
    n, k = shape
    codes = _unpack_ref(packed, bits, k).float()
    if zero is not None:
        codes = codes - _unpack_ref(zero.T.contiguous(), bits, n).T.float().repeat_interleave(
            k // scale.shape[1], dim=1)
    return codes * scale.float().repeat_interleave(k // scale.shape[1], dim=1)


def int_matmul_ref(x, packed, scale, zero, shape, bits: int = 4, bias=None) -> torch.Tensor:
    """What int_matmul computes, in float32, cast to x.dtype."""
    w = int_dequantize_ref(packed, scale, zero, shape, bits)
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)
