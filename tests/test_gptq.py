"""GPTQ core: against a plain float64 reference, against RTN on its own objective, and the details
(act-order g_idx, partial groups, dead inputs, padding, damping/fallback, checkpoint round trip)."""

import dataclasses

import pytest
import torch

from qwen_quant.errors import UserError
from qwen_quant.kernels.format import dequantize, pack_qweight, pack_qzeros
from qwen_quant.quantize import gptq
from qwen_quant.quantize.gptq import HessianAccumulator, gptq_quantize, refit_scales, rtn_quantize
from qwen_quant.quantize.quantizer import MSE_NORM, find_params, quantize_codes, dequantize_codes


def correlated_inputs(n_tokens, K, seed=0, dtype=torch.float32):
    """Tokens whose features are strongly correlated (a few shared factors) with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n_tokens, 8, generator=g, dtype=torch.float64)
    mixing = torch.randn(8, K, generator=g, dtype=torch.float64)
    feature_scale = torch.rand(K, generator=g, dtype=torch.float64) * 3 + 0.1
    X = (factors @ mixing + 0.05 * torch.randn(n_tokens, K, generator=g, dtype=torch.float64)) * feature_scale
    return X.to(dtype)


def hessian_of(X):
    return 2 * X.T @ X / X.shape[0]


def random_weight(N, K, seed=1, dtype=torch.float32):
    return (torch.randn(N, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.05).to(dtype)


# ---------- an independent float64 reference, written plainly ----------

def reference_params(x, bits, sym):
    """Min-max params per row of x [N, g], scales rounded to float16, asym zero >= 1 (v1 format)."""
    maxq = 2 ** bits - 1
    xmin = torch.clamp(x.min(dim=1).values, max=0)
    xmax = torch.clamp(x.max(dim=1).values, min=0)
    scales, zeros = [], []
    for lo, hi in zip(xmin.tolist(), xmax.tolist()):
        if sym:
            hi = max(-lo, hi)
            lo = -hi
        if lo == 0 and hi == 0:
            lo, hi = -1.0, 1.0
        scale = float(torch.tensor((hi - lo) / maxq).half())
        zero = (maxq + 1) / 2 if sym else round(-lo / scale)
        if not sym and zero < 1:
            scale, zero = float(torch.tensor(hi / (maxq - 1)).half()), 1
        scales.append(scale)
        zeros.append(min(zero, maxq))
    return torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros, dtype=torch.float64)


def reference_group_aware_order(diag, g):
    """Whole groups by their largest diagonal, each group's columns by decreasing diagonal (GPTQModel's
    act_group_aware), written as two plain sorts."""
    K = diag.numel()
    groups = [list(range(s, min(s + g, K))) for s in range(0, K, g)]
    groups.sort(key=lambda cols: -max(float(diag[c]) for c in cols))
    return torch.tensor([c for cols in groups for c in sorted(cols, key=lambda c: -float(diag[c]))])


def reference_gptq(W, H, bits, group_size, sym, desc_act, static_groups, damp, group_aware=False):
    """Column by column with an explicit inverse Hessian that drops each quantized column (OBS form,
    no Cholesky, no blocks). Returns codes [K, N], scales [G, N], zeros [G, N], g_idx [K]. group_aware:
    act-order by whole groups, each group's params from its updated weights when the first is reached."""
    W, H = W.double().clone(), H.double().clone()
    N, K = W.shape
    maxq = 2 ** bits - 1
    g = K if group_size == -1 else group_size
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(torch.diagonal(H), descending=True) if desc_act else torch.arange(K)
    if group_aware:
        order = reference_group_aware_order(torch.diagonal(H), g)
    Hinv = torch.linalg.inv(H + damp * torch.diagonal(H).mean() * torch.eye(K, dtype=torch.float64))
    n_groups = -(-K // g)
    scales, zeros = [None] * n_groups, [None] * n_groups
    if static_groups:
        for k in range(n_groups):
            scales[k], zeros[k] = reference_params(W[:, k * g:(k + 1) * g], bits, sym)
    codes = torch.zeros(K, N, dtype=torch.float64)
    g_idx = torch.zeros(K, dtype=torch.long)
    for t in range(K):
        col = int(order[t])
        group = col // g if static_groups or group_aware else t // g
        if group_aware and scales[group] is None:  # the group's first column: all of it comes next
            scales[group], zeros[group] = reference_params(W[:, order[t:t + g]], bits, sym)
        elif not static_groups and not group_aware and t % g == 0:
            scales[group], zeros[group] = reference_params(W[:, order[t:t + g]], bits, sym)
        g_idx[col] = group
        q = torch.clamp(torch.round(W[:, col] / scales[group]) + zeros[group], 0, maxq)
        codes[col] = q
        err = (W[:, col] - scales[group] * (q - zeros[group])) / Hinv[col, col]
        W -= torch.outer(err, Hinv[col])
        Hinv -= torch.outer(Hinv[:, col], Hinv[col]) / Hinv[col, col]
    return codes, torch.stack(scales), torch.stack(zeros), g_idx


@pytest.mark.parametrize("bits,group_size,sym,desc_act,static_groups", [
    (4, 32, True, False, False),
    (3, 48, False, True, False),   # groups straddle the 32-column blocks; partial last group
    (2, -1, True, True, False),
    (8, 40, False, False, False),
    (4, 32, True, True, True),
])
def test_matches_float64_reference(bits, group_size, sym, desc_act, static_groups):
    K, N = 120, 24
    X = correlated_inputs(400, K, dtype=torch.float64)
    H, W = hessian_of(X), random_weight(N, K, dtype=torch.float64)
    H[:, 7] = H[7, :] = 0  # one dead input
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                        static_groups=static_groups, damp=0.01, block_size=32)
    codes, scales, zeros, g_idx = reference_gptq(W, H, bits, group_size, sym, desc_act, static_groups, 0.01)
    assert res.fallback is None and res.damp_used == 0.01
    assert torch.equal(res.g_idx.long(), g_idx)
    assert torch.equal(res.scales.double(), scales)
    assert torch.equal(res.zeros.double(), zeros)
    assert torch.equal(res.codes.double(), codes)


@pytest.mark.parametrize("bits,group_size,sym,static_groups", [
    (4, 32, True, True),    # static_groups does not apply: group-aware sets params as it reaches a group
    (3, 48, False, False),  # groups straddle the 32-column blocks; partial last group
    (4, 25, True, False),   # a partial last group of 20 and group runs that cross every block boundary
])
def test_group_aware_matches_float64_reference(bits, group_size, sym, static_groups):
    K, N = 120, 24
    X = correlated_inputs(400, K, dtype=torch.float64)
    H, W = hessian_of(X), random_weight(N, K, dtype=torch.float64)
    H[:, 7] = H[7, :] = 0  # one dead input
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, desc_act=True, static_groups=static_groups,
                        damp=0.01, block_size=32, group_aware=True)
    codes, scales, zeros, g_idx = reference_gptq(W, H, bits, group_size, sym, True, False, 0.01, group_aware=True)
    assert torch.equal(res.g_idx.long(), torch.arange(K) // group_size)  # in order: kernels need no gather
    assert torch.equal(g_idx, torch.arange(K) // group_size)
    assert torch.equal(res.scales.double(), scales)
    assert torch.equal(res.zeros.double(), zeros)
    assert torch.equal(res.codes.double(), codes)


def test_group_aware_order_and_plain_gptq_on_the_permuted_layer():
    diag = torch.tensor([1., 9., 2., 3., 8., 0., 5., 4., 7.])
    # groups of 3: {1,9,2} peak 9, {3,8,0} peak 8, {5,4,7} peak 7
    assert gptq.group_aware_order(diag, 3).tolist() == [1, 2, 0, 4, 3, 5, 8, 6, 7]
    assert gptq.group_aware_order(diag, 4).tolist() == [1, 3, 2, 0, 4, 6, 7, 5, 8]  # a partial last group: {8}
    # in its own order the layer is plain GPTQ (no act-order) over groups that are the original groups
    K, N, g = 256, 16, 64
    X = correlated_inputs(600, K, seed=9, dtype=torch.float64)
    H, W = hessian_of(X), random_weight(N, K, seed=10, dtype=torch.float64)
    perm = gptq.group_aware_order(torch.diagonal(H), g)
    aware = gptq_quantize(W, H, group_size=g, desc_act=True, group_aware=True, block_size=48)
    plain = gptq_quantize(W[:, perm], H[perm][:, perm], group_size=g, desc_act=False, block_size=48)
    assert torch.equal(aware.codes[perm], plain.codes)
    group_of_segment = perm[::g] // g
    assert torch.equal(aware.scales[group_of_segment], plain.scales)
    assert not torch.equal(perm, torch.arange(K))


def test_group_aware_needs_act_order():
    with pytest.raises(UserError, match="desc_act"):
        gptq_quantize(random_weight(4, 64), torch.eye(64), group_size=32, desc_act=False, group_aware=True)


# ---------- the objective: GPTQ's output error below RTN's ----------

@pytest.fixture(scope="module")
def correlated_layer():
    K, N = 320, 64  # 320 = 2.5 groups of 128: partial last group
    X = correlated_inputs(2048, K, seed=3)
    return X, hessian_of(X), random_weight(N, K, seed=4)


def output_error(W, Q, X):
    return ((W.double() - Q.double()) @ X.double().T).pow(2).sum().item()


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_output_error_below_rtn(correlated_layer, bits, group_size, desc_act):
    X, H, W = correlated_layer
    gptq = gptq_quantize(W, H, bits=bits, group_size=group_size, desc_act=desc_act)
    rtn = rtn_quantize(W, bits=bits, group_size=group_size)
    assert gptq.fallback is None
    assert output_error(W, gptq.weight, X) < 0.5 * output_error(W, rtn.weight, X)


def test_mse_range_search_never_worse_per_group_and_helps_gptq(correlated_layer):
    X, H, W = correlated_layer
    group = W[:, :128]
    for sym in (True, False):
        plain, searched = find_params(group, 3, sym), find_params(group, 3, sym, mse=True)

        def err(p):
            return (dequantize_codes(quantize_codes(group, p, 7), p) - group).abs().pow(MSE_NORM).sum(1)

        assert torch.all(err(searched) <= err(plain))
        assert err(searched).sum() < err(plain).sum()
    gptq_mse = gptq_quantize(W, H, bits=3, group_size=128, mse=True)
    assert output_error(W, gptq_mse.weight, X) < output_error(W, rtn_quantize(W, 3, 128, mse=True).weight, X)


def loop_range_search(x, bits, sym):
    """The reference code's range search, written plainly: every shrink step in turn, strict "<"."""
    from qwen_quant.quantize import quantizer as Q

    maxq = 2 ** bits - 1
    xmin, xmax = Q._full_range(x, sym)
    best, best_err = Q._params_for_range(xmin, xmax, maxq, sym), torch.full_like(xmin, float("inf"))
    for step in range(int(Q.MSE_MAX_SHRINK * Q.MSE_GRID)):
        f = 1 - step / Q.MSE_GRID
        cand = Q._params_for_range(f * xmin, f * xmax, maxq, sym)
        err = (dequantize_codes(quantize_codes(x, cand, maxq), cand) - x).abs().pow(MSE_NORM).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = type(cand)(torch.where(better, cand.scale, best.scale), torch.where(better, cand.zero, best.zero))
    return best, best_err


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_range_search_exhaustive_equals_the_loop_and_coarse_to_fine_is_as_good(monkeypatch, bits, sym):
    from qwen_quant.quantize import quantizer as Q

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(300, 37, generator=g) * torch.rand(300, 1, generator=g)
    x[0] = 0  # an all-zero row
    x[1, :5] = 40.0  # an outlier row
    ref, ref_err = loop_range_search(x, bits, sym)
    monkeypatch.setattr(Q, "MSE_COARSE", 1)
    exhaustive = find_params(x, bits, sym, mse=True)
    assert torch.equal(exhaustive.scale, ref.scale) and torch.equal(exhaustive.zero, ref.zero)
    monkeypatch.setattr(Q, "MSE_COARSE", 4)
    monkeypatch.setattr(Q, "MSE_CHUNK_ELEMENTS", 2000)  # several chunks
    fast = find_params(x, bits, sym, mse=True)
    fast_err = (dequantize_codes(quantize_codes(x, fast, 2 ** bits - 1), fast) - x).abs().pow(MSE_NORM).sum(1)
    assert torch.all(fast_err >= ref_err * (1 - 1e-6))  # the exhaustive search is the optimum of the grid
    assert fast_err.sum() <= ref_err.sum() * 1.002  # and coarse-to-fine lands (almost always) on it
    assert (fast.scale == ref.scale).float().mean() > 0.9


# ---------- layout details ----------

def recompute_weight(res):
    g = res.g_idx.long()
    return ((res.codes - res.zeros[g]).double() * res.scales[g].double()).T


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_g_idx_is_exact(correlated_layer, static_groups):
    X, H, W = correlated_layer
    res = gptq_quantize(W, H, bits=4, group_size=64, desc_act=True, static_groups=static_groups)
    assert torch.equal(recompute_weight(res).float(), res.weight)
    if static_groups:
        assert torch.equal(res.g_idx, torch.arange(320, dtype=torch.int32) // 64)
    else:
        # Group k holds the rows ranked k*64 .. k*64+63 by diag(H): act-order groups, original order.
        rank = torch.empty(320, dtype=torch.long)
        rank[torch.argsort(torch.diagonal(H), descending=True)] = torch.arange(320)
        assert torch.equal(res.g_idx.long(), rank // 64)
        assert not torch.equal(res.g_idx, torch.arange(320, dtype=torch.int32) // 64)


def test_partial_last_group_like_the_demo_model():
    K, N = 576, 32  # demo model hidden size with groups of 128: 4 full groups and one of 64
    X = correlated_inputs(1024, K, seed=5)
    W = random_weight(N, K, seed=6)
    res = gptq_quantize(W, hessian_of(X), bits=4, group_size=128)
    assert res.scales.shape == (5, N) and res.zeros.shape == (5, N) and res.codes.shape == (K, N)
    assert torch.equal(torch.bincount(res.g_idx.long()), torch.tensor([128, 128, 128, 128, 64]))
    assert res.codes.min() >= 0 and res.codes.max() <= 15 and torch.all(res.zeros == 8)
    assert torch.equal(recompute_weight(res).float(), res.weight)


def test_dead_inputs_get_zero_weight():
    K, N = 96, 16
    X = correlated_inputs(512, K, seed=7)
    X[:, [3, 50, 95]] = 0
    res = gptq_quantize(random_weight(N, K), hessian_of(X), bits=4, group_size=32, desc_act=True)
    assert res.fallback is None and res.damp_used == 0.01
    assert torch.all(res.weight[:, [3, 50, 95]] == 0)
    live = torch.ones(K, dtype=torch.bool)
    live[[3, 50, 95]] = False
    assert (res.weight[:, live] != 0).float().mean() > 0.5  # live inputs keep their weights


@pytest.mark.parametrize("K, block", [(16, gptq.GRAM_BLOCK), (37, 8), (2 * gptq.GRAM_BLOCK + 3, gptq.GRAM_BLOCK)])
def test_hessian_accumulator_excludes_padding(K, block, monkeypatch):
    """Against float64 X^T X, for narrow layers (one full product) and wide ones, whose upper triangle is
    accumulated in column blocks and mirrored (odd widths: a last block shorter than the rest)."""
    monkeypatch.setattr(gptq, "GRAM_BLOCK", block)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 10, K, generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, :2] = False
    x_padded = x.clone()
    x_padded[~mask] = 1e3  # huge padding activations must not leak into H
    acc = HessianAccumulator(K)
    assert acc._upper_only == (K >= 2 * block)
    acc.add_batch(x_padded[:2], mask[:2])
    acc.add_batch(x_padded[2:], mask[2:])
    real = x[mask].double()
    assert acc.tokens == int(mask.sum()) == real.shape[0]
    H = acc.hessian()
    torch.testing.assert_close(H.double(), 2 * real.T @ real / real.shape[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(H, H.T)


def test_cholesky_failure_raises_damping_then_falls_back_to_rtn():
    K, N = 64, 16
    W = random_weight(N, K)
    # Rank-deficient Hessian pushed slightly negative: 1% damping is not enough, a few steps are.
    X = correlated_inputs(512, K, seed=9).double()
    H = hessian_of(X)
    H -= 0.02 * torch.diagonal(H).mean() * torch.eye(K, dtype=torch.float64)
    mild = gptq_quantize(W, H.float(), bits=4, group_size=32, damp=0.01)
    assert mild.fallback is None and mild.damp_used > 0.01

    # Badly indefinite (eigenvalues far below zero, positive diagonal): no damping step helps.
    bad = torch.ones(K, K) * 10 + torch.eye(K) * 0.5 - 10 * torch.eye(K)
    bad.diagonal().fill_(1.0)
    res = gptq_quantize(W, bad, bits=4, group_size=32, desc_act=True)
    rtn = rtn_quantize(W, bits=4, group_size=32)
    assert res.fallback == "rtn" and res.damp_used > 0.5
    assert torch.equal(res.codes, rtn.codes) and torch.equal(res.weight, rtn.weight)
    assert torch.equal(res.g_idx, rtn.g_idx)


# ---------- the checkpoint round trip ----------

@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False), (4, True), (8, False)])
def test_round_trip_through_checkpoint_format(correlated_layer, bits, sym):
    X, H, W = correlated_layer
    # A group whose weights are all >= 0: asym min-max would want zero point 0, which v1 cannot store.
    W = W.clone()
    W[:5, :64] = W[:5, :64].abs()
    res = gptq_quantize(W, H, bits=bits, group_size=64, sym=sym, desc_act=True)
    assert res.zeros.min() >= 1
    scales16 = res.scales.to(torch.float16)
    assert torch.equal(scales16.float(), res.scales)  # scales survive the float16 checkpoint exactly
    K = W.shape[1]
    back = dequantize(pack_qweight(res.codes, bits), pack_qzeros(res.zeros, bits, v1=True), scales16,
                      res.g_idx, bits, K, v1=True, dtype=torch.float32)
    assert torch.equal(back, res.weight)


def test_bad_input_is_a_user_error():
    W, H = random_weight(8, 32), torch.eye(32)
    with pytest.raises(UserError, match="bits"):
        gptq_quantize(W, H, bits=5)
    with pytest.raises(UserError, match="group_size"):
        gptq_quantize(W, H, group_size=0)
    with pytest.raises(UserError, match="damp"):
        gptq_quantize(W, H, damp=1.5)
    with pytest.raises(UserError, match="Hessian"):
        gptq_quantize(W, torch.eye(16))
    with pytest.raises(UserError, match="calibration"):
        HessianAccumulator(32).hessian()


@pytest.mark.parametrize("desc_act,mse", [(True, False), (False, True)])
def test_linears_sharing_a_hessian_can_be_quantized_in_one_call(correlated_layer, desc_act, mse):
    """Rows are independent given H: q, k, v (or gate, up) stacked give the same result as separately.

    The pipeline relies on it: it quantizes a true-sequential step's linears in one call and splits."""
    X, H, W = correlated_layer
    parts = (W[:16], W[16:40], W[40:])
    whole = gptq_quantize(torch.cat(parts), H, bits=4, group_size=64, desc_act=desc_act, mse=mse)
    pieces = whole.split([p.shape[0] for p in parts])
    assert sum(p.seconds for p in pieces) == pytest.approx(whole.seconds)
    for part, piece in zip(parts, pieces):
        alone = gptq_quantize(part, H, bits=4, group_size=64, desc_act=desc_act, mse=mse)
        # Equal up to BLAS summation order (another N may pick another kernel): at most a rare code flip.
        assert torch.equal(alone.g_idx, piece.g_idx)
        assert (alone.codes != piece.codes).float().mean() < 1e-3
        torch.testing.assert_close(alone.scales, piece.scales, rtol=1e-3, atol=0)
        assert piece.weight.shape == part.shape and piece.codes.is_contiguous()
        assert torch.equal(recompute_weight(piece).float(), piece.weight)
    with pytest.raises(ValueError, match="do not add up"):
        whole.split([16, 16])


# ---------- asymmetric calibration (GPTAQ): aim at the fp model's outputs ----------

def asymmetric_pair(n_tokens=600, K=48, seed=11):
    """Inputs of the fp model X and of the quantized model X~ = X + an error correlated with X (as the
    error of quantized earlier layers is), both [tokens, K] in float64."""
    X = correlated_inputs(n_tokens, K, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    drift = torch.eye(K, dtype=torch.float64) + 0.1 * torch.randn(K, K, generator=g, dtype=torch.float64)
    return X, X @ drift + 0.05 * X.std() * torch.randn(n_tokens, K, generator=g, dtype=torch.float64)


def test_asymmetric_accumulator_gives_h_and_d_and_leaves_out_padding():
    from qwen_quant.quantize.gptq import AsymmetricAccumulator

    X, Xq = asymmetric_pair(n_tokens=40, K=16)
    mask = torch.ones(40, dtype=torch.bool)
    mask[30:] = False
    Xq_padded, X_padded = Xq.clone(), X.clone()
    Xq_padded[~mask], X_padded[~mask] = 1e3, -1e3
    acc = AsymmetricAccumulator(16)
    acc.add_pair(Xq_padded[:25].float(), X_padded[:25].float(), mask[:25])
    acc.add_pair(Xq_padded[25:].float(), X_padded[25:].float(), mask[25:])
    real, real_fp = Xq[mask], X[mask]
    n = real.shape[0]
    torch.testing.assert_close(acc.hessian().double(), 2 * real.T @ real / n, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acc.asymmetry().double(), 2 * (real_fp - real).T @ real / n, rtol=1e-4, atol=1e-4)


def test_asymmetric_target_is_the_least_squares_solution_and_makes_the_objective_gptqs():
    """||Q X~ - W X||^2 = ||(Q - W') X~||^2 + const for every Q: the asymmetric problem is GPTQ's on W'."""
    from qwen_quant.quantize.gptq import asymmetric_target

    X, Xq = asymmetric_pair()
    W = random_weight(20, 48, dtype=torch.float64)
    n = X.shape[0]
    H, D = 2 * Xq.T @ Xq / n, 2 * (X - Xq).T @ Xq / n
    target = asymmetric_target(W, H, D, alpha=1.0, damp=0.0)
    assert target.dtype == torch.float64
    # W' minimises ||W' X~ - W X|| (rows of the token matrices here: X~ W'^T ~ X W^T)
    lstsq = torch.linalg.lstsq(Xq, X @ W.T).solution.T
    torch.testing.assert_close(target, lstsq, rtol=1e-6, atol=1e-8)
    g = torch.Generator().manual_seed(3)
    gaps = []
    for _ in range(3):
        Q = W + 0.02 * torch.randn(W.shape, generator=g, dtype=torch.float64)
        asym = ((Xq @ Q.T - X @ W.T) ** 2).sum()
        gptq_form = ((Xq @ (Q - target).T) ** 2).sum()
        gaps.append(float(asym - gptq_form))
    assert max(gaps) - min(gaps) < 1e-6 * abs(gaps[0])  # the same constant for every Q
    # alpha 0 is plain GPTQ's target; identical streams need no correction (D = 0) whatever the damping
    assert torch.equal(asymmetric_target(W, H, D, alpha=0.0), W)
    torch.testing.assert_close(asymmetric_target(W, H, torch.zeros_like(D), alpha=1.0, damp=0.01), W)
    half = asymmetric_target(W, H, D, alpha=0.5, damp=0.0)
    torch.testing.assert_close(half, (W + target) / 2)


@pytest.mark.parametrize("group_size", [16, -1])
def test_gptq_on_the_asymmetric_target_is_closer_to_the_fp_outputs(group_size):
    """The point of GPTAQ: with inputs that drifted from the fp model's, quantizing W' instead of W cuts
    the error against the fp outputs W X (and costs error against W X~, which nobody wants)."""
    from qwen_quant.quantize.gptq import asymmetric_target

    X, Xq = asymmetric_pair(K=64)
    W = random_weight(32, 64, dtype=torch.float64)
    n = X.shape[0]
    H, D = 2 * Xq.T @ Xq / n, 2 * (X - Xq).T @ Xq / n
    plain = gptq_quantize(W, H, group_size=group_size, desc_act=True, static_groups=True).weight.double()
    asym = gptq_quantize(asymmetric_target(W, H, D), H, group_size=group_size, desc_act=True,
                         static_groups=True).weight.double()

    def fp_error(Q):
        return float(((Xq @ Q.T - X @ W.T) ** 2).sum() / ((X @ W.T) ** 2).sum()) ** 0.5

    assert fp_error(asym) < 0.8 * fp_error(plain)


# ---------- scale refit: least squares over the scales, codes fixed ----------

def _row_errors(W, Q, H):
    d = (W.double() - Q.double())
    return ((d @ H.double()) * d).sum(dim=1)


@pytest.mark.parametrize("sym,desc_act,static_groups,group_size", [
    (True, True, True, 64), (False, True, True, 48), (True, True, False, 64), (False, False, False, -1)])
def test_refit_scales_solves_each_rows_least_squares_and_keeps_the_codes(sym, desc_act, static_groups, group_size):
    K, N = 200, 16  # 200: a partial last group for 48 and 64
    X = correlated_inputs(1500, K, seed=7, dtype=torch.float64)
    H, W = hessian_of(X), random_weight(N, K, seed=8, dtype=torch.float64)
    H[:, 11] = H[11, :] = 0  # one dead input
    res = gptq_quantize(W, H, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups, mse=True)
    new = refit_scales(W, H, res)
    assert torch.equal(new.codes, res.codes) and torch.equal(new.zeros, res.zeros) and torch.equal(new.g_idx, res.g_idx)
    assert torch.equal(new.scales.half().float(), new.scales)  # float16-exact, as the checkpoint stores them
    g = res.g_idx.long()
    assert torch.equal(new.weight.double(), (new.scales.double()[g] * (new.codes.double() - new.zeros.double()[g])).T)
    before, after = _row_errors(W, res.weight, H), _row_errors(W, new.weight, H)
    assert (after <= before).all() and after.sum() < 0.995 * before.sum()
    for n in range(N):  # each row against its own normal equations, solved plainly in float64
        M = torch.zeros(K, res.scales.shape[0], dtype=torch.float64)
        M[torch.arange(K), g] = res.codes[:, n].double() - res.zeros[g, n].double()
        exact = torch.linalg.lstsq(M.T @ H @ M, M.T @ H @ W[n]).solution
        torch.testing.assert_close(new.scales[:, n].double(), exact, rtol=2 ** -10, atol=0)  # float16 rounding


def test_refit_scales_fixes_a_layer_dominated_by_one_input():
    """One input far louder than the rest (the massive activations of real models' down_proj): static-group
    scales come from the weights alone, so that input's rounding error dominates; refitting the scales to the
    output error removes most of it."""
    K, N = 256, 32
    X = correlated_inputs(2000, K, seed=9)
    X[:, 5] *= 200
    H, W = hessian_of(X), random_weight(N, K, seed=10)
    res = gptq_quantize(W, H, group_size=128, desc_act=True, static_groups=True, mse=True)
    new = refit_scales(W, H, res)
    assert _row_errors(W, new.weight, H).sum() < 0.7 * _row_errors(W, res.weight, H).sum()


def test_refit_scales_keeps_the_scale_of_a_group_whose_codes_are_all_on_the_zero_point(correlated_layer):
    X, H, W = correlated_layer
    res = gptq_quantize(W, H, group_size=64, mse=True)
    codes = res.codes.clone()
    codes[:64, 0] = res.zeros[0, 0]  # row 0, group 0: nothing left to scale
    res = dataclasses.replace(res, codes=codes)
    new = refit_scales(W, H, res)
    assert new.scales[0, 0] == res.scales[0, 0] and torch.isfinite(new.weight).all()
    assert (new.scales[1:, 0] != res.scales[1:, 0]).any()  # the row's other groups are still refitted


def test_input_peak_is_the_median_samples_largest_token_norm_over_its_median():
    """HessianAccumulator.input_peak: per batch, max token norm / median token norm; the median over batches,
    so one odd batch does not move it. A massive token (10x) in every batch shows; one in one batch of three
    does not; padding (mask False) never counts."""
    def peak(first_token_scales, mask=None):
        acc = gptq.HessianAccumulator(4)
        for scale in first_token_scales:
            x = torch.ones(1, 9, 4)
            x[0, 0] *= scale
            acc.add_batch(x, mask=mask)
        return acc.input_peak()

    assert peak((10.0, 10.0, 10.0)) == pytest.approx(10.0)
    assert peak((50.0, 1.0, 1.0)) == pytest.approx(1.0)
    padding = torch.ones(1, 9, dtype=torch.bool)
    padding[0, 0] = False
    assert peak((100.0,), mask=padding) == pytest.approx(1.0)
    assert peak(()) == 0.0


@pytest.mark.parametrize("shrink,desc_act,static_groups", [(0.5, False, False), (0.3, True, True), (0.8, True, False)])
def test_shrink_is_gptq_on_the_hessian_shrunk_toward_its_diagonal(shrink, desc_act, static_groups):
    """shrink s quantizes exactly as the float64 reference does on (1 - s) H + s diag(H), a dead input included."""
    K, N = 96, 16
    X = correlated_inputs(300, K, dtype=torch.float64)
    H, W = hessian_of(X), random_weight(N, K, dtype=torch.float64)
    H[:, 5] = H[5, :] = 0
    shrunk = (1 - shrink) * H + shrink * torch.diag(torch.diagonal(H))
    res = gptq_quantize(W, H, bits=4, group_size=32, desc_act=desc_act, static_groups=static_groups, damp=0.01,
                        block_size=32, shrink=shrink)
    codes, scales, zeros, g_idx = reference_gptq(W, shrunk, 4, 32, True, desc_act, static_groups, 0.01)
    assert torch.equal(res.codes.double(), codes) and torch.equal(res.scales.double(), scales)
    assert torch.equal(res.zeros.double(), zeros) and torch.equal(res.g_idx.long(), g_idx)
    plain = gptq_quantize(W, H, bits=4, group_size=32, desc_act=desc_act, static_groups=static_groups, damp=0.01,
                          block_size=32)
    assert not torch.equal(plain.codes, res.codes)  # the shrink changed the compensation
    with pytest.raises(UserError, match="shrink"):
        gptq_quantize(W, H, shrink=1.5)


@pytest.mark.parametrize("mse", [False, True])
def test_full_shrink_is_round_to_nearest_under_gptqs_groups(mse):
    """shrink 1 leaves H diagonal: no error moves between columns, so GPTQ with static groups (scales from the
    original weights, as RTN's) and act-order gives RTN's codes, scales and zeros exactly."""
    K, N = 96, 16
    X = correlated_inputs(300, K)
    H, W = hessian_of(X), random_weight(N, K)
    res = gptq_quantize(W, H, bits=4, group_size=32, desc_act=True, static_groups=True, damp=0.01, mse=mse,
                        shrink=1.0)
    rtn = rtn_quantize(W, bits=4, group_size=32, mse=mse)
    assert torch.equal(res.codes, rtn.codes) and torch.equal(res.scales, rtn.scales)
    assert torch.equal(res.zeros, rtn.zeros) and torch.equal(res.g_idx, rtn.g_idx)
    almost = gptq_quantize(W, H, bits=4, group_size=32, desc_act=True, static_groups=True, damp=0.01, mse=mse,
                           shrink=0.9)
    assert not torch.equal(almost.codes, rtn.codes)


def test_asymmetric_target_uses_the_shrunk_hessian():
    from qwen_quant.quantize.gptq import asymmetric_target

    X, Xq = asymmetric_pair()
    W = random_weight(20, 48, dtype=torch.float64)
    n = X.shape[0]
    H, D = 2 * Xq.T @ Xq / n, 2 * (X - Xq).T @ Xq / n
    shrunk = 0.6 * H + 0.4 * torch.diag(torch.diagonal(H))
    torch.testing.assert_close(asymmetric_target(W, H, D, alpha=1.0, damp=0.01, shrink=0.4),
                               asymmetric_target(W, shrunk, D, alpha=1.0, damp=0.01))
    assert not torch.allclose(asymmetric_target(W, H, D, alpha=1.0, damp=0.01, shrink=0.4),
                              asymmetric_target(W, H, D, alpha=1.0, damp=0.01))


def test_shrinkage_is_ledoit_wolf_over_calibration_samples():
    """The intensity equals the formula computed directly from each sample's own Hessian; it falls as samples
    are added, a single sample trusts no correlation, and the Hessian itself is unchanged by the tracking."""
    K = 24
    samples = correlated_inputs(64 * 40, K).split(64)  # 40 samples of one population
    acc, plain = HessianAccumulator(K, spread=True), HessianAccumulator(K)
    for x in samples[:8]:
        acc.add_batch(x)
        plain.add_batch(x)
    torch.testing.assert_close(acc.hessian(), plain.hessian())
    own = torch.stack([hessian_of(x.double()) for x in samples[:8]])
    H = own.mean(0)
    var = own.var(0, unbiased=True) / 8
    off = ~torch.eye(K, dtype=torch.bool)
    expected = float(var[off].sum() / (H[off] ** 2).sum())
    assert 0 < expected < 1
    assert acc.shrinkage() == pytest.approx(expected, rel=1e-4)
    for x in samples[8:]:
        acc.add_batch(x)
    assert acc.shrinkage() < expected / 3  # 5x the samples: the correlations are known better
    one = HessianAccumulator(K, spread=True)
    one.add_batch(samples[0])
    assert one.shrinkage() == 1.0
    with pytest.raises(RuntimeError, match="spread"):
        plain.shrinkage()
