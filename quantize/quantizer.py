"""Per-group scale and zero point for b-bit uniform quantization (the GPTQ paper's `Quantizer`).

For a group of weights x (one row per output feature, the group's input columns along dim 1):
    code = clamp(round(x / scale) + zero, 0, 2^b - 1),   dequantized = scale * (code - zero)
Scales are rounded to float16 here, because checkpoints store them as float16: what GPTQ feeds
back as error and what `QuantResult.weight` holds is then exactly what a loader evaluates.
"""

from __future__ import annotations

import dataclasses

import torch

from qwen_quant.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)

# Range search (`mse=True`), as in the reference code: shrink the range in steps of 1/GRID down to
# (1 - MAX_SHRINK) of the full range and keep the candidate with the lowest sum |error|^NORM per row.
# NORM 2.4 is the reference code's choice: a little more weight on large errors than plain MSE.
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4

# float16 limits: a scale must survive the float16 round trip as a finite, non-zero number.
_FP16_TINY = 2.0 ** -24
_FP16_MAX = 65504.0


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise UserError(f"unsupported bits={bits}; use one of {', '.join(map(str, SUPPORTED_BITS))}")
    return 2 ** bits - 1


@dataclasses.dataclass
class GroupParams:
    """Scale and true zero point per output row of one group ([N] each, float scale / float zero)."""

    scale: torch.Tensor
    zero: torch.Tensor


def quantize_codes(x: torch.Tensor, params: GroupParams, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of x [N] or [N, g] under per-row params."""
    scale, zero = params.scale, params.zero
    if x.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize_codes(codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
    scale, zero = params.scale, params.zero
    if codes.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return scale * (codes - zero)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round to what a float16 checkpoint stores, never 0 or inf."""
    return scale.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(scale.dtype)


def _params_for_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool) -> GroupParams:
    """Scale/zero that map [xmin, xmax] (xmin <= 0 <= xmax per row) onto codes 0 .. maxq."""
    if sym:
        scale = _fp16_scale(2 * xmax / maxq)
        zero = torch.full_like(scale, (maxq + 1) / 2)
        return GroupParams(scale, zero)
    scale = _fp16_scale((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale)
    # The v1 checkpoint format stores zero-1 in b bits, so a true zero of 0 would be written as
    # 2^b-1 and read back as 2^b: never emit it. Rows whose range starts at 0 use zero 1 and a scale
    # that still reaches xmax with the remaining maxq-1 steps.
    # (torch.where, not a Python `if`: no device sync on GPU)
    at_zero = zero < 1
    scale = torch.where(at_zero, _fp16_scale(xmax / (maxq - 1)), scale)
    return GroupParams(scale, zero.clamp(1, maxq))


def _full_range(x: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zeros)
    xmax = torch.maximum(x.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    # An all-zero row gets an arbitrary non-degenerate range (its codes all land on the zero point).
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    return xmin, xmax


def find_params(x: torch.Tensor, bits: int, sym: bool = True, mse: bool = False) -> GroupParams:
    """Per-row scale/zero for the group x [N, g] (g input columns of N output rows)."""
    maxq = check_bits(bits)
    xmin, xmax = _full_range(x, sym)
    best = _params_for_range(xmin, xmax, maxq, sym)
    if not mse:
        return best
    best_err = torch.full_like(xmin, float("inf"))
    for step in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        shrink = 1 - step / MSE_GRID
        cand = _params_for_range(shrink * xmin, shrink * xmax, maxq, sym)
        err = (dequantize_codes(quantize_codes(x, cand, maxq), cand) - x).abs_().pow_(MSE_NORM).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = GroupParams(torch.where(better, cand.scale, best.scale), torch.where(better, cand.zero, best.zero))
    return best
