"""ALPS against brute force: projections, the least-squares refit and the layer optimum on tiny matrices."""

from __future__ import annotations

import doctest
import itertools
import logging

import pytest
import torch
from conftest import make_model
from test_engine import _prune

import llmprune.solvers.pcg as pcg_module
from llmprune.calibration.modules import WeightView, find_blocks, prunable_linears
from llmprune.errors import ConfigError, DataError
from llmprune.registry import get_solver
from llmprune.solvers import alps as alps_module
from llmprune.solvers.alps import AlpsOptions, project_keep
from llmprune.solvers.masks import nm_violations
from llmprune.solvers.pcg import masked_least_squares
from llmprune.solvers.types import HESSIAN, LayerProblem, LayerStats, reconstruction_error
from llmprune.spec import SparsitySpec

F64 = torch.float64


def _inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """(tokens, in) with mixed channels: H has large off-diagonal terms of both signs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=g) @ (
        torch.eye(width) + 0.6 * torch.randn(width, width, generator=g)
    )


def _problem(rows: int, width: int, spec, seed: int = 0, tokens: int = 64) -> LayerProblem:
    weight = torch.randn(rows, width, generator=torch.Generator().manual_seed(100 + seed))
    stats = LayerStats.from_inputs(_inputs(tokens, width, seed), {HESSIAN})
    return LayerProblem("layer", weight, stats, SparsitySpec.parse(spec))


def _support_loss(w: torch.Tensor, h: torch.Tensor, support: list[int]) -> float:
    """min over ŵ on ``support`` of (w - ŵ) H (w - ŵ)^T = w H w^T - b_S^T H_SS^-1 b_S, b = H w (float64)."""
    w, h = w.to(F64), h.to(F64)
    total = float(w @ h @ w)
    if not support:
        return total
    b = (h @ w)[support]
    return total - float(b @ torch.linalg.solve(h[support][:, support], b))


def _row_losses(problem: LayerProblem, group: int | None = None, kept_per_group: int | None = None):
    """Per row: {kept count: best loss over supports of that size} (only N:M-valid ones if given)."""
    w, h = problem.weight, problem.stats.hessian
    width = w.shape[1]
    best: list[dict[int, float]] = []
    for row in w:
        table: dict[int, float] = {}
        for bits in itertools.product((0, 1), repeat=width):
            if group is not None and any(
                sum(bits[i : i + group]) != kept_per_group for i in range(0, width, group)
            ):
                continue
            support = [j for j in range(width) if bits[j]]
            loss = _support_loss(row, h, support)
            table[len(support)] = min(loss, table.get(len(support), float("inf")))
        best.append(table)
    return best


def _optimum(problem: LayerProblem, scope: str = "matrix") -> float:
    """The exact optimum of the layer problem: per-row tables combined over every split of the kept count."""
    spec, (rows, width) = problem.spec, problem.weight.shape
    if spec.pattern is not None:
        tables = _row_losses(problem, spec.pattern.m, spec.pattern.n)
        return sum(min(t.values()) for t in tables)
    tables = _row_losses(problem)
    if scope == "row":
        k = width - spec.num_pruned(width)
        return sum(t[k] for t in tables)
    kept = rows * width - spec.num_pruned(rows * width)
    return min(
        sum(t[k] for t, k in zip(tables, split, strict=True))
        for split in itertools.product(range(width + 1), repeat=rows)
        if sum(split) == kept
    )


def _loss(problem: LayerProblem, result) -> float:
    new = result.weight if result.weight is not None else problem.weight.masked_fill(~result.keep, 0.0)
    return reconstruction_error(problem.weight, new, problem.stats.hessian)


# ---------------------------------------------------------------- projections


def _brute_projection(z: torch.Tensor, masks) -> torch.Tensor:
    """The mask m minimising ||z - z∘m||^2 among ``masks`` (an iterable of bool tensors)."""
    return min(masks, key=lambda m: float(z.masked_fill(m, 0.0).square().sum()))


def test_matrix_projection_is_the_nearest_point_with_k_nonzeros():
    for seed in range(5):
        z = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        masks = []
        for kept in itertools.combinations(range(8), 4):
            m = torch.zeros(8, dtype=torch.bool)
            m[list(kept)] = True
            masks.append(m.reshape(2, 4))
        assert torch.equal(project_keep(z, SparsitySpec(0.5)), _brute_projection(z, masks))


def test_row_projection_keeps_the_same_count_in_every_row():
    for seed in range(5):
        z = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))
        per_row = []
        for r in range(3):
            candidates = []
            for kept in itertools.combinations(range(6), 2):  # 2/3 of 6 pruned -> 2 kept
                m = torch.zeros(3, 6, dtype=torch.bool)
                m[r, list(kept)] = True
                candidates.append(m)
            per_row.append(
                _brute_projection(z.masked_fill(~candidates[0].any(1, keepdim=True), 0.0), candidates)
            )
        expected = per_row[0] | per_row[1] | per_row[2]
        assert torch.equal(project_keep(z, SparsitySpec(2 / 3), scope="row"), expected)


def test_nm_projection_against_every_valid_mask():
    group_masks = [
        torch.tensor([i in kept for i in range(4)]) for kept in itertools.combinations(range(4), 2)
    ]
    for seed in range(5):
        z = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
        masks = [torch.cat(parts).reshape(2, 8) for parts in itertools.product(group_masks, repeat=4)]
        keep = project_keep(z, SparsitySpec.parse("2:4"))
        assert nm_violations(keep, SparsitySpec.parse("2:4").pattern) == 0
        assert torch.equal(keep, _brute_projection(z, masks))


# ---------------------------------------------------------------- the refit


@pytest.mark.parametrize("spec", [0.5, "2:4"])
def test_refit_equals_closed_form_least_squares_on_the_support(spec):
    problem = _problem(4, 8, spec, seed=3)
    h = problem.stats.hessian
    keep = project_keep(problem.weight, problem.spec)
    got = masked_least_squares(problem.weight, h, keep, iterations=8, rtol=1e-12)
    for r in range(4):
        support = keep[r].nonzero().flatten()
        b = (h.to(F64) @ problem.weight[r].to(F64))[support]
        expected = torch.zeros(8, dtype=F64)
        expected[support] = torch.linalg.solve(h.to(F64)[support][:, support], b)
        torch.testing.assert_close(got[r].to(F64), expected, rtol=1e-4, atol=1e-4)
    assert bool((got[~keep] == 0).all()) and not bool(torch.signbit(got[~keep]).any())


def test_refit_never_raises_the_loss_from_its_start():
    problem = _problem(6, 16, 0.6, seed=4)
    h = problem.stats.hessian
    keep = project_keep(problem.weight, problem.spec)
    start = problem.weight.masked_fill(~keep, 0.0)
    before = reconstruction_error(problem.weight, start, h)
    losses = [
        reconstruction_error(
            problem.weight, masked_least_squares(problem.weight, h, keep, start, iterations=i), h
        )
        for i in range(6)
    ]
    assert losses[0] == pytest.approx(before)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.9 * before


# ---------------------------------------------------------------- the layer optimum


@pytest.mark.parametrize(
    ("spec", "scope"), [(0.5, "matrix"), (0.5, "row"), (0.625, "matrix"), ("2:4", "matrix")]
)
def test_alps_is_near_the_brute_force_optimum_and_not_worse_than_sparsegpt(spec, scope):
    """3 x 8 layers: every mask of the constraint set, each with its least-squares weights.

    ADMM is a heuristic for a non-convex problem: on these layers it is 1.1-1.6x above the optimum on
    average (sometimes on it), where SparseGPT is 2-10x above it.
    """
    gaps = []
    for seed in range(8):
        problem = _problem(3, 8, spec, seed=seed)
        ours = get_solver("alps")(problem, dampening_frac=0.0, scope=scope, refit_iterations=8)
        optimum = _optimum(problem, scope)
        loss = _loss(problem, ours)
        assert loss >= optimum * (1 - 1e-4)  # the brute force really is a lower bound
        if scope == "matrix":  # SparseGPT's comparison group is the matrix too
            assert loss <= _loss(problem, get_solver("sparsegpt")(problem, dampening_frac=0.0)) * (1 + 1e-5)
        gaps.append(loss / optimum)
    assert sum(gaps) / len(gaps) < 1.6, gaps


def test_masks_have_the_exact_count_and_pruned_weights_are_zero():
    for spec, scope in [(0.5, "matrix"), (0.7, "row"), ("2:4", "matrix"), ("1:4", "row")]:
        problem = _problem(8, 32, spec, seed=1)
        result = get_solver("alps")(problem, scope=scope)
        parsed = problem.spec
        if parsed.pattern is not None:
            assert nm_violations(result.keep, parsed.pattern) == 0
            assert int(result.keep.sum()) == 8 * 32 * parsed.pattern.n // parsed.pattern.m
        elif scope == "row":
            assert (result.keep.sum(1) == 32 - parsed.num_pruned(32)).all()
        else:
            assert int((~result.keep).sum()) == parsed.num_pruned(8 * 32)
        assert bool((result.weight[~result.keep] == 0).all())


def test_alps_beats_sparsegpt_on_correlated_layers():
    """A layer large enough that ADMM's support search matters (16 x 64, 70 % and 2:4)."""
    for spec in (0.7, "2:4"):
        problem = _problem(16, 64, spec, seed=7, tokens=256)
        assert _loss(problem, get_solver("alps")(problem)) < 0.9 * _loss(
            problem, get_solver("sparsegpt")(problem)
        )


# ---------------------------------------------------------------- numerics and options


@pytest.mark.parametrize("case", ["rank_deficient", "dead_channel", "duplicate_channel", "zero"])
def test_singular_hessians_give_finite_weights(case):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 16, generator=g)
    if case == "rank_deficient":
        x = x[:4]  # 4 tokens, 16 features: rank 4
    elif case == "dead_channel":
        x[:, 3] = 0.0
    elif case == "duplicate_channel":
        x[:, 5] = x[:, 6]
    else:
        x.zero_()
    stats = LayerStats.from_inputs(x, {HESSIAN})
    problem = LayerProblem("layer", torch.randn(8, 16, generator=g), stats, SparsitySpec(0.5))
    result = get_solver("alps")(problem)
    assert bool(torch.isfinite(result.weight).all())
    assert int((~result.keep).sum()) == 64
    assert bool((result.weight[~result.keep] == 0).all())
    if case != "zero":  # with inputs, the solve must still beat plain magnitude pruning
        magnitude = problem.weight.masked_fill(~project_keep(problem.weight, problem.spec), 0.0)
        assert _loss(problem, result) <= reconstruction_error(problem.weight, magnitude, stats.hessian) + 1e-6


def test_same_input_same_output():
    problem = _problem(8, 32, 0.6, seed=2)
    first, again = get_solver("alps")(problem), get_solver("alps")(problem)
    assert torch.equal(first.keep, again.keep) and torch.equal(first.weight, again.weight)


def test_dense_spec_and_missing_hessian():
    problem = _problem(2, 8, 0.0)
    assert get_solver("alps")(problem).keep.all()
    bare = LayerProblem("layer", problem.weight, LayerStats(), SparsitySpec(0.5))
    with pytest.raises(DataError, match="Hessian"):
        get_solver("alps")(bare)
    bad = LayerProblem("layer", problem.weight, problem.stats, SparsitySpec.parse("2:3"))
    with pytest.raises(Exception, match="divisible"):
        get_solver("alps")(bad)


@pytest.mark.parametrize(
    "options",
    [
        {"rho": 0},
        {"rho": "big"},
        {"max_iterations": -1},
        {"update_every": 0},
        {"scope": "rows"},
        {"warm_start": "wanda"},
        {"dampening_frac": -1},
    ],
)
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        get_solver("alps")(_problem(2, 8, 0.5), **options)


def test_registered_options_come_from_the_dataclass():
    info = get_solver("alps")
    assert info.needs == {HESSIAN}
    assert info.options() == {f: getattr(AlpsOptions(), f) for f in info.options()}
    assert set(info.options()) == set(AlpsOptions.__dataclass_fields__)
    with pytest.raises(ConfigError, match="did you mean"):
        info.check_options({"rh0": 1.0})


def test_more_admm_iterations_do_not_break_the_fixed_budget_path(caplog):
    problem = _problem(4, 16, 0.5, seed=9)
    with caplog.at_level(logging.DEBUG, logger="llmprune.solvers.alps"):
        short = get_solver("alps")(problem, max_iterations=3, min_iterations=0)
    assert "3 ADMM iterations" in caplog.text
    assert bool(torch.isfinite(short.weight).all())


def test_doctests():
    for module in (alps_module, pcg_module):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_prune_with_alps_through_the_engine(token_ids, sparsity):
    """``method='alps'`` is reachable from the API; the engine writes its weights with exact zeros."""

    model = make_model("llama")
    result = _prune(model, token_ids, method="alps", sparsity=sparsity, max_iterations=30)
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for rel, module in prunable_linears(block).items():
            w = WeightView(module).read()
            assert torch.equal(w != 0, result.keep_masks[f"{prefix}.{i}.{rel}"])
    assert result.overall_sparsity == pytest.approx(0.5)
    with torch.no_grad():
        assert torch.isfinite(model(token_ids[:1]).logits).all()


# ---------------------------------------------------------------- speed paths


@pytest.mark.parametrize("spec", [0.6, "2:4"])
def test_sparsegpt_start_is_feasible_and_never_worse_than_sparsegpt(spec):
    """The warm start begins at SparseGPT's point; with no ADMM step it is SparseGPT's mask, re-fitted
    (a refit can only lower the loss on a fixed support), and with ADMM steps it stays feasible."""
    problem = _problem(8, 32, spec, seed=4, tokens=128)
    sgpt = get_solver("sparsegpt")(problem)
    refit_only = get_solver("alps")(problem, warm_start="sparsegpt", max_iterations=0, min_iterations=0)
    assert torch.equal(refit_only.keep, sgpt.keep)
    assert _loss(problem, refit_only) <= _loss(problem, sgpt) + 1e-6
    warm = get_solver("alps")(problem, warm_start="sparsegpt")
    assert int(warm.keep.sum()) == int(sgpt.keep.sum())
    if problem.spec.pattern is not None:
        assert nm_violations(warm.keep, problem.spec.pattern) == 0
    assert _loss(problem, warm) <= _loss(problem, sgpt) + 1e-6


def test_linears_sharing_a_hessian_share_one_eigendecomposition(monkeypatch):
    """q/k/v get the same Hessian tensor: one eigh for all; a new or modified Hessian gets its own, and
    the result equals a solve with nothing cached."""
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda h: calls.append(1) or eigh(h))
    problem = _problem(8, 16, 0.5, seed=3)
    other = LayerProblem("k", torch.randn(4, 16), problem.stats, problem.spec)
    first = get_solver("alps")(problem)
    get_solver("alps")(other)
    assert len(calls) == 1
    fresh = LayerStats.from_inputs(_inputs(64, 16, 3), {HESSIAN})  # equal values, another tensor
    again = get_solver("alps")(LayerProblem("q", problem.weight, fresh, problem.spec))
    assert len(calls) == 2
    assert torch.equal(again.weight, first.weight)
    fresh.hessian.mul_(2.0)  # modified in place: must not reuse the stale decomposition
    get_solver("alps")(LayerProblem("q", problem.weight, fresh, problem.spec))
    assert len(calls) == 3
    get_solver("alps")(LayerProblem("q", problem.weight, fresh, problem.spec), dampening_frac=0.1)
    assert len(calls) == 4


def test_default_refit_reaches_the_least_squares_optimum_on_an_ill_conditioned_layer():
    """Inputs with a few strong directions (a wide eigenvalue spread): the reference's 10 CG iterations
    stop about 6e-4 above the optimum on ALPS's support here; the default must get within 2e-4 of it."""
    g = torch.Generator().manual_seed(0)
    width, rows = 128, 16
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, width, generator=g)
    x = x + 0.05 * torch.randn(512, width, generator=g)
    h = x.t() @ x / 512
    w = torch.randn(rows, width, generator=g)
    result = get_solver("alps")(LayerProblem("fc", w, LayerStats(hessian=h), SparsitySpec.parse("2:4")))
    damped = h.to(F64) + AlpsOptions().dampening_frac * h.diagonal().mean() * torch.eye(width, dtype=F64)
    optimum = torch.zeros(rows, width, dtype=F64)
    for r in range(rows):
        s = result.keep[r].nonzero().flatten()
        optimum[r, s] = torch.linalg.solve(damped[s][:, s], (damped @ w[r].to(F64))[s])
    excess = reconstruction_error(w, result.weight, damped) / reconstruction_error(w, optimum, damped) - 1
    assert 0 <= excess < 2e-4
