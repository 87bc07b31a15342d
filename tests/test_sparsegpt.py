"""SparseGPT against independent float64 references: OBS closed form, least squares, direct solves."""

from __future__ import annotations

import doctest
import logging
import math

import pytest
import torch

from llmprune.errors import ConfigError, DataError
from llmprune.registry import get_solver
from llmprune.solvers import hessian as hessian_module
from llmprune.solvers import sparsegpt as sparsegpt_module
from llmprune.solvers.hessian import damped_inverse_cholesky
from llmprune.solvers.masks import nm_violations
from llmprune.solvers.sparsegpt import reconstruct_with_keep, sparsegpt
from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerProblem, LayerStats, reconstruction_error
from llmprune.spec import SparsitySpec

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(tokens: int, width: int, g: torch.Generator) -> torch.Tensor:
    """(tokens, width): a low-rank shared part plus noise, like LLM activations."""
    rank = max(2, width // 4)
    shared = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, width, generator=g)
    return shared + 0.3 * torch.randn(tokens, width, generator=g)


def _problem(weight, x, sparsity, name="layer") -> LayerProblem:
    stats = LayerStats.from_inputs(x, {HESSIAN, SQ_NORMS})
    return LayerProblem(name, weight, stats, SparsitySpec.parse(sparsity))


def _damped(h: torch.Tensor, frac: float = 0.01) -> torch.Tensor:
    """float64 H with SparseGPT's conditioning: dead diagonal -> 1, + frac * mean(diag) on the diagonal."""
    h = h.to(F64).clone()
    h.diagonal()[h.diagonal() == 0] = 1.0
    h.diagonal().add_(frac * h.diagonal().mean())
    return h


def _obs_saliency(h: torch.Tensor) -> torch.Tensor:
    """(in,) 1 / [(H_{j:, j:})^-1]_00: the cost scale of pruning column j with only columns >= j free."""
    return torch.stack([1.0 / torch.linalg.inv(h[j:, j:])[0, 0] for j in range(h.shape[0])])


def _prune_column(w: torch.Tensor, h: torch.Tensor, col: int, rows: torch.Tensor) -> None:
    """OBS in closed form: zero w[rows, col], optimally re-adjust columns > col (H restricted to col..)."""
    inv_col = torch.linalg.inv(h[col:, col:])[:, 0]  # (in - col,)
    w[rows, col:] -= torch.outer(w[rows, col] / inv_col[0], inv_col)
    w[rows, col] = 0.0


def _reference_sparsegpt(weight, h, *, fixed=None, sparsity=None, block=None, nm=None):
    """The paper's algorithm in float64 with explicit inverses (no Cholesky): masks per column block
    (unstructured) or per aligned group (N:M, nm=(n kept, m)) from the current weights."""
    w = weight.to(F64).clone()
    out, width = w.shape
    keep = torch.ones(out, width, dtype=torch.bool) if fixed is None else fixed.clone()
    sal = _obs_saliency(h)
    total = math.floor(out * width * (sparsity or 0) + 0.5)
    block = block or width
    for i1 in range(0, width, block):
        i2 = min(i1 + block, width)
        if fixed is None and nm is None:
            count = math.floor(total * i2 / width + 0.5) - math.floor(total * i1 / width + 0.5)
            scores = (w[:, i1:i2] ** 2 * sal[i1:i2]).flatten()
            flat = torch.ones(scores.numel(), dtype=torch.bool)
            flat[torch.argsort(scores)[:count]] = False
            keep[:, i1:i2] = flat.reshape(out, i2 - i1)
        for col in range(i1, i2):
            if nm is not None and col % nm[1] == 0:
                scores = w[:, col : col + nm[1]] ** 2 * sal[col : col + nm[1]]
                drop = torch.argsort(scores, dim=1)[:, : nm[1] - nm[0]]
                keep[:, col : col + nm[1]].scatter_(1, drop, False)
            _prune_column(w, h, col, ~keep[:, col])
    return w, keep


# --- closed forms and least squares ---------------------------------------------------------------


def test_single_pruned_first_weight_is_the_obs_update():
    g = _gen(0)
    x = _correlated_inputs(64, 8, g)
    w = torch.randn(1, 8, generator=g)
    h = LayerStats.from_inputs(x, {HESSIAN}).hessian
    keep = torch.ones(1, 8, dtype=torch.bool)
    keep[0, 0] = False
    hinv = torch.linalg.inv(_damped(h))
    expected = w.to(F64) - w[0, 0].double() / hinv[0, 0] * hinv[:, 0]
    got = reconstruct_with_keep(w, h, keep)
    assert got[0, 0].item() == 0.0
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("q", [3, 7])
def test_single_pruned_later_weight_updates_only_later_columns(q):
    """SparseGPT sweeps left to right: columns before q are final, OBS acts on H[q:, q:]."""
    g = _gen(1)
    x = _correlated_inputs(64, 8, g)
    w = torch.randn(1, 8, generator=g)
    h = LayerStats.from_inputs(x, {HESSIAN}).hessian
    keep = torch.ones(1, 8, dtype=torch.bool)
    keep[0, q] = False
    sub_inv = torch.linalg.inv(_damped(h)[q:, q:])
    expected = w.to(F64).clone()
    expected[0, q:] -= w[0, q].double() / sub_inv[0, 0] * sub_inv[:, 0]
    torch.testing.assert_close(reconstruct_with_keep(w, h, keep).double(), expected, rtol=1e-4, atol=1e-5)


def test_one_of_n_picks_the_cheapest_obs_weight():
    g = _gen(2)
    x = _correlated_inputs(64, 8, g)
    w = torch.randn(1, 8, generator=g)
    result = sparsegpt(_problem(w, x, 0.125))  # prunes exactly 1 of 8
    h = _damped(LayerStats.from_inputs(x, {HESSIAN}).hessian)
    q = int(torch.argmin(w[0].double() ** 2 * _obs_saliency(h)))
    expected = w.to(F64).clone()
    _prune_column(expected, h, q, torch.tensor([True]))
    assert torch.equal(~result.keep[0], torch.arange(8) == q)
    torch.testing.assert_close(result.weight.double(), expected, rtol=1e-4, atol=1e-5)


def test_prefix_masks_reach_the_least_squares_optimum():
    """When every row's pruned weights precede its kept ones, the sweep is the exact optimum of
    min ||X (w - w')||^2 / N + lam ||w - w'||^2 with w' zero on the pruned set (solved by lstsq)."""
    g = _gen(3)
    tokens, width, frac = 48, 10, 0.01
    x = _correlated_inputs(tokens, width, g)
    w = torch.randn(4, width, generator=g)
    h = LayerStats.from_inputs(x, {HESSIAN}).hessian
    lam = frac * h.diagonal().double().mean()
    keep = torch.arange(width).unsqueeze(0) >= torch.tensor([[1], [3], [5], [8]])  # prefix per row
    got = reconstruct_with_keep(w, h, keep, block_size=width, dampening_frac=frac)
    xd = x.to(F64) / math.sqrt(tokens)
    for r in range(4):
        k = keep[r]
        design = torch.cat([xd[:, k], lam.sqrt() * torch.eye(int(k.sum()), dtype=F64)])
        target = torch.cat([xd @ w[r].double(), lam.sqrt() * w[r, k].double()])
        optimum = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(got[r, k].double(), optimum, rtol=1e-4, atol=1e-5)
        assert torch.all(got[r, ~k] == 0)


def test_any_fixed_mask_is_no_better_than_least_squares_and_matches_direct_solves():
    g = _gen(4)
    x = _correlated_inputs(40, 12, g)
    w = torch.randn(5, 12, generator=g)
    h = LayerStats.from_inputs(x, {HESSIAN}).hessian
    keep = torch.rand(5, 12, generator=g) > 0.5
    expected, _ = _reference_sparsegpt(w, _damped(h), fixed=keep)
    hd = _damped(h)
    for block in (1, 2, 5, 12, 128):  # lazy batch updates must not change the result
        got = reconstruct_with_keep(w, h, keep, block_size=block)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    # the per-row least-squares optimum (damped objective) is a lower bound
    for r in range(5):
        k = keep[r]
        opt = torch.zeros(12, dtype=F64)
        rhs = hd[k] @ w[r].double()
        opt[k] = torch.linalg.solve(hd[k][:, k], rhs)
        delta_opt, delta_got = w[r].double() - opt, w[r].double() - got[r].double()
        assert delta_opt @ hd @ delta_opt <= delta_got @ hd @ delta_got + 1e-9


@pytest.mark.parametrize(
    "sparsity,block,nm",
    [(0.5, 4, None), (0.5, 128, None), (0.37, 3, None), ("2:4", 4, (2, 4)), ("1:4", 8, (1, 4)),
     ("3:4", 128, (3, 4)), ("4:8", 8, (4, 8))],
)  # fmt: skip
def test_adaptive_masks_and_updates_match_float64_reference(sparsity, block, nm):
    g = _gen(5)
    x = _correlated_inputs(64, 16, g)
    w = torch.randn(6, 16, generator=g)
    problem = _problem(w, x, sparsity)
    result = sparsegpt(problem, block_size=block)
    h = _damped(problem.stats.hessian)
    sp = None if nm else sparsity
    expected_w, expected_keep = _reference_sparsegpt(w, h, sparsity=sp, block=block, nm=nm)
    assert torch.equal(result.keep, expected_keep)
    torch.testing.assert_close(result.weight.double(), expected_w, rtol=1e-4, atol=1e-5)


def test_nm_block_size_does_not_change_the_result():
    g = _gen(6)
    problem = _problem(torch.randn(8, 32, generator=g), _correlated_inputs(64, 32, g), "2:4")
    big, small = sparsegpt(problem, block_size=128), sparsegpt(problem, block_size=2)  # 2 -> rounded to 4
    assert torch.equal(big.keep, small.keep)
    torch.testing.assert_close(big.weight, small.weight, rtol=1e-5, atol=1e-6)


# --- quality against the registry's baselines -------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 8), (8, 16)])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_beats_wanda_and_magnitude_on_correlated_inputs(shape, sparsity):
    """Not a theorem per seed: SparseGPT's per-block mask and greedy left-to-right updates lose to
    Wanda's mask on a few percent of tiny random layers (the reference code does too). Over seeds it
    must win nearly always and by a wide margin (measured: ~0.2-0.3x the error)."""
    solvers = {name: get_solver(name) for name in ("sparsegpt", "wanda", "magnitude")}
    ratios = {"wanda": [], "magnitude": []}
    for seed in range(10):
        g = _gen(100 + seed)
        w = torch.randn(*shape, generator=g)
        problem = _problem(w, _correlated_inputs(64, shape[1], g), sparsity)
        h = problem.stats.hessian
        ours = reconstruction_error(w, solvers["sparsegpt"](problem).weight, h)
        for name in ratios:
            keep = solvers[name](problem).keep
            ratios[name].append(ours / reconstruction_error(w, w.masked_fill(~keep, 0.0), h))
    for name, values in ratios.items():
        values = torch.tensor(values)
        assert int((values <= 1.0).sum()) >= 8, (name, values)
        assert float(values.log().mean().exp()) < 0.5, (name, values)


# --- the spec, exactly ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,sparsity,block", [((7, 13), 0.37, 4), ((5, 9), 0.5, 128), ((3, 10), 0.9, 3)])
def test_unstructured_prunes_exactly_num_pruned(shape, sparsity, block):
    g = _gen(7)
    w = -torch.rand(*shape, generator=g) - 0.1  # all negative: a multiply would leave -0.0
    problem = _problem(w, _correlated_inputs(32, shape[1], g), sparsity)
    result = sparsegpt(problem, block_size=block)
    assert int((~result.keep).sum()) == problem.spec.num_pruned(w.numel())
    pruned = result.weight[~result.keep]
    assert torch.all(pruned == 0) and not torch.any(torch.signbit(pruned))
    assert torch.all(result.weight[result.keep] != 0)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:4"])
def test_nm_keeps_exactly_n_per_group(pattern):
    g = _gen(8)
    w = -torch.rand(6, 24, generator=g) - 0.1
    problem = _problem(w, _correlated_inputs(32, 24, g), pattern)
    n, m = problem.spec.pattern.n, problem.spec.pattern.m
    result = sparsegpt(problem, block_size=6)  # not a multiple of 8 or 4: rounded up
    assert nm_violations(result.keep, problem.spec.pattern) == 0
    assert torch.all(result.keep.reshape(6, 24 // m, m).sum(-1) == n)
    pruned = result.weight[~result.keep]
    assert torch.all(pruned == 0) and not torch.any(torch.signbit(pruned))


def test_dense_spec_and_zero_count_leave_weights_alone():
    w = torch.randn(3, 4, generator=_gen(9))
    for sparsity in (0.0, 0.04):  # 0.04 of 12 weights rounds to 0 pruned
        result = sparsegpt(_problem(w, torch.randn(8, 4, generator=_gen(9)), sparsity))
        assert result.keep.all() and result.weight is None


def test_nm_width_and_options_are_validated():
    w, x = torch.randn(2, 6), torch.randn(8, 6)
    with pytest.raises(ConfigError, match="divisible"):
        sparsegpt(_problem(w, x, "2:4"))
    with pytest.raises(ConfigError, match="block_size"):
        sparsegpt(_problem(w, x, 0.5), block_size=0)
    with pytest.raises(ConfigError, match="dampening_frac"):
        sparsegpt(_problem(w, x, 0.5), dampening_frac=-0.1)
    missing = LayerProblem("l", w, LayerStats.from_inputs(x, {SQ_NORMS}), SparsitySpec.parse(0.5))
    with pytest.raises(DataError, match="Hessian"):
        sparsegpt(missing)
    bad = _problem(w, x, 0.5)
    bad.stats.hessian[0, 1] = float("nan")
    with pytest.raises(DataError, match="float32 or bfloat16"):
        sparsegpt(bad)


def test_registered_with_hessian_need():
    info = get_solver("sparsegpt")
    assert info.needs == frozenset({HESSIAN})
    assert info.options() == {"block_size": 128, "dampening_frac": 0.01}


# --- singular Hessians ---------------------------------------------------------------------------


def _singular_inputs(kind: str, g: torch.Generator) -> torch.Tensor:
    x = _correlated_inputs(64, 16, g)
    if kind == "duplicated":
        x[:, 8:] = x[:, :8]
    elif kind == "dead":
        x[:, [1, 5, 6]] = 0.0
    elif kind == "few_tokens":
        x = x[:5]
    return x


@pytest.mark.parametrize("kind", ["duplicated", "dead", "few_tokens"])
@pytest.mark.parametrize("frac", [0.01, 0.0])
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_singular_hessians_give_finite_valid_results(kind, frac, sparsity):
    g = _gen(10)
    problem = _problem(torch.randn(8, 16, generator=g), _singular_inputs(kind, g), sparsity)
    result = sparsegpt(problem, dampening_frac=frac)
    assert torch.isfinite(result.weight).all()
    assert torch.all(result.weight[~result.keep] == 0)
    if problem.spec.pattern is None:
        assert int((~result.keep).sum()) == problem.spec.num_pruned(128)
    else:
        assert nm_violations(result.keep, problem.spec.pattern) == 0


def test_dead_columns_are_pruned_first_and_not_zeroed_otherwise():
    g = _gen(11)
    x = _correlated_inputs(64, 8, g)
    x[:, [2, 5]] = 0.0
    w = torch.randn(4, 8, generator=g)
    result = sparsegpt(_problem(w, x, 0.25))  # 8 pruned = exactly the two dead columns
    assert torch.equal(result.keep, (torch.arange(8) != 2) & (torch.arange(8) != 5).expand(4, 8))
    result = sparsegpt(_problem(w, x, 0.125))  # 4 pruned, all dead: nothing else moves
    pruned_columns = torch.nonzero(~result.keep)[:, 1]
    assert len(pruned_columns) == 4 and torch.isin(pruned_columns, torch.tensor([2, 5])).all()
    assert torch.equal(result.weight, w.masked_fill(~result.keep, 0.0))


def test_dead_columns_need_no_damping(caplog):
    """H_dd = 1 for dead channels makes H invertible without damping: no escalation, no warning."""
    g = _gen(14)
    x = _correlated_inputs(64, 8, g)
    x[:, [0, 3]] = 0.0
    w = torch.randn(4, 8, generator=g)
    with caplog.at_level(logging.WARNING):
        result = sparsegpt(_problem(w, x, 0.5), dampening_frac=0.0)
    assert caplog.text == ""
    h = _damped(LayerStats.from_inputs(x, {HESSIAN}).hessian, 0.0)
    expected, _ = _reference_sparsegpt(w, h, fixed=result.keep)
    torch.testing.assert_close(result.weight.double(), expected, rtol=1e-4, atol=1e-4)


def test_indefinite_hessian_escalates_damping_with_a_warning(caplog):
    """An fp16-accumulated Hessian can be indefinite: eigenvalues 2.5 and -0.5 here, fixed by lam = 1."""
    h = torch.kron(torch.eye(4), torch.tensor([[1.0, 1.5], [1.5, 1.0]]))
    with caplog.at_level(logging.WARNING, logger="llmprune.solvers.hessian"):
        upper = damped_inverse_cholesky(h, 0.01, name="blk.0.q_proj")
    assert "dampening_frac" in caplog.text and "blk.0.q_proj" in caplog.text
    assert torch.isfinite(upper).all()
    # 0.01 and 0.1 of mean(diag) = 1 fail; the factor is of (H + 1.0 I)^-1
    expected = torch.linalg.inv(h.double() + torch.eye(8, dtype=F64))
    torch.testing.assert_close((upper.T @ upper).double(), expected, rtol=1e-5, atol=1e-5)


def test_hopeless_hessian_falls_back_to_its_diagonal(caplog):
    h = torch.tensor([[1.0, 1e6], [1e6, 1.0]])
    w = torch.tensor([[3.0, -2.0], [0.5, 4.0]])
    with caplog.at_level(logging.WARNING, logger="llmprune.solvers.hessian"):
        got = reconstruct_with_keep(w, h, torch.tensor([[True, False], [False, True]]))
    assert "diagonal" in caplog.text
    assert torch.equal(got, torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # no cross-channel update


def test_well_conditioned_hessian_logs_nothing(caplog):
    g = _gen(12)
    with caplog.at_level(logging.WARNING):
        sparsegpt(_problem(torch.randn(4, 8, generator=g), _correlated_inputs(64, 8, g), 0.5))
    assert caplog.text == ""


# --- determinism and docs ------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_bit_identical_on_repeat(sparsity):
    g = _gen(13)
    problem = _problem(torch.randn(16, 32, generator=g), _correlated_inputs(64, 32, g), sparsity)
    a, b = sparsegpt(problem, block_size=8), sparsegpt(problem, block_size=8)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.weight, b.weight)


def test_docstring_examples():
    for module in (sparsegpt_module, hessian_module):
        assert doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0
