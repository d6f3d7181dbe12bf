"""Paired comparisons of models scored on the same items: differences and loss ratios with their errors.

Two models evaluated on the same perplexity windows (or questions) share each window's difficulty,
so the error of their difference comes from the per-window differences, not from either model's
own spread: much smaller, and the one that says whether they really differ. Perplexity is
exp(mean NLL over windows); its functions of several models are given standard errors by the delta
method over the windows' joint (co)variance.
"""

from __future__ import annotations

import math
from typing import Sequence


def _means_and_cov(columns: Sequence[Sequence[float]]) -> tuple[list[float], list[list[float]]]:
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError("paired comparisons need the same windows for every model")
    means = [sum(c) / n for c in columns]
    cov = [[sum((a - ma) * (b - mb) for a, b in zip(ca, cb)) / (n - 1) if n > 1 else math.nan
            for cb, mb in zip(columns, means)] for ca, ma in zip(columns, means)]
    return means, cov


def _delta_method(grad: Sequence[float], cov: list[list[float]], n: int) -> float:
    var = sum(gi * cij * gj for gi, row in zip(grad, cov) for cij, gj in zip(row, grad)) / n
    return math.sqrt(max(var, 0.0)) if n > 1 else math.nan


def perplexity_difference(ref_nlls: Sequence[float], nlls: Sequence[float]) -> tuple[float, float]:
    """ppl(nlls) - ppl(ref_nlls) over the same windows (per-window mean NLLs), and its paired stderr."""
    (m_ref, m), cov = _means_and_cov([ref_nlls, nlls])
    p_ref, p = math.exp(m_ref), math.exp(m)
    return p - p_ref, _delta_method([-p_ref, p], cov, len(nlls))


def contrast(columns: Sequence[Sequence[float]], weights: Sequence[float]) -> tuple[float, float]:
    """sum_i weights[i] * mean(columns[i]) over the same windows, and its paired stderr.

    The per-window contrast is formed first and its spread gives the error, so what every model shares (a
    window's difficulty) cancels: (-1, 1) is B's mean NLL minus A's; (-0.5, 0.5, -0.5, 0.5) is a 2x2 design's
    main effect, the average of two paired differences."""
    if len(columns) != len(weights) or not columns:
        raise ValueError("one weight per column")
    means, cov = _means_and_cov(columns)
    return sum(w * m for w, m in zip(weights, means)), _delta_method(weights, cov, len(columns[0]))


def loss_ratio(fp_nlls: Sequence[float], baseline_nlls: Sequence[float],
               nlls: Sequence[float]) -> tuple[float, float] | None:
    """(ppl - ppl_fp) / (ppl_baseline - ppl_fp) over the same windows, and its paired stderr.

    With RTN as the baseline this is the verdict on a quantizer: below 1 it loses less than
    round-to-nearest. None when the baseline loses nothing (the ratio is undefined)."""
    (mf, mb, mq), cov = _means_and_cov([fp_nlls, baseline_nlls, nlls])
    pf, pb, pq = math.exp(mf), math.exp(mb), math.exp(mq)
    gap = pb - pf
    if gap == 0:
        return None
    ratio = (pq - pf) / gap
    # d ratio / d (mf, mb, mq)
    grad = [pf * (pq - pb) / gap ** 2, -(pq - pf) * pb / gap ** 2, pq / gap]
    return ratio, _delta_method(grad, cov, len(nlls))


def interval95(delta: float, stderr: float | None) -> list[float] | None:
    """The normal-approximation 95% interval of a paired difference."""
    return None if stderr is None else [delta - 1.96 * stderr, delta + 1.96 * stderr]


def interval_vs_goal(interval: list[float] | None, points: float = 2.0) -> str:
    """Whether these items can tell a "within +-points" goal apart: the whole interval inside it, outside it,
    or across its edge (then more items are needed for a verdict)."""
    if interval is None:
        return "n/a"
    lo, hi = interval
    if -points <= lo and hi <= points:
        return "inside"
    if hi < -points or lo > points:
        return "outside"
    return "across (more items needed)"
