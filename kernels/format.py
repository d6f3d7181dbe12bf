"""The GPTQ checkpoint format (v1 "gptq", and "gptq_v2"), byte for byte.

Per quantized linear with in_features K, out_features N, bits b, group size g (see shared FORMAT.md):
    qweight int32 [K*b/32, N]   integer codes packed along K (dim 0)
    qzeros  int32 [G, N*b/32]   zero points packed along N (dim 1); v1 stores zero-1
    scales  fp16  [G, N]        G = ceil(K / g)  (g = -1: one group over all of K)
    g_idx   int32 [K]           group of each input row
    W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])

Packing is one rule for every bit width: 32 consecutive b-bit values form a little-endian bit stream
of b words (value j occupies bits b*j .. b*j+b-1 of the stream). For b = 2, 4, 8 that is "value j of
a word in bits b*j"; for b = 3 it reproduces AutoGPTQ/GPTQModel's 3-words-per-32-values layout.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from qwen_quant.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)


class FormatError(UserError):
    """A checkpoint or tensor that does not follow the GPTQ format (message says what to do)."""


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx without act-order: row i belongs to group i // g (all rows in group 0 for g = -1)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return torch.arange(in_features, dtype=torch.int32) // group_size


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"unsupported bits={bits}; use one of {SUPPORTED_BITS}")


def _pack_last(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned b-bit integers along the last axis (length a multiple of 32, or 32/b for b|32)."""
    n = values.shape[-1]
    per_word = 32 // bits if 32 % bits == 0 else None
    block = per_word if per_word else 32  # values per packing unit
    words_per_block = 1 if per_word else bits
    if n % block:
        raise FormatError(f"cannot pack {n} values of {bits} bits: length must be a multiple of {block}")
    v = values.astype(np.uint64).reshape(*values.shape[:-1], n // block, block)
    out = np.zeros((*values.shape[:-1], n // block, words_per_block), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for j in range(block):
        offset = bits * j
        word, shift = divmod(offset, 32)
        vj = v[..., j] & mask
        out[..., word] |= (vj << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:  # value straddles two words (only for b = 3)
            out[..., word + 1] |= vj >> np.uint64(32 - shift)
    out = out.reshape(*values.shape[:-1], (n // block) * words_per_block)
    return out.astype(np.uint32).view(np.int32)


def _unpack_last(packed: np.ndarray, bits: int, n: int | None = None) -> np.ndarray:
    """Inverse of _pack_last: int32 words along the last axis -> uint8/int16 values."""
    per_word = 32 // bits if 32 % bits == 0 else None
    block = per_word if per_word else 32
    words_per_block = 1 if per_word else bits
    w = packed.view(np.uint32).astype(np.uint64)
    nblocks = w.shape[-1] // words_per_block
    w = w.reshape(*w.shape[:-1], nblocks, words_per_block)
    out = np.zeros((*w.shape[:-1], block), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for j in range(block):
        word, shift = divmod(bits * j, 32)
        val = w[..., word] >> np.uint64(shift)
        if shift + bits > 32:
            val |= w[..., word + 1] << np.uint64(32 - shift)
        out[..., j] = val & mask
    out = out.reshape(*w.shape[:-2], nblocks * block)
    if n is not None:
        out = out[..., :n]
    return out.astype(np.int16)


def pack_qweight(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] integer codes (0 .. 2^b-1) -> qweight int32 [K*b/32, N] (packed along K)."""
    _check_bits(bits)
    arr = intweight.to(torch.int64).cpu().numpy().T  # pack along K: make K the last axis
    return torch.from_numpy(np.ascontiguousarray(_pack_last(arr, bits).T))


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int | None = None) -> torch.Tensor:
    """qweight int32 [K*b/32, N] -> codes int16 [K, N]."""
    _check_bits(bits)
    arr = _unpack_last(np.ascontiguousarray(qweight.cpu().numpy().T), bits, in_features)
    return torch.from_numpy(np.ascontiguousarray(arr.T))


def pack_qzeros(zeros: torch.Tensor, bits: int, v1: bool = True) -> torch.Tensor:
    """[G, N] true zero points -> qzeros int32 [G, N*b/32]. v1 stores zero-1 (masked to b bits)."""
    _check_bits(bits)
    z = zeros.to(torch.int64) - (1 if v1 else 0)
    z = z & ((1 << bits) - 1)
    return torch.from_numpy(_pack_last(z.cpu().numpy(), bits))


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int | None = None, v1: bool = True) -> torch.Tensor:
    """qzeros int32 [G, N*b/32] -> true zero points int16 [G, N] (v1: stored + 1)."""
    _check_bits(bits)
    z = torch.from_numpy(_unpack_last(qzeros.cpu().numpy(), bits, out_features))
    if v1:
        # v1 stores zero-1 masked to b bits; loaders add 1 back. A true zero of 0 wraps to 2^b-1 on
        # disk and is ambiguous, which is why our writer never emits zero 0 in v1 (see gptq.py).
        z = z + 1
    return z


def dequantize(qweight, qzeros, scales, g_idx, bits: int, in_features: int | None = None,
               v1: bool = True, dtype=torch.float32) -> torch.Tensor:
    """Packed GPTQ tensors -> dense weight [N, K] (nn.Linear layout) in `dtype`."""
    q = unpack_qweight(qweight, bits, in_features).to(torch.float64)
    n = scales.shape[1]
    z = unpack_qzeros(qzeros, bits, n, v1=v1).to(torch.float64)
    g = g_idx.long().cpu()
    s = scales.cpu().to(torch.float64)
    w = s[g] * (q - z[g])  # [K, N]
    return w.T.contiguous().to(dtype)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The keys of `quantization_config` that decide how tensors are read."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # "gptq" (v1 zeros) or "gptq_v2" (true zeros)

    @property
    def v1(self) -> bool:
        return self.checkpoint_format != "gptq_v2"

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        method = str(d.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise FormatError(f"quantization_config.quant_method is {method!r}, not 'gptq': this is not a GPTQ checkpoint")
        bits = int(d.get("bits", 4))
        _check_bits(bits)
        gs = int(d.get("group_size", 128))
        if gs != -1 and gs <= 0:
            raise FormatError(f"quantization_config.group_size={gs} is invalid (use -1 or a positive integer)")
        fmt = str(d.get("checkpoint_format", d.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise FormatError(f"checkpoint_format {fmt!r} is not supported (use 'gptq' or 'gptq_v2')")
        return cls(bits=bits, group_size=gs, desc_act=bool(d.get("desc_act", False)),
                   sym=bool(d.get("sym", True)), checkpoint_format=fmt)


def check_layer_tensors(name: str, qweight, qzeros, scales, g_idx, bits: int, group_size: int) -> tuple[int, int]:
    """Validate one layer's shapes and g_idx range; return (in_features, out_features)."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise FormatError(f"{name}: qweight/qzeros must be int32 (got {qweight.dtype}/{qzeros.dtype})")
    n = qweight.shape[1]
    k = qweight.shape[0] * 32 // bits
    if g_idx is not None:
        k = g_idx.shape[0]
    if qweight.shape[0] * 32 // bits < k or qweight.shape[0] != math.ceil(k * bits / 32):
        raise FormatError(f"{name}: qweight has {qweight.shape[0]} rows, expected {math.ceil(k * bits / 32)} for K={k}")
    if scales.shape[1] != n:
        raise FormatError(f"{name}: scales has {scales.shape[1]} columns, qweight {n}: checkpoint is inconsistent")
    if qzeros.shape[0] != scales.shape[0] or qzeros.shape[1] * 32 // bits < n:
        raise FormatError(f"{name}: qzeros shape {tuple(qzeros.shape)} does not match scales {tuple(scales.shape)}")
    if g_idx is not None and g_idx.numel():
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= scales.shape[0]:
            raise FormatError(f"{name}: g_idx values {lo}..{hi} outside the {scales.shape[0]} groups of scales")
    return k, n
