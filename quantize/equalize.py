"""Activation-aware channel scales (AWQ's scale search; Lin et al., MLSys 2024), folded into the model before GPTQ.

A linear's input channel j can be multiplied by s_j in its weights and divided by s_j where the input is made (the
RMSNorm before q/k/v and gate/up, up_proj's output row j before down_proj): the full-precision model computes the
same function, but channels whose activations are large get weights that are large within their quantization
group, so their rounding error shrinks relative to the signal they carry. For each group of linears sharing an
input, s = mean|x|^alpha / w^(1 - alpha) (w: each channel's weights relative to their group's largest; AutoAWQ's
"duo" scales), with alpha in [0, 1) searched on a grid for the lowest output error of the round-to-nearest weights
on the calibration inputs. One scalar per layer is all the calibration decides (GPTQ's error compensation decides a
whole K x K correction): AWQ's paper reports its scales less sensitive to the calibration set's domain than GPTQ.

No scaling (s = 1) is a candidate too, so on the calibration data the search never does worse than not scaling. On
Qwen2.5-Coder-1.5B activations alone (s = mean|x|^alpha, the paper's form) lost to no scaling in 11 of the first 15
searches; with both forms searched, end to end, it did not pay there and its objective fits the calibration's
attention-sink tokens (reports/qwen2.5-coder-1.5b-domains/DIAGNOSIS.md, section 10): opt-in; --awq-drop-massive
leaves each sample's massive tokens out of the statistics the search sees (pipeline.equalize_block). The checkpoint
format does not change: the scales live in the 16-bit norm weights and in up_proj's weights before it is quantized.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from qwen_quant.errors import UserError
from qwen_quant.models.layouts import Layout
from qwen_quant.quantize import gptq

GRID = 20  # alpha in {0, 0.05, ..., 0.95}, AWQ's grid
# Output rows per group that the search scores (strided, spread over the group's linears by their sizes). Each
# output row is quantized on its own, so a subset estimates the group's error without bias; the score costs
# rows x K^2 per alpha, which on a CPU is the search's whole cost (down_proj: K = 8960 on Qwen2.5-1.5B).
SEARCH_ROWS = 256


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one input, and the module that makes it (a norm, or the linear before them)."""
    source: str
    linears: tuple[str, ...]


def scale_groups(layout: Layout, block: nn.Module) -> list[ScaleGroup]:
    """The block's foldable pairs, in the order it computes them. v_proj -> o_proj only where v's outputs are o's
    inputs one to one (not with grouped-query attention, where each v head feeds several o columns)."""
    names = layout.names
    if not names:
        raise UserError(f"--awq-scales folds scales into the norms and linears a layout names; {layout.name} has "
                        f"none: add a layout to models/layouts.py or drop --awq-scales")
    groups = [ScaleGroup(names["attn_norm"], (names["qkv"],) if "qkv" in names else
                         (names["q"], names["k"], names["v"]))]
    if "v" in names and block.get_submodule(names["v"]).out_features == block.get_submodule(names["o"]).in_features:
        groups.append(ScaleGroup(names["v"], (names["o"],)))
    groups.append(ScaleGroup(names["mlp_norm"], (names["gate"], names["up"])))
    groups.append(ScaleGroup(names["up"], (names["down"],)))
    return groups


def weight_size(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """How large each input channel's weights are within their quantization groups [K]: |w| over its group's
    largest |w|, averaged over the output rows of all the linears (AWQ's weight statistic)."""
    w = torch.cat([x.detach().float() for x in weights]).abs()
    gs = w.shape[1] if group_size == -1 else group_size
    groups = w.view(w.shape[0], -1, gs)
    return (groups / groups.amax(dim=2, keepdim=True).clamp_min(1e-6)).view(w.shape).mean(dim=0)


def scales_at(mean_abs: torch.Tensor, w_size: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's scales for one alpha: mean|x|^alpha / w_size^(1 - alpha) per input channel (large inputs and small
    weights scaled up), over their geometric mean so the weights keep their overall size and the norms' weights
    stay in 16-bit range."""
    s = (mean_abs.float().pow(alpha) / (w_size.float().pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def _scored_rows(weights: list[torch.Tensor], budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [R, K] strided from each weight in proportion to its output size, weight of each row's score)."""
    total = sum(w.shape[0] for w in weights)
    rows, factors = [], []
    for w in weights:
        take = max(1, min(w.shape[0], round(budget * w.shape[0] / total)))
        idx = torch.linspace(0, w.shape[0] - 1, take, device=w.device).round().long()
        rows.append(w[idx].float())
        factors.append(torch.full((take,), w.shape[0] / take, device=w.device))
    return torch.cat(rows), torch.cat(factors)


def output_error(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, bits: int, group_size: int,
                 sym: bool) -> torch.Tensor:
    """Per row: ||X w - X Q(w s) / s||^2 up to H's factor (H = 2 X^T X / n of the unscaled inputs)."""
    d = w - gptq.rtn_quantize(w * s, bits, group_size, sym).weight / s
    return ((d @ h) * d).sum(dim=1)


def search_scales(weights: list[torch.Tensor], h: torch.Tensor, mean_abs: torch.Tensor, bits: int, group_size: int,
                  sym: bool, grid: int = GRID, budget: int = SEARCH_ROWS) -> tuple[torch.Tensor, float | None, float]:
    """(scales, alpha, error at them over error without scaling) for linears that share one input (mean|x| per
    channel, Hessian h): the candidate with the lowest round-to-nearest output error among no scaling (alpha
    None) and the grid's alphas. No scaling is a candidate because the grid does not hold it (alpha 0 scales by the
    weights alone), and on Qwen2.5-Coder-1.5B it won in about a quarter of the layers."""
    w, factor = _scored_rows(weights, budget)
    h = h.float()
    w_size = weight_size(weights, group_size)

    def error(s):
        return float((output_error(w, h, s, bits, group_size, sym).double() * factor.double()).sum())

    unscaled = error(torch.ones_like(w_size))
    best_s, best_alpha, best = torch.ones_like(w_size), None, unscaled
    for i in range(grid):
        s = scales_at(mean_abs, w_size, i / grid)
        e = error(s)
        if e < best:
            best_s, best_alpha, best = s, i / grid, e
    return best_s, best_alpha, best / unscaled if unscaled > 0 else 1.0


@torch.no_grad()
def fold(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the group's input channels by s in its linears' weights and divide them by s at the source (a
    norm's weight and bias, or a linear's output rows and bias): the block computes the same function."""
    source = block.get_submodule(group.source)
    s = s.to(source.weight.device)
    view = s.view(-1, 1) if isinstance(source, nn.Linear) else s
    source.weight.div_(view.to(source.weight.dtype))
    if getattr(source, "bias", None) is not None:
        source.bias.div_(s.to(source.bias.dtype))
    for name in group.linears:
        lin = block.get_submodule(name)
        lin.weight.mul_(s.to(lin.weight.device, lin.weight.dtype))
