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
from qwen_quant.kernels.format import SUPPORTED_BITS


# Range search (`mse=True`), as in the reference code: shrink the range in steps of 1/GRID down to
# (1 - MAX_SHRINK) of the full range and keep the candidate with the lowest sum |error|^NORM per row.
# NORM 2.4 is the reference code's choice: a little more weight on large errors than plain MSE.
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4
# The 80 grid points are searched coarse to fine: every MSE_COARSE-th point first (the full range
# included), then the grid points within MSE_COARSE-1 of each row's best coarse point. 26 error
# evaluations instead of 80; it finds the exhaustive optimum unless the error curve has a dip
# narrower than the coarse step (MSE_COARSE = 1 searches exhaustively).
MSE_COARSE = 4
# Elements of one [candidates, N, g] chunk of the range search: 4 MiB in float32, so its temporaries
# stay in cache (larger chunks were slower on the CPU).
MSE_CHUNK_ELEMENTS = 2 ** 20

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
    if not mse:
        return _params_for_range(xmin, xmax, maxq, sym)
    steps = int(MSE_MAX_SHRINK * MSE_GRID)
    coarse = torch.arange(0, steps, MSE_COARSE, device=x.device)[:, None].expand(-1, x.shape[0])  # [c, N]
    best_step, best = _best_shrink(x, xmin, xmax, coarse, maxq, sym)
    if MSE_COARSE == 1:
        return best
    offsets = torch.arange(-(MSE_COARSE - 1), MSE_COARSE, device=x.device)[:, None]
    fine = (best_step[None, :] + offsets).clamp(0, steps - 1)  # [2*MSE_COARSE-1, N], includes the coarse best
    return _best_shrink(x, xmin, xmax, fine, maxq, sym)[1]


def _best_shrink(x, xmin, xmax, steps, maxq, sym) -> tuple[torch.Tensor, GroupParams]:
    """Per row, the grid step among `steps` [c, N] with the lowest error, and its params.

    All candidates are evaluated together on [c, N, g] tensors (in chunks that stay in cache): a few
    large ops instead of a small op sequence per candidate. argmin keeps the first minimum, so a tie
    keeps the earlier (wider) candidate, as the reference loop's strict "<" does.
    """
    chunk = max(1, MSE_CHUNK_ELEMENTS // max(1, x.numel()))
    errors, scales, zeros = [], [], []
    for s in range(0, steps.shape[0], chunk):
        f = 1 - steps[s:s + chunk].to(x.dtype) / MSE_GRID  # [c, N] shrink factors
        cand = _params_for_range(f * xmin, f * xmax, maxq, sym)
        scale, zero = cand.scale.unsqueeze(2), cand.zero.unsqueeze(2)
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        errors.append(q.sub_(zero).mul_(scale).sub_(x).abs_().pow_(MSE_NORM).sum(dim=2))
        scales.append(cand.scale)
        zeros.append(cand.zero)
    pick = torch.cat(errors).argmin(dim=0, keepdim=True)  # [1, N]
    return (steps.gather(0, pick)[0],
            GroupParams(torch.cat(scales).gather(0, pick)[0], torch.cat(zeros).gather(0, pick)[0]))
