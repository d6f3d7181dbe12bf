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


def draw_spread(columns: Sequence[Sequence[float]]) -> dict:
    """How far one recipe's rows move between runs (calibration draws, machines), beyond the windows' noise.

    columns are k runs of one recipe scored on the same n windows. A two-way analysis of variance with the runs and
    the windows as factors (no replication): each window's value is its difficulty, plus the run's shift shared by
    every window (variance sigma_draw^2), plus the run x window interaction (sigma_window^2). A paired stderr between
    two runs sees only the interaction, sqrt(2 sigma_window^2 / n); a shift shared by all windows is invisible to it.
    ms_draw estimates sigma_window^2 + n sigma_draw^2 and ms_window sigma_window^2; F = ms_draw / ms_window tests
    sigma_draw = 0 (p: its upper tail on (k - 1, (k - 1)(n - 1)) degrees of freedom). sigma_draw is the moment
    estimate, 0 where ms_draw < ms_window. A contrast sum_i w_i * mean_i of single runs of different recipes then
    carries the variance sum_i w_i^2 * sigma_draw^2 beside its paired stderr's (`with_draws`)."""
    a = _two_way(columns)
    k, n, ms_draw, ms_window = a["k"], a["n"], a["ms_runs"], a["ms_resid"]
    df1, df2 = k - 1, (k - 1) * (n - 1)
    f = ms_draw / ms_window if ms_window > 0 else (math.inf if ms_draw > 0 else 0.0)   # identical runs: no shift
    return {"runs": k, "windows": n, "ms_draw": ms_draw, "ms_window": ms_window, "f": f, "df": [df1, df2],
            "p": f_upper_tail(f, df1, df2), "sigma_draw": math.sqrt(max(ms_draw - ms_window, 0.0) / n),
            "sigma_window": math.sqrt(ms_window)}


def _two_way(columns: Sequence[Sequence[float]]) -> dict:
    """The mean squares of a runs x windows table without replication: runs, windows, and their interaction
    (the residual), on k - 1, n - 1 and (k - 1)(n - 1) degrees of freedom."""
    k, n = len(columns), len(columns[0]) if columns else 0
    if k < 2 or n < 2 or any(len(c) != n for c in columns):
        raise ValueError("two or more runs scored on the same two or more windows are needed")
    grand = sum(map(sum, columns)) / (k * n)
    run_means = [sum(c) / n for c in columns]
    window_means = [sum(c[w] for c in columns) / k for w in range(n)]
    resid = sum((c[w] - rm - window_means[w] + grand) ** 2 for c, rm in zip(columns, run_means) for w in range(n))
    return {"k": k, "n": n, "grand": grand, "run_means": run_means,
            "ms_runs": n * sum((m - grand) ** 2 for m in run_means) / (k - 1),
            "ms_windows": k * sum((m - grand) ** 2 for m in window_means) / (n - 1),
            "ms_resid": resid / ((k - 1) * (n - 1))}


def replicated_contrast(differences: Sequence[Sequence[float]]) -> dict:
    """A change of recipe measured on k calibration draws, each draw made with and without it and scored on the
    same n windows: its effect averaged over draws and windows, with an error that counts both as samples.

    differences[j][w] is draw j's per-window contrast (e.g. with minus without, NLL) on window w. A paired stderr
    of one draw sees the windows only; how much the effect itself changes with the draw is the spread between the
    draws' means. In the two-way random-effects model (draw, window, and their interaction) the grand mean's
    variance is tau_draw^2 / k + tau_window^2 / n + sigma_e^2 / (k n) (tau: how far the effect itself moves from
    draw to draw and from window to window; a draw's shift of the rows it makes with and without the change, shared,
    cancels in the difference), estimated by (MS_draws + MS_windows - MS_e) / (k n) from the mean squares'
    expectations; a component whose estimate is negative is taken as 0 (its mean square then drops out, with MS_e's
    share), and the degrees of freedom are Satterthwaite's. t = mean / stderr, p its two-sided tail (t^2 is F on
    (1, df)). per_draw: each draw's own effect (its mean over windows)."""
    a = _two_way(differences)
    k, n, ms_d, ms_w, ms_e = a["k"], a["n"], a["ms_runs"], a["ms_windows"], a["ms_resid"]
    # the variance of the grand mean, k n x: c_d MS_draws + c_w MS_windows + c_e MS_e (kept components only)
    c_d, c_w = float(ms_d > ms_e), float(ms_w > ms_e)
    terms = [(c_d, ms_d, k - 1), (c_w, ms_w, n - 1), (1.0 - c_d - c_w, ms_e, (k - 1) * (n - 1))]
    var_kn = sum(c * ms for c, ms, _ in terms)
    stderr = math.sqrt(max(var_kn, 0.0) / (k * n))
    denom = sum((c * ms) ** 2 / df for c, ms, df in terms if c)
    df = var_kn ** 2 / denom if denom > 0 else math.inf
    t = a["grand"] / stderr if stderr > 0 else (math.copysign(math.inf, a["grand"]) if a["grand"] else 0.0)
    p = 1.0 if t == 0 else (0.0 if math.isinf(t) else f_upper_tail(t * t, 1, df))
    return {"mean": a["grand"], "stderr": stderr, "df": df, "t": t, "p": p, "draws": k, "windows": n,
            "per_draw": a["run_means"]}


def spread_ratio(runs_a: Sequence[Sequence[float]], runs_b: Sequence[Sequence[float]]) -> dict:
    """Does recipe A move less with its draw than recipe B? Each is k runs on the same n windows (draw_spread);
    F = B's ms_draw / A's ms_draw on (k_b - 1, k_a - 1) df tests equal run-to-run spread (each mean square is
    sigma_window^2 + n sigma_draw^2 of its recipe), p two-sided. Above 1: A moves less."""
    a, b = draw_spread(runs_a), draw_spread(runs_b)
    df1, df2 = b["df"][0], a["df"][0]
    f = b["ms_draw"] / a["ms_draw"] if a["ms_draw"] > 0 else math.inf
    upper = f_upper_tail(f, df1, df2)
    return {"f": f, "df": [df1, df2], "p": min(1.0, 2 * min(upper, 1.0 - upper)),
            "sigma_draw": [a["sigma_draw"], b["sigma_draw"]]}


def with_draws(stderr: float, weights: Sequence[float], sigma_draw: float) -> float:
    """A paired contrast's stderr widened by the run-to-run shift of each single run it weighs (draw_spread)."""
    return math.sqrt(stderr ** 2 + sum(w * w for w in weights) * sigma_draw ** 2)


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test of items one model got right and the other wrong (gained) against the reverse
    (lost): under no difference each such item is a fair coin, so p = P(a split at least this uneven)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def f_upper_tail(f: float, df1: float, df2: float) -> float:
    """P(F > f) for Fisher's F on (df1, df2) degrees of freedom: the regularized incomplete beta
    I_x(df2 / 2, df1 / 2) at x = df2 / (df2 + df1 f); real degrees of freedom (Satterthwaite's) work as well."""
    if f <= 0:
        return 1.0
    if math.isinf(f):
        return 0.0
    return _betainc(df2 / 2, df1 / 2, df2 / (df2 + df1 * f))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) by its continued fraction (modified Lentz), taken on the
    side where it converges fast (x < (a + 1) / (a + b + 2)), the other side by symmetry."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return math.exp(log_front) * frac / a
