"""GPTQ (Frantar et al. 2022, Algorithm 1) and round-to-nearest, for one linear layer.

W is the nn.Linear weight [N, K] (out, in). H = 2 X X^T / n is the Hessian of the layer's squared
output error over the calibration inputs X [K, n]. GPTQ quantizes the input columns of W one at a
time, in order, and spreads each column's rounding error over the columns not yet quantized using
the upper Cholesky factor of H^-1; updates are applied lazily, a block of columns at a time.
Everything is computed in float32 (float64 when W is float64, for tests), on W's device.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from qwen_quant.errors import UserError
from qwen_quant.quantize.quantizer import GroupParams, check_bits, find_params, quantize_codes

# If the Cholesky factorization fails, the damping is multiplied by DAMP_STEP up to DAMP_TRIES
# times (0.01 -> 0.03 -> ... -> 0.81 of the mean diagonal) before the layer falls back to RTN.
DAMP_STEP = 3.0
DAMP_TRIES = 5


@dataclasses.dataclass
class QuantResult:
    """One quantized layer. Codes are in ORIGINAL input-row order; g_idx maps each row to its group.

    weight[n, k] == scales[g_idx[k], n] * (codes[k, n] - zeros[g_idx[k], n]), with scales already
    rounded to float16, so `weight` is exactly what a loader of the float16 checkpoint computes.
    """

    codes: torch.Tensor  # int32 [K, N], 0 .. 2^b-1
    scales: torch.Tensor  # float32 [G, N] (float16-representable)
    zeros: torch.Tensor  # int32 [G, N], true zero points
    g_idx: torch.Tensor  # int32 [K]
    weight: torch.Tensor | None  # float32 [N, K], dequantized; None once a caller dropped it (the checkpoint needs none)
    damp_used: float  # damping actually used, as a fraction of mean(diag(H)) (last one tried on fallback)
    fallback: str | None  # None, or "rtn" when no damping made H^-1 factorizable
    seconds: float

    def split(self, rows: list[int]) -> list["QuantResult"]:
        """One result per consecutive slice of output rows, sizes `rows` (the inverse of quantizing
        linears that share an input stacked along N: GPTQ treats every output row on its own, given
        H, so the slices are exactly what quantizing each linear alone gives). Seconds are shared by rows."""
        if sum(rows) != self.weight.shape[0]:
            raise ValueError(f"row sizes {rows} do not add up to {self.weight.shape[0]} output rows")
        out, start, total = [], 0, self.weight.shape[0]
        for n in rows:
            cols = slice(start, start + n)
            out.append(QuantResult(self.codes[:, cols].contiguous(), self.scales[:, cols].contiguous(),
                                   self.zeros[:, cols].contiguous(), self.g_idx.clone(), self.weight[cols].contiguous(),
                                   self.damp_used, self.fallback, self.seconds * n / total))
            start += n
        return out


GRAM_BLOCK = 1024  # columns per block of the triangular X^T X: large enough for full-speed matrix products


class HessianAccumulator:
    """Accumulates H = 2 X X^T / n in float32 over all calibration tokens of one layer's input.

    It also measures how unevenly the input's size is spread over the tokens (`input_peak`): each batch's
    largest token norm over its median token norm. Layers with massive activations (a few tokens, such as the
    attention sink at position 0, many times the typical norm) show it in every batch."""

    def __init__(self, in_features: int, device: torch.device | str | None = None, spread: bool = False):
        self.in_features = in_features
        self.tokens = 0
        self._xtx = None if device is None else torch.zeros(in_features, in_features, device=device)
        self._peaks: list[float] = []
        self.dropped = 0  # tokens add_batch's drop_above left out
        self._abs_sum = None  # sum over tokens of |x| per input channel, for `mean_abs` (AWQ's statistic)
        # spread: also keep the sum over batches of each batch's own Hessian squared, element-wise, for
        # `shrinkage` (one more K x K matrix, one more element-wise pass per batch)
        self._spread = spread
        self._h2 = None
        self.batches = 0
        # X^T X is symmetric: wide layers accumulate only its upper triangle, in column blocks (about half the
        # flops of the full product, the largest cost of calibrating a wide down_proj on a CPU); hessian() mirrors
        self._upper_only = not spread and in_features >= 2 * GRAM_BLOCK

    def _rows(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] as float32 token rows [n, K], padding tokens (mask False) left out."""
        if x.shape[-1] != self.in_features:
            raise UserError(f"layer input has {x.shape[-1]} features, expected {self.in_features}")
        rows = x.reshape(-1, self.in_features)
        if mask is not None:
            keep = mask.reshape(-1).to(device=rows.device, dtype=torch.bool)
            if keep.numel() != rows.shape[0]:
                raise UserError(f"mask has {keep.numel()} entries for {rows.shape[0]} tokens: pass the attention mask of this batch")
            rows = rows[keep]
        return rows.to(torch.float32)  # float16 activations would overflow in X X^T

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None, drop_above: float = 0.0) -> None:
        """x [..., K] layer inputs; mask [...] bool, False for padding tokens (they are left out). drop_above > 0
        also leaves out the tokens whose norm is over drop_above x the batch's median token norm (the attention-sink
        tokens where massive activations live; counted in `dropped`), after input_peak has seen them."""
        rows = self._rows(x, mask)
        if rows.shape[0] > 1:
            norms = rows.norm(dim=1)
            median = norms.median().clamp_min(torch.finfo(torch.float32).tiny)
            self._peaks.append(float(norms.max() / median))
            if drop_above > 0:
                keep = norms <= drop_above * median
                self.dropped += int((~keep).sum())
                rows = rows[keep]
        if self._xtx is None:
            self._xtx = torch.zeros(self.in_features, self.in_features, device=rows.device)
        if self._spread and rows.shape[0]:
            own = rows.T @ rows
            self._xtx += own
            own.mul_(2.0 / rows.shape[0])  # this batch's own H
            self._h2 = own.mul_(own) if self._h2 is None else self._h2.addcmul_(own, own)
            self.batches += 1
        elif self._upper_only:
            for start in range(0, self.in_features, GRAM_BLOCK):
                stop = min(start + GRAM_BLOCK, self.in_features)
                self._xtx[start:stop, start:].addmm_(rows[:, start:stop].T, rows[:, start:])
        else:
            self._xtx.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]
        abs_sum = rows.abs().sum(dim=0)
        self._abs_sum = abs_sum if self._abs_sum is None else self._abs_sum.add_(abs_sum)

    def input_peak(self) -> float:
        """The median over batches (calibration samples, as the pipeline feeds them) of a batch's largest token
        norm over its median token norm: ~1.2-3 for ordinary layers, 4-20 where massive activations live. The
        median, not the max, so one odd sample or a longer calibration does not move it."""
        if not self._peaks:
            return 0.0
        return float(torch.tensor(self._peaks).median())

    def mean_abs(self) -> torch.Tensor:
        """Mean |x| of each input channel over all tokens [K] (AWQ's measure of which channels matter)."""
        if self.tokens == 0:
            raise UserError("no calibration tokens reached this layer: give more calibration text")
        return self._abs_sum / self.tokens

    def shrinkage(self) -> float:
        """Ledoit-Wolf's shrinkage intensity toward the diagonal (Ledoit & Wolf 2004; Schaefer & Strimmer 2005,
        target D): the estimated variance of H's off-diagonal entries over their squared size, in [0, 1].

        The unit of sampling is the batch (a calibration sample), not the token: tokens of one text are
        correlated, and counting them as independent would call a 512-token sample 512 observations. So
        Var(H_ij) is estimated from the spread of the batches' own Hessians H_b: var_b(H_b,ij) / batches.
        Few or heterogeneous samples give a large intensity; many similar ones drive it to 0 (needs spread=True)."""
        if not self._spread:
            raise RuntimeError("shrinkage needs HessianAccumulator(..., spread=True)")
        H = self.hessian()
        if self.batches < 2:
            return 1.0  # one sample says nothing about how its correlations vary: trust none of them
        n = self.batches
        var = (self._h2 / n - H * H).clamp_min_(0).div_(n - 1)  # variance of the mean of n batch Hessians
        num = float(var.sum(dtype=torch.float64) - torch.diagonal(var).sum(dtype=torch.float64))
        den = float((H * H).sum(dtype=torch.float64) - (torch.diagonal(H) ** 2).sum(dtype=torch.float64))
        return 1.0 if den <= 0 else min(1.0, num / den)

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise UserError("no calibration tokens reached this layer: give more calibration text")
        H = self._xtx * (2.0 / self.tokens)
        if self._upper_only:
            H.triu_()
            H += H.triu(1).T
        return H


class AsymmetricAccumulator(HessianAccumulator):
    """H = 2 X~ X~^T / n and D = 2 (X - X~) X~^T / n, for asymmetric calibration (GPTAQ, Li et al. 2025).

    X~ are the layer's inputs in the model being quantized (earlier layers already quantized), X the
    same tokens' inputs in the full-precision model. D is what `asymmetric_target` needs to aim the
    layer at the fp model's outputs W X rather than at W X~.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, spread: bool = False):
        super().__init__(in_features, device, spread)
        self._dxt = None if device is None else torch.zeros(in_features, in_features, device=device)

    def add_pair(self, x: torch.Tensor, x_fp: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x [..., K] inputs in the quantized model, x_fp the same tokens' inputs in the fp model."""
        if x.shape != x_fp.shape:
            raise UserError(f"quantized-model inputs {tuple(x.shape)} and fp-model inputs {tuple(x_fp.shape)} differ")
        rows, rows_fp = self._rows(x, mask), self._rows(x_fp.to(x.device), mask)
        self.add_batch(rows)
        if self._dxt is None:
            self._dxt = torch.zeros(self.in_features, self.in_features, device=rows.device)
        self._dxt.addmm_((rows_fp - rows).T, rows)

    def asymmetry(self) -> torch.Tensor:
        self.hessian()  # the same "no tokens" error
        return self._dxt * (2.0 / self.tokens)


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, alpha: float = 1.0,
                      damp: float = 0.01, shrink: float = 0.0) -> torch.Tensor:
    """The weights GPTQ should aim at so that Q X~ matches the fp model's W X (asymmetric calibration).

    With C = X X~^T = D + H: ||Q X~ - W X||^2 = ||(Q - W') X~||^2 + const for W' = W C H^-1 = W + W D H^-1,
    because the residual W' X~ - W X is orthogonal to the rows of X~. So GPTQ on (W', H) solves the
    asymmetric problem exactly; H is damped (and shrunk) here as GPTQ treats it, and alpha scales the correction
    (1 = the exact target, 0 = W: plain GPTQ). Returns W' [N, K] in float32 (float64 for float64 W);
    W itself if H cannot be factorized even with damping (the correction is then skipped).
    """
    dtype = _compute_dtype(W)
    if alpha == 0:
        return W.to(dtype)
    H = shrink_to_diagonal_(H.to(device=W.device, dtype=dtype).clone(), shrink)
    D = D.to(device=W.device, dtype=dtype)
    diag = torch.diagonal(H)
    diag[diag == 0] = 1  # dead inputs: their D rows and columns are 0, so they get no correction
    diag += damp * diag.mean()
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return W.to(dtype)
    # W D H^-1 = (H^-1 D^T W^T)^T, H symmetric: one triangular solve pair on [K, N]
    correction = torch.cholesky_solve((W.to(dtype) @ D).T.contiguous(), L).T
    return W.to(dtype) + alpha * correction


def shrink_to_diagonal_(H: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 - shrink) H + shrink diag(H), in place: every input's own energy kept, every correlation between two
    inputs scaled by 1 - shrink (the shrinkage estimator of a covariance toward its diagonal, Ledoit & Wolf 2004).

    Why: H is estimated from a few thousand calibration tokens, and GPTQ's error compensation trusts its
    off-diagonal entries exactly; rounding error it moves along correlations the calibration text happened to
    have comes back on other text. Damping adds the same constant to every input; shrinking keeps each input's
    scale (activation outlier channels stay heavy). shrink 1 leaves no compensation between columns at all:
    round-to-nearest under GPTQ's group parameters."""
    if shrink:
        diag = torch.diagonal(H).clone()
        H.mul_(1 - shrink)
        torch.diagonal(H).copy_(diag)
    return H


def _check_args(W: torch.Tensor, bits: int, group_size: int, damp: float | None = None,
                shrink: float = 0.0) -> None:
    check_bits(bits)
    if W.dim() != 2:
        raise UserError(f"weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    if group_size != -1 and group_size <= 0:
        raise UserError(f"group_size={group_size} is invalid: use -1 (one group) or a positive integer")
    if damp is not None and not 0 < damp < 1:
        raise UserError(f"damp={damp} must lie in (0, 1), e.g. 0.01")
    if not 0 <= shrink <= 1:
        raise UserError(f"shrink={shrink} must lie in [0, 1], e.g. 0.5")


def _compute_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _finish_timing(device: torch.device, start: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _assemble(codes_qorder, params, g_idx, perm, damp_used, fallback, start) -> QuantResult:
    """Codes [K, N] in quantization order + per-group params -> QuantResult in original order."""
    codes = codes_qorder if perm is None else codes_qorder[torch.argsort(perm)]
    scales = torch.stack([p.scale for p in params])  # [G, N]
    zeros = torch.stack([p.zero for p in params])
    g = g_idx.long()
    # W [N, K] = scale * (code - zero), exact (a float16 scale times a small integer), built a slab of
    # input rows at a time so that no K x N temporaries beyond the codes exist.
    weight = torch.empty(codes.shape[1], codes.shape[0], dtype=torch.float32, device=codes.device)
    for r in range(0, codes.shape[0], 1024):
        gr = g[r:r + 1024]
        weight[:, r:r + 1024] = ((codes[r:r + 1024] - zeros[gr]) * scales[gr]).T
    return QuantResult(
        codes=codes.to(torch.int32),
        scales=scales.to(torch.float32),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        weight=weight,
        damp_used=float(damp_used),
        fallback=fallback,
        seconds=_finish_timing(codes.device, start),
    )


def rtn_quantize(W: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                 mse: bool = False) -> QuantResult:
    """Round-to-nearest baseline: each group's params from its own weights, no error feedback."""
    _check_args(W, bits, group_size)
    start = time.perf_counter()
    maxq = 2 ** bits - 1
    K = W.shape[1]
    gs = K if group_size == -1 else group_size
    Wt = W.to(_compute_dtype(W)).T  # [K, N]: row j = input column j, the layout of the codes
    params, codes = [], torch.empty_like(Wt)
    for s in range(0, K, gs):
        p = find_params(Wt[s:s + gs].T, bits, sym, mse)
        codes[s:s + gs] = quantize_codes(Wt[s:s + gs].T, p, maxq).T
        params.append(p)
    g_idx = torch.arange(K, device=W.device) // gs
    return _assemble(codes, params, g_idx, None, 0.0, None, start)


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float):
    """U with U^T U = (H + d I)^-1, d = damp * mean(diag(H)), raising damp until it factorizes.

    H is overwritten (callers pass their own copy): no K x K copy is made for the damping, and the
    lower factor is freed before the upper one is computed, so at most 3 K x K matrices are alive.
    Returns (U or None, damp fraction used or last tried).
    """
    diag = torch.diagonal(H).clone()
    mean_diag = diag.mean()
    frac = damp
    for attempt in range(DAMP_TRIES):
        if attempt:
            frac *= DAMP_STEP
        torch.diagonal(H).copy_(diag + frac * mean_diag)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            continue
        inverse = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return U, frac
    return None, frac


def _fresh_rows(Wt, W1, Err1, Hinv, i1, i, end):
    """Rows (input columns) i1+i .. end-1 of Wt with every update so far applied, including the
    lazy ones of the current block: block rows live in W1, rows past the block still lack Err1's."""
    i2 = i1 + W1.shape[0]
    inside = W1[i:min(end, i2) - i1]
    if end <= i2:
        return inside
    outside = Wt[i2:end] - Hinv[i1:i1 + i, i2:end].T @ Err1[:i]
    return torch.cat([inside, outside], dim=0)


def group_aware_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Act-order by whole groups (GPTQModel's act_group_aware): the groups of group_size consecutive inputs
    in order of their largest Hessian diagonal, the inputs within each group by decreasing diagonal.

    Why: act-order quantizes the inputs that carry the most energy first, while the most weights are left
    to absorb their error; by itself it scatters every group over the order, so a group's params are either
    fixed before GPTQ has updated any of its weights (static groups) or g_idx is permuted (a gather per
    call in the kernels). Keeping each group's inputs together lets GPTQ set its params when it reaches the
    group, from the weights as updated so far, with g_idx left in order."""
    K = diag.numel()
    groups = torch.arange(K, device=diag.device) // group_size
    group_peak = torch.full((int(groups[-1]) + 1,), -torch.inf, dtype=diag.dtype, device=diag.device)
    group_peak.scatter_reduce_(0, groups, diag, reduce="amax")
    group_rank = torch.argsort(torch.argsort(group_peak, descending=True, stable=True))  # 0 = the loudest group
    by_diag = torch.argsort(diag, descending=True, stable=True)
    return by_diag[torch.argsort(group_rank[groups[by_diag]], stable=True)]


def _runs(group_at: list[int]) -> dict[int, int]:
    """{start: end} of each run of equal consecutive entries: where a group's params are set as GPTQ
    reaches it, and the positions they are set from."""
    starts = [j for j in range(len(group_at)) if j == 0 or group_at[j] != group_at[j - 1]]
    return dict(zip(starts, starts[1:] + [len(group_at)]))


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                  desc_act: bool = False, static_groups: bool = False, damp: float = 0.01,
                  block_size: int = 128, mse: bool = False, shrink: float = 0.0,
                  group_aware: bool = False) -> QuantResult:
    """GPTQ one layer: W [N, K] (nn.Linear weight), H [K, K] from HessianAccumulator.

    group_size -1 = one group over all of K; K need not be a multiple of group_size (the last group
    is partial). desc_act quantizes columns in order of decreasing diag(H) (act-order); the result
    is stored in original order with g_idx saying which group each row was quantized in.
    static_groups computes every group's params up front from the original weights, so that
    g_idx stays i // group_size even with act-order. group_aware (with desc_act; static_groups then does
    not apply) is act-order by whole groups (`group_aware_order`): g_idx stays i // group_size and each
    group's params are set from its weights as GPTQ has updated them when it reaches the group. shrink
    (0 = classic GPTQ) first shrinks H toward its diagonal (`shrink_to_diagonal_`).
    """
    _check_args(W, bits, group_size, damp, shrink)
    if group_aware and not desc_act:
        raise UserError("group_aware is an act-order (whole groups by decreasing Hessian diagonal): set desc_act")
    N, K = W.shape
    if H.shape != (K, K):
        raise UserError(f"Hessian has shape {tuple(H.shape)}, expected ({K}, {K}) for a weight of shape {(N, K)}")
    if block_size <= 0:
        raise UserError(f"block_size={block_size} must be a positive integer, e.g. 128")
    start = time.perf_counter()
    maxq = 2 ** bits - 1
    dtype = _compute_dtype(W)
    # Work on W^T [K, N]: input column j is row j, so the per-column updates touch contiguous memory
    # (about 2x faster than the paper's [N, K] on CPU) and the codes come out in checkpoint layout.
    Wt = W.to(dtype).T.clone(memory_format=torch.contiguous_format)  # a copy: never edit the caller's W
    H = H.to(device=W.device, dtype=dtype).clone()
    gs = K if group_size == -1 else group_size
    n_groups = -(-K // gs)

    # Inputs that never fired carry no information: quantize their weights to exactly 0.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    Wt[dead] = 0
    shrink_to_diagonal_(H, shrink)

    static_groups = static_groups and not group_aware  # its groups' params are set as GPTQ reaches them
    static = [find_params(Wt[s:s + gs].T, bits, sym, mse) for s in range(0, K, gs)] if static_groups else None
    perm = None
    if desc_act:
        diag = torch.diagonal(H)
        perm = group_aware_order(diag, gs) if group_aware else torch.argsort(diag, descending=True)
        Wt, H = Wt[perm], H[perm][:, perm]
    original_pos = perm if perm is not None else torch.arange(K, device=W.device)

    Hinv, damp_used = _upper_cholesky_of_inverse(H, damp)  # overwrites H (our copy)
    del H
    if Hinv is None:
        unpermuted = Wt if perm is None else Wt[torch.argsort(perm)]
        fallback = rtn_quantize(unpermuted.T, bits, group_size, sym, mse)
        fallback.damp_used, fallback.fallback = float(damp_used), "rtn"
        fallback.seconds = _finish_timing(W.device, start)
        return fallback

    # The group each quantization position uses, g_idx (the group of each ORIGINAL row), and where params
    # are set as GPTQ reaches them: position -> end of the run of positions that share them.
    if static_groups or group_aware:
        group_at = (original_pos // gs).tolist()
        g_idx = torch.arange(K, device=W.device) // gs
    else:
        group_at = [j // gs for j in range(K)]
        g_idx = torch.empty(K, dtype=torch.long, device=W.device)
        g_idx[original_pos] = torch.arange(K, device=W.device) // gs
    params = static if static_groups else [None] * n_groups
    set_at = {} if static_groups else _runs(group_at)

    codes = torch.empty_like(Wt)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # Row views and the diagonal made once per block: the column loop below is the hot path, so
        # it runs a few in-place ops per column and no other indexing.
        w_rows, err_rows, code_rows = W1.unbind(0), Err1.unbind(0), codes[i1:i2].unbind(0)
        h_cols = Hinv1.unsqueeze(2).unbind(0)  # row i of Hinv1 as a [block, 1] column
        err_cols = Err1.unsqueeze(1).unbind(0)  # row i of Err1 as a [1, N] row
        h_diag = Hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            j = i1 + i
            if j in set_at:
                group = _fresh_rows(Wt, W1, Err1, Hinv, i1, i, set_at[j])
                params[group_at[j]] = find_params(group.T, bits, sym, mse)
            p: GroupParams = params[group_at[j]]
            w, q, err = w_rows[i], code_rows[i], err_rows[i]
            torch.div(w, p.scale, out=q).round_().add_(p.zero).clamp_(0, maxq)  # the codes
            torch.sub(q, p.zero, out=err).mul_(p.scale).sub_(w).div_(-h_diag[i])  # (w - dequantized) / d
            # OBS update of the block's later columns: a rank-1 update, through BLAS (addmm with an
            # inner size of 1); addr_ is an element-wise kernel that is 10-100x slower on a busy CPU.
            W1[i + 1:].addmm_(h_cols[i][i + 1:], err_cols[i], alpha=-1)
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # lazy update of everything after the block

    return _assemble(codes, params, g_idx, perm, damp_used, None, start)


def refit_scales(W: torch.Tensor, H: torch.Tensor, result: QuantResult, ridge: float = 1e-6) -> QuantResult:
    """Least-squares scales for codes GPTQ already chose: the exact minimizer of GPTQ's own objective
    sum_n (w_n - q_n)^T H (w_n - q_n) over the float scales, codes and integer zero points held fixed.

    Row n of the dequantized weight is q_n = M_n s_n, M_n [K, G] holding (code - zero) in its group's
    column, so s_n solves the G x G normal equations (M_n^T H M_n) s_n = M_n^T H w_n. GPTQ picks each
    group's scale from the weights before any error feedback (static groups) or before the group's own
    updates; once the codes are fixed, this pass moves every scale to where the layer's output error is
    least. Scales are rounded to float16 (what the checkpoint stores); a group keeps its old scale where
    the new one is not positive and finite, and a row all of its old ones where the new ones do not lower
    its error after the rounding. W [N, K] is the target GPTQ quantized (the asymmetric target with GPTAQ);
    ridge is relative to each group's diagonal (keeps the solve defined, moves the optimum by ~ridge).
    Returns a new QuantResult.
    """
    start = time.perf_counter()
    dtype = _compute_dtype(W)
    K, N = result.codes.shape
    H = H.to(device=W.device, dtype=dtype)
    g = result.g_idx.to(W.device).long()
    G = result.scales.shape[0]
    old = result.scales.to(dtype)
    a = result.codes.to(dtype) - result.zeros.to(dtype)[g]  # [K, N]: code - zero, in original row order
    target = W.to(dtype).T  # [K, N]
    # normal equations, all rows at once: A[n, f, h] = sum_{k in f, l in h} a[k, n] H[k, l] a[l, n]
    A = torch.zeros(N, G, G, dtype=dtype, device=W.device)
    for h in range(G):
        rows = (g == h).nonzero().squeeze(1)
        y = H[:, rows] @ a[rows]  # [K, N]: H applied to group h's part of every row
        A[:, :, h] = torch.zeros(G, N, dtype=dtype, device=W.device).index_add_(0, g, a * y).T
    b = torch.zeros(G, N, dtype=dtype, device=W.device).index_add_(0, g, a * (H @ target)).T  # [N, G]
    # a row's error is s^T A s - 2 b^T s + const: old and new scales are compared without another K x K pass
    def row_error(scales):  # [G, N] -> [N], up to the row's constant
        st = scales.T.unsqueeze(2)  # [N, G, 1]
        return ((A @ st).squeeze(2) * scales.T).sum(dim=1) - 2 * (b * scales.T).sum(dim=1)

    # a relative ridge on each group's own diagonal (groups differ in size by orders of magnitude: partial last
    # groups), and 1 for a group whose codes all sit on the zero point (its b is 0: solved to 0, then kept old)
    d = torch.diagonal(A, dim1=1, dim2=2)
    ridged = A + torch.diag_embed(torch.where(d > 0, ridge * d, torch.ones_like(d)))
    new, info = torch.linalg.solve_ex(ridged, b.unsqueeze(2))
    new = new.squeeze(2).T.to(torch.float16).to(dtype)  # [G, N], as the checkpoint stores them
    usable = torch.isfinite(new) & (new > 0) & (info == 0)[None, :]
    new = torch.where(usable, new, old)
    better = row_error(new) < row_error(old)
    scales = torch.where(better[None, :], new, old)
    weight = (a * scales[g]).T.to(torch.float32).contiguous()
    return dataclasses.replace(result, scales=scales.to(torch.float32), weight=weight,
                               seconds=result.seconds + _finish_timing(W.device, start))
