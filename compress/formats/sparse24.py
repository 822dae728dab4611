"""2:4 semi-structured storage: kept values plus 2-bit positions, the layout the sparse kernel reads.

For a weight [O, I] with at most 2 non-zeros in every 4 consecutive inputs (I % 8 == 0):
    weight_meta   uint8 [O, I/8]   each group of 4 inputs has two positions p0 < p1 packed as the
                                   nibble p0 | p1 << 2; group 2j in the low nibble of byte j,
                                   group 2j+1 in the high nibble. A group with fewer non-zeros
                                   pads with unused positions whose kept value is 0.
    weight_values 16-bit [O, I/2]  the kept values in order (16-bit weights), or
    weight_packed                  for 4-bit formats: the kept codes [O, I/2] packed exactly as the
                                   format packs its dense codes (INT: int32 [O, I/16]; FP4: uint8
                                   [O, I/4]), with the format's scales unchanged (indexed by the
                                   ORIGINAL input position) and weight_shape = [O, I].
Stateless functions; the modules that hold these tensors are in compress.runtime.modules.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError
from compress.formats import QuantizedWeight, WeightFormat, codec


def group_counts(w: torch.Tensor, m: int = 4) -> torch.Tensor:
    """Non-zeros in each group of m consecutive inputs. w: [O, I] -> [O, I/m]."""
    return (w != 0).reshape(w.shape[0], -1, m).sum(-1)


def check_nm(w: torch.Tensor, n: int, m: int, name: str) -> None:
    """Raise when some group of m consecutive inputs of w [O, I] holds more than n non-zeros."""
    if w.shape[1] % m:
        raise CompressError(f"{name}: input size {w.shape[1]} is not a multiple of {m}; "
                            f"it cannot hold an {n}:{m} pattern")
    bad = (group_counts(w, m) > n).nonzero()
    if len(bad):
        row, group = bad[0].tolist()
        raise CompressError(f"{name}: {len(bad)} groups of {m} inputs hold more than {n} "
                            f"non-zeros (first: row {row}, inputs {group * m}..{group * m + m - 1});"
                            f" the weight is not {n}:{m} sparse")


def _check_shape(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or w.shape[1] % 8:
        raise CompressError(f"{name}: 2:4 storage needs a 2-D weight whose input size is a "
                            f"multiple of 8, got {tuple(w.shape)}; store it dense")


def positions(w: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """The two kept positions p0 < p1 of every group of 4: non-zeros first, padded with the
    lowest unused positions. w: [O, I] -> int64 [O, I/4, 2]."""
    _check_shape(w, name)
    check_nm(w, 2, 4, name)
    groups = (w != 0).reshape(w.shape[0], -1, 4)
    # Sort key: zeros after non-zeros, then by position; the first two are the kept slots.
    key = (~groups).to(torch.int64) * 4 + torch.arange(4, device=w.device)
    return key.argsort(-1)[..., :2].sort(-1).values


def encode_meta(pos: torch.Tensor) -> torch.Tensor:
    """[O, I/4, 2] positions -> uint8 [O, I/8]: nibble p0 | p1 << 2, group 2j low, 2j+1 high."""
    nibble = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)          # [O, I/4]
    return nibble[:, 0::2] | (nibble[:, 1::2] << 4)


def decode_meta(meta: torch.Tensor) -> torch.Tensor:
    """uint8 [O, I/8] -> int64 positions [O, I/4, 2]."""
    nibble = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1)
    nibble = nibble.to(torch.int64)
    return torch.stack([nibble & 3, nibble >> 2], dim=-1)


def gather_kept(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The entries of x [O, I] at the kept positions, in order: [O, I/2]."""
    return x.reshape(x.shape[0], -1, 4).gather(-1, pos).reshape(x.shape[0], -1)


def scatter_kept(kept: torch.Tensor, pos: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Inverse of gather_kept: kept [O, I/2] written at pos into a copy of base [O, I]."""
    out = base.reshape(base.shape[0], -1, 4).clone()
    out.scatter_(-1, pos, kept.reshape(kept.shape[0], -1, 2))
    return out.reshape(base.shape)


def values_dtype(w: torch.Tensor) -> torch.dtype:
    """16-bit storage: the weight's own dtype when it is 16-bit; float32 weights go to float16
    (10 mantissa bits) unless a value exceeds its range, then bfloat16."""
    if w.dtype in (torch.float16, torch.bfloat16):
        return w.dtype
    return torch.float16 if w.abs().max() <= torch.finfo(torch.float16).max else torch.bfloat16


def compress_dense(w: torch.Tensor, name: str = "weight",
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """16-bit 2:4 storage of w [O, I]: weight_meta uint8 [O, I/8], weight_values [O, I/2]."""
    pos = positions(w, name)
    return {"weight_meta": encode_meta(pos),
            "weight_values": gather_kept(w, pos).to(dtype or values_dtype(w)).contiguous()}


def decompress_dense(meta: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Dense [O, I] weight (values' dtype) from weight_meta and weight_values."""
    pos = decode_meta(meta)
    base = torch.zeros(values.shape[0], values.shape[1] * 2, dtype=values.dtype,
                       device=values.device)
    return scatter_kept(values, pos, base)


def _zero_codes(shape: tuple[int, int], zero: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """Codes [O, I] that decode to 0 everywhere: the zero point (asymmetric INT) or code 0."""
    if zero is None:
        return torch.zeros(shape, dtype=dtype)
    return zero.to(dtype).repeat_interleave(shape[1] // zero.shape[1], dim=1)


def compress_quantized(q: QuantizedWeight, scale_dtype: torch.dtype = torch.float32,
                       name: str = "weight") -> dict[str, torch.Tensor]:
    """4-bit 2:4 storage: the format's own tensors with weight_packed holding only the kept
    codes [O, I/2] (packed by the format's own pack), plus weight_meta."""
    pos = positions(q.dequantize(), name)
    kept = QuantizedWeight(q.fmt, gather_kept(q.codes, pos), q.scale, q.zero, q.global_scale)
    tensors = codec(q.fmt).pack(kept, scale_dtype)
    tensors["weight_meta"] = encode_meta(pos)
    tensors["weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
    return tensors


def decompress_quantized(tensors: dict[str, torch.Tensor], fmt: WeightFormat) -> QuantizedWeight:
    """The dense QuantizedWeight [O, I] (codes, scales) from 4-bit 2:4 storage."""
    out_features, in_features = tensors["weight_shape"].tolist()
    kept_shape = torch.tensor([out_features, in_features // 2], dtype=torch.int64)
    rest = {k: v for k, v in tensors.items() if k not in ("weight_meta", "weight_shape")}
    kept = codec(fmt).unpack({**rest, "weight_shape": kept_shape}, fmt)  # codes [O, I/2]
    base = _zero_codes((out_features, in_features), kept.zero, kept.codes.dtype)
    codes = scatter_kept(kept.codes, decode_meta(tensors["weight_meta"]), base.to(kept.codes.device))
    return QuantizedWeight(fmt, codes, kept.scale, kept.zero, kept.global_scale)


def fits_24(n: int, m: int) -> bool:
    """Whether every N:M-sparse weight is also 2:4-sparse (storable in the 2:4 layout)."""
    if m % 4 == 0:
        return n <= 2
    return 4 % m == 0 and n * (4 // m) <= 2
