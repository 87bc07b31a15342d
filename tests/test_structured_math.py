"""Structured pruning math against closed forms and brute force: refit, scores, OBS, planning."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llmprune.errors import ConfigError
from llmprune.structured import scores
from llmprune.structured.plan import Costs, Counts, allocate, counts_for
from llmprune.structured.refit import (
    augmented_hessian,
    damped_inverse,
    mean_compensation,
    refit_columns,
    refit_with_bias,
)


def _data(tokens=200, n_in=6, n_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    X[:, 1] += 0.8 * X[:, 0]  # correlated inputs: the refit has something to absorb
    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    return X, W


def test_refit_is_the_least_squares_optimum():
    """Catches a wrong slice of H (rows vs columns) or a missing inverse: compare with lstsq."""
    X, W = _data()
    keep = torch.tensor([True, False, True, True, False, True])
    H = X.T @ X / X.shape[0]
    fitted = refit_columns(W, H, keep, damp=0.0)
    Y = X @ W.T  # (tokens, out)
    reference = torch.linalg.lstsq(X[:, keep], Y).solution.T  # (out, kept)
    torch.testing.assert_close(fitted, reference, rtol=1e-8, atol=1e-8)
    # and it beats simply dropping the columns
    drop_err = ((X[:, keep] @ W[:, keep].T - Y) ** 2).mean()
    fit_err = ((X[:, keep] @ fitted.T - Y) ** 2).mean()
    assert fit_err < drop_err


def test_refit_with_bias_matches_lstsq_with_a_constant_column():
    """Catches a bias that is not refitted, or the mean placed in the wrong row of the augmented H."""
    X, W = _data(seed=1)
    X = X + torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, 0.3], dtype=torch.float64)  # nonzero means
    b = torch.randn(4, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True, False, True])
    H, mean = X.T @ X / X.shape[0], X.mean(0)
    Wk, bk = refit_with_bias(W, b, H, mean, keep, damp=0.0)
    Y = X @ W.T + b
    A = torch.cat([X[:, keep], torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    ref = torch.linalg.lstsq(A, Y).solution.T  # (out, kept + 1)
    torch.testing.assert_close(Wk, ref[:, :-1], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(bk, ref[:, -1], rtol=1e-8, atol=1e-8)


def test_augmented_hessian_by_hand():
    H = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    out = augmented_hessian(H, torch.tensor([0.5, -1.0]))
    assert out.tolist() == [[2.0, 1.0, 0.5], [1.0, 3.0, -1.0], [0.5, -1.0, 1.0]]


def test_mean_compensation_by_hand():
    W = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    b = torch.tensor([10.0, 20.0])
    mean = torch.tensor([1.0, 2.0, 0.5])
    keep = torch.tensor([True, False, False])
    # b + W[:, 1:] @ mean[1:] = [10 + 4 + 1.5, 20 - 2 + 2]
    assert mean_compensation(W, b, mean, keep).tolist() == [15.5, 20.0]


def test_damped_inverse_never_nan_on_singular_hessians():
    H = torch.zeros(3, 3)
    H[0, 0] = 1.0  # two dead channels
    inv = damped_inverse(H, 0.0)
    assert torch.isfinite(inv).all()
    with pytest.raises(ConfigError, match="dampening_frac"):
        damped_inverse(H, -1.0)


def test_block_influence_and_angular_distance_by_hand():
    """Catches a sign error, a mean over the wrong axis, or radians not divided by π."""
    h_in = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    h_out = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    cos = scores.token_cosines(h_in, h_out)  # [1/√2, -1]
    torch.testing.assert_close(cos, torch.tensor([1 / math.sqrt(2), -1.0], dtype=torch.float64))
    assert scores.block_influence(float(cos.sum()), 2) == pytest.approx(1 - (1 / math.sqrt(2) - 1) / 2)
    assert scores.angular_distance(2 * 0.5, 2) == pytest.approx(1 / 3)  # arccos(0.5) = π/3
    assert scores.angular_distance(2.0, 2) == 0.0


def test_channel_scores_by_hand():
    W = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # column norms 5 and 1
    sq = torch.tensor([4.0, 9.0])  # ‖X_j‖ (rms) = 2, 3
    assert scores.wanda_channel_scores(W, sq).tolist() == [10.0, 3.0]
    mean = torch.tensor([1.0, 3.0])  # variances 3 and 0
    assert scores.fluctuation_scores(W, sq, mean).tolist() == [75.0, 0.0]
    per_column = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert scores.group_scores(per_column, torch.tensor([[0, 3], [1, 2]])).tolist() == [5.0, 5.0]


def _refit_error(X, W, removed_cols):
    keep = torch.ones(X.shape[1], dtype=torch.bool)
    keep[list(removed_cols)] = False
    Y = X @ W.T
    fit = torch.linalg.lstsq(X[:, keep], Y).solution
    return float(((X[:, keep] @ fit - Y) ** 2).sum(1).mean())


def test_obs_greedy_matches_brute_force_lstsq():
    """step=1: each choice is the group whose removal (with refit) costs least; errors are exact."""
    X, W = _data(tokens=300, n_in=8, n_out=3, seed=2)
    groups = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    H = X.T @ X / X.shape[0]
    removed, curve = scores.obs_group_removal(W, H, groups, 3, damp=0.0, step=1)
    chosen: list[int] = []
    for k in range(3):
        options = [g for g in range(4) if g not in chosen]
        errs = {g: _refit_error(X, W, groups[[*chosen, g]].flatten().tolist()) for g in options}
        best = min(errs, key=errs.get)
        assert removed[k] == best
        chosen.append(best)
        assert curve[k] == pytest.approx(errs[best], rel=1e-6)


def test_obs_rounds_keep_exact_errors_at_round_ends():
    X, W = _data(tokens=300, n_in=8, n_out=3, seed=3)
    groups = torch.arange(8)[:, None]
    H = X.T @ X / X.shape[0]
    removed, curve = scores.obs_group_removal(W, H, groups, 4, damp=0.0, step=2)
    assert len(set(removed)) == 4
    assert curve[3] == pytest.approx(_refit_error(X, W, removed), rel=1e-6)
    assert curve[1] == pytest.approx(_refit_error(X, W, removed[:2]), rel=1e-6)


COSTS = Costs(num_blocks=10, block=1000, channel=10, group=150, width=64, kv_heads=4)


def test_counts_for_each_structure():
    assert counts_for("depth", 0.3, COSTS) == Counts(blocks=3)
    # 0.3 * 10000 = 3000 over 10 blocks of 10 per channel = 30 channels -> remaining 34 -> 32 (multiple of 8)
    assert counts_for("width", 0.3, COSTS) == Counts(channels=32)
    assert counts_for("width", 0.3, COSTS, multiple=1) == Counts(channels=30)
    assert counts_for("heads", 0.3, COSTS) == Counts(kv_groups=2)
    with pytest.raises(ConfigError, match="at most 45.0%"):
        counts_for("heads", 0.5, COSTS)
    with pytest.raises(ConfigError, match="leaves none"):
        counts_for("depth", 0.99, COSTS)


def test_allocate_matches_brute_force():
    """The chosen split and blocks minimise the summed proxy among all splits within the budget."""
    g = torch.Generator().manual_seed(0)
    n = COSTS.num_blocks
    block_err = torch.rand(n, generator=g).tolist()
    width = [torch.cumsum(torch.rand(64, generator=g) * 0.02, 0).tolist() for _ in range(n)]
    width = [[0.0] + w for w in width]
    heads = [[0.0] + torch.cumsum(torch.rand(3, generator=g) * 0.3, 0).tolist() for _ in range(n)]
    alloc = allocate(0.3, COSTS, block_err, width, heads, multiple=8)
    assert alloc.counts.removed(COSTS) >= 0.3 * COSTS.total - COSTS.channel * 8 * n
    best = math.inf
    for d in range(n):
        for gq in range(4):
            kept = n - d
            for k in range(0, 64, 8):
                c = Counts(d, k, gq)
                removed = c.removed(COSTS)
                if not 3000 - COSTS.channel * kept * 8 <= removed <= 3000 + COSTS.block / 2:
                    continue
                if k and (64 - k) % 8:
                    continue
                for drop in itertools.combinations(range(n), d):
                    err = sum(block_err[i] if i in drop else width[i][k] + heads[i][gq] for i in range(n))
                    best = min(best, err)
    assert alloc.error == pytest.approx(best)


def test_spd_inverse_matches_lu_per_matrix_and_falls_back_where_cholesky_refuses():
    """Batched Cholesky inverse (which replaced a batched LU that torch 2.13 rejected at 2 threads on
    SmolLM2's o_proj blocks) against torch's LU inverse taken one matrix at a time; an indefinite
    matrix in the batch, which Cholesky refuses, is still inverted (by LU) instead of left garbage."""
    from llmprune.structured.scores import spd_inverse

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 24, 24, generator=gen, dtype=torch.float64)
    spd = x @ x.mT + 0.1 * torch.eye(24, dtype=torch.float64)
    spd[2] = torch.diag(torch.tensor([1.0, -2.0] + [3.0] * 22, dtype=torch.float64))  # indefinite
    out = spd_inverse(spd)
    for a, inv in zip(spd, out, strict=True):
        assert torch.allclose(inv, torch.linalg.inv(a), rtol=1e-9, atol=1e-12)
    single = spd_inverse(spd[0])
    assert single.shape == (24, 24)
    assert torch.allclose(single, torch.linalg.inv(spd[0]), rtol=1e-9, atol=1e-12)
