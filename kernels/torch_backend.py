"""The torch backend: dequantize-then-matmul. The reference path, and the CPU path.

Unpacking is vectorized torch (no numpy), so the same code runs on any device. Nothing big is
cached per call: the dense weight exists only while one matmul runs.
"""

from __future__ import annotations

import torch

from qwen_quant.kernels.format import SUPPORTED_BITS

NAME = "torch"


def available() -> tuple[bool, str]:
    return True, "always available"


def supports(in_features: int, out_features: int, bits: int, group_size: int, desc_act: bool) -> bool:
    return bits in SUPPORTED_BITS


def unpack_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 words packed along dim 0 (GPTQ bit stream) -> int32 values [count, ...] on packed's device."""
    if 32 % bits == 0:  # whole values per word: value j of a word sits in bits b*j .. b*j+b-1
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        shape = (1, per_word) + (1,) * (packed.dim() - 1)
        values = (packed.unsqueeze(1) >> shifts.view(shape)) & ((1 << bits) - 1)
        return values.reshape(-1, *packed.shape[1:])[:count]
    # 3 bits: 32 values span `bits` words and may straddle a word boundary; read 64-bit windows
    words = packed.to(torch.int64) & 0xFFFFFFFF
    pad = (-words.shape[0]) % bits
    if pad:
        words = torch.cat([words, words.new_zeros(pad, *words.shape[1:])])
    blocks = words.reshape(-1, bits, *words.shape[1:])
    blocks = torch.cat([blocks, blocks.new_zeros(blocks.shape[0], 1, *blocks.shape[2:])], dim=1)
    offsets = torch.arange(32, device=packed.device) * bits
    word_idx, shift = offsets // 32, offsets % 32
    lo, hi = blocks[:, word_idx], blocks[:, word_idx + 1]
    shape = (1, 32) + (1,) * (packed.dim() - 1)
    window = lo | (hi << 32)
    values = (window >> shift.view(shape)) & ((1 << bits) - 1)
    return values.reshape(-1, *packed.shape[1:])[:count].to(torch.int32)


def unpack_columns(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 words packed along the last dim -> int32 values [..., count]."""
    return unpack_rows(packed.transpose(0, -1).contiguous(), bits, count).transpose(0, -1).contiguous()


def true_zeros(qzeros: torch.Tensor, bits: int, out_features: int, v1: bool) -> torch.Tensor:
    """qzeros -> int32 true zero points [G, N]. v1 stores zero-1 (masked), so add 1 back."""
    z = unpack_columns(qzeros, bits, out_features)
    return z + 1 if v1 else z


def prepare(qweight, qzeros, scales, g_idx, bits, group_size, v1: bool = True) -> dict:
    """Keep references to the checkpoint tensors (no copy) plus the small unpacked zeros."""
    in_features = g_idx.shape[0]
    eff_group = in_features if group_size == -1 else group_size
    contiguous = bool(torch.equal(g_idx.long().cpu(), torch.arange(in_features) // max(eff_group, 1)))
    return {
        "contiguous_groups": eff_group if contiguous else None,
        "qweight": qweight,
        "zeros": true_zeros(qzeros, bits, scales.shape[1], v1),
        "scales": scales,
        "g_idx": g_idx.long(),
        "bits": bits,
        "in_features": in_features,
    }


def dequantize_weight(state: dict, dtype: torch.dtype) -> torch.Tensor:
    """Dense W^T [K, N] in `dtype` (computed in float32, rounded once)."""
    codes = unpack_rows(state["qweight"], state["bits"], state["in_features"])
    g = state["g_idx"]
    w = (codes - state["zeros"][g]).to(torch.float32) * state["scales"][g].to(torch.float32)
    return w.to(dtype)


GROUPED_MAX_ROWS = 16  # above this the [G, M, N] partial sums cost more than the dense weight


def grouped_matmul(x: torch.Tensor, state: dict) -> torch.Tensor:
    """Few rows, contiguous groups: y = sum_g s_g * (x_g @ q_g - z_g * sum(x_g)) in float32.

    Skips building the dense weight (no per-element scale/zero gathers): ~2-3x faster per decode
    step on the CPU. Only the codes are converted to float.
    """
    group = state["contiguous_groups"]
    codes = unpack_rows(state["qweight"], state["bits"], state["in_features"]).to(torch.float32)
    m, k = x.shape
    full = (k // group) * group
    sums, x_sums = [], []
    if full:
        xg = x[:, :full].reshape(m, full // group, group).transpose(0, 1)  # [G, M, g]
        sums.append(torch.bmm(xg, codes[:full].view(full // group, group, -1)))
        x_sums.append(xg.sum(-1, keepdim=True))
    if full < k:  # partial last group
        sums.append((x[:, full:] @ codes[full:]).unsqueeze(0))
        x_sums.append(x[:, full:].sum(-1, keepdim=True).unsqueeze(0))
    partial, x_sum = torch.cat(sums), torch.cat(x_sums)
    scales = state["scales"].to(torch.float32)[:, None, :]
    zeros = state["zeros"].to(torch.float32)[:, None, :]
    return (scales * (partial - zeros * x_sum)).sum(0)


def matmul(x2d: torch.Tensor, state: dict) -> torch.Tensor:
    # CPU: float32 math (fast and exact enough everywhere); GPU: the activation dtype (cuBLAS).
    compute = torch.float32 if x2d.device.type == "cpu" else x2d.dtype
    if compute == torch.float32 and state["contiguous_groups"] and x2d.shape[0] <= GROUPED_MAX_ROWS:
        return grouped_matmul(x2d.to(torch.float32), state).to(x2d.dtype)
    return (x2d.to(compute) @ dequantize_weight(state, compute)).to(x2d.dtype)
