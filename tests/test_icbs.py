"""iCBS and its cardinality-constrained QUBO solver, against brute force and direct loss formulas."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_model
from torch import Tensor

import llmprune
from llmprune.errors import ConfigError
from llmprune.registry import get_solver
from llmprune.solvers.icbs import _Descent, block_qubo, refine, ridged_hessian
from llmprune.solvers.masks import nm_violations
from llmprune.solvers.pcg import masked_least_squares
from llmprune.solvers.qubo import anneal
from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerProblem, LayerStats, reconstruction_error
from llmprune.spec import SparsitySpec


def qubo_energy(q: Tensor, x: Tensor, linear: Tensor | None = None) -> Tensor:
    """``x^T Q x + c^T x`` in float64, for several x per Q at once.

    q: (batch, B, B) symmetric; x: (batch, B) or (batch, S, B); linear: (batch, B). -> (batch,) or
    (batch, S).
    """
    q64 = q.to(torch.float64)
    single = x.dim() == q.dim() - 1
    x64 = (x.unsqueeze(-2) if single else x).to(torch.float64)  # (batch, S, B)
    energy = (torch.bmm(x64, q64) * x64).sum(-1)  # (batch, S)
    if linear is not None:
        energy = energy + (x64 * linear.to(torch.float64).unsqueeze(-2)).sum(-1)
    return energy.squeeze(-1) if single else energy


def _feasible_points(counts: list[int], group_size: int) -> Tensor:
    """Every 0/1 vector with ``counts[g]`` ones in aligned group g. -> (points, groups * group_size)."""
    per_group = []
    for count in counts:
        rows = []
        for ones in itertools.combinations(range(group_size), count):
            row = [0.0] * group_size
            for j in ones:
                row[j] = 1.0
            rows.append(row)
        per_group.append(rows)
    points = [sum(parts, []) for parts in itertools.product(*per_group)]
    return torch.tensor(points, dtype=torch.float64)


def exhaustive_minimum(
    q: Tensor, counts: int | list[int], linear: Tensor | None = None, group_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Brute-force optimum over all feasible x (the independent reference; tiny B only).

    q: (batch, B, B); ``counts`` ones in total, or ``counts[g]`` in each aligned group of ``group_size``.
    Returns x (batch, B) float64 and its energy (batch,) float64.
    """
    width = q.shape[-1]
    size = group_size or width
    per_group = [counts] if isinstance(counts, int) else list(counts)
    points = _feasible_points(per_group, size)  # (P, B)
    q64 = q.to(torch.float64)
    energy = torch.einsum("pi,bij,pj->bp", points, q64, points)  # (batch, P)
    if linear is not None:
        energy = energy + linear.to(torch.float64) @ points.T
    best = energy.argmin(-1)
    return points[best], energy.gather(-1, best.unsqueeze(-1)).squeeze(-1)


def mask_objective(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row loss ``(w∘x)^T H (w∘x)`` of pruning ``~keep`` without weight update. -> (out,) float64."""
    pruned = weight.to(torch.float64).masked_fill(keep, 0.0)  # (out, in)
    return ((pruned @ hessian.to(torch.float64)) * pruned).sum(-1)


def refine_mask(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, **options) -> torch.Tensor:
    """Mask-only :func:`refine` (the paper's iCBS, weights unchanged): the refined keep-mask."""
    return refine(weight, hessian, keep, **options)[0]


def _icbs(problem: LayerProblem, seed: int = 0, **options):
    """The registered solver with torch seeded first, as the engine seeds it for every module."""
    torch.manual_seed(seed)
    return get_solver("icbs")(problem, **options)


def _correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """(tokens, in) inputs whose channels are mixed, so H has large off-diagonal terms of both signs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, width, generator=g)
    mix = torch.eye(width) + 0.6 * torch.randn(width, width, generator=g)
    return base @ mix


def _problem(rows: int, width: int, spec, seed: int = 0, tokens: int = 64) -> LayerProblem:
    g = torch.Generator().manual_seed(1000 + seed)
    weight = torch.randn(rows, width, generator=g)
    stats = LayerStats.from_inputs(_correlated_inputs(tokens, width, seed), {SQ_NORMS, HESSIAN})
    return LayerProblem("layer", weight, stats, SparsitySpec.parse(spec))


def _error(problem: LayerProblem, keep: torch.Tensor) -> float:
    return reconstruction_error(problem.weight, problem.weight.masked_fill(~keep, 0.0), problem.stats.hessian)


# ---------------------------------------------------------------- the QUBO solver


@pytest.mark.parametrize(("width", "ones"), [(8, 4), (10, 3), (12, 6), (12, 2)])
def test_anneal_reaches_the_exhaustive_optimum(width, ones):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(16, width, width, generator=g)
        q = a + a.transpose(1, 2)  # indefinite, negative couplings everywhere
        c = torch.randn(16, width, generator=g)
        x0 = torch.zeros(16, width)
        x0[:, :ones] = 1
        x, energy = anneal(q, c, x0, sweeps=32, restarts=4, beta_range=(0.1, 100.0), generator=g)
        _, best = exhaustive_minimum(q, ones, c)
        assert (x.sum(-1) == ones).all()
        assert torch.allclose(energy, qubo_energy(q, x, c))
        assert torch.allclose(energy, best, rtol=1e-6, atol=1e-6)


def test_anneal_in_groups_keeps_group_counts_and_reaches_the_optimum():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(8, 12, 12, generator=g)
    q = a + a.transpose(1, 2)
    c = torch.randn(8, 12, generator=g)
    x0 = torch.tensor([1.0, 1, 0, 0] * 3).expand(8, 12)  # 2 ones in each group of 4
    x, energy = anneal(q, c, x0, group_size=4, sweeps=32, restarts=4, beta_range=(0.1, 100.0), generator=g)
    _, best = exhaustive_minimum(q, [2, 2, 2], c, group_size=4)
    assert (x.view(8, 3, 4).sum(-1) == 2).all()
    assert torch.allclose(energy, best, rtol=1e-6, atol=1e-6)


def test_qubo_objective_is_the_reconstruction_loss_for_every_mask():
    tokens, width = 20, 8
    x_in = _correlated_inputs(tokens, width, seed=3).to(torch.float64)  # (tokens, in)
    w = torch.randn(width, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hessian = x_in.T @ x_in / tokens
    q = (w[:, None] * w[None, :] * hessian).unsqueeze(0)
    for bits in itertools.product([0.0, 1.0], repeat=width):
        x = torch.tensor(bits, dtype=torch.float64)  # 1 = pruned
        kept = w * (1 - x)
        direct = float(((x_in @ (w - kept)) ** 2).sum() / tokens)
        assert float(qubo_energy(q, x.unsqueeze(0))) == pytest.approx(direct, rel=1e-9, abs=1e-12)
        keep = (x < 0.5).unsqueeze(0)
        assert float(mask_objective(w.unsqueeze(0).float(), hessian.float(), keep)) == pytest.approx(
            direct, rel=1e-5, abs=1e-6
        )


# ---------------------------------------------------------------- the solver


def test_layer_loss_never_rises_with_steps_and_beats_wanda():
    for seed in range(3):
        problem = _problem(6, 32, 0.5, seed=seed)
        wanda_error = _error(problem, get_solver("wanda")(problem).keep)
        errors = [
            _error(problem, _icbs(problem, steps=s, block_size=8, ridge=0.0, update=False).keep)
            for s in (0, 1, 2, 5, 10)
        ]
        assert errors[0] == pytest.approx(wanda_error, rel=1e-12)
        for before, after in itertools.pairwise(errors):
            assert after <= before * (1 + 1e-12)
        assert errors[-1] < 0.95 * wanda_error  # correlated inputs: Wanda's per-weight scores miss a lot


@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_history_is_monotone_and_matches_the_final_mask(ridge):
    """The objective is the loss under H + ridge * mean(diag H) * I, computed here independently."""
    problem = _problem(5, 24, 0.5, seed=7)
    keep0 = get_solver("wanda")(problem).keep
    history: list[float] = []
    keep = refine_mask(
        problem.weight,
        problem.stats.hessian,
        keep0,
        steps=8,
        block_size=8,
        ridge=ridge,
        history=history,
        generator=torch.Generator().manual_seed(0),
    )
    h = problem.stats.hessian.double()
    h_ridge = h + ridge * torch.diagonal(h).mean() * torch.eye(24, dtype=torch.float64)
    objective = [
        reconstruction_error(problem.weight, problem.weight.masked_fill(~k, 0.0), h_ridge)
        for k in (keep0, keep)
    ]
    assert len(history) == 9
    assert all(b <= a for a, b in itertools.pairwise(history))
    assert history[0] == pytest.approx(objective[0], rel=1e-9)
    assert history[-1] == pytest.approx(objective[1], rel=1e-9)
    assert objective[1] < objective[0]


#: a hotter, longer anneal than the defaults (which favour speed on large layers): "enough steps"
THOROUGH = {
    "steps": 4,
    "block_size": 8,
    "sweeps": 16,
    "restarts": 4,
    "beta_range": (0.1, 100.0),
    "ridge": 0.0,
    "update": False,
}


def test_finds_the_brute_force_optimal_mask_of_a_row():
    """One row, 8 inputs, 4 pruned: iCBS must land on the best of all 70 masks."""
    wanda_suboptimal = 0
    for seed in range(5):
        problem = _problem(1, 8, 0.5, seed=seed, tokens=32)
        x_in = _correlated_inputs(32, 8, seed).to(torch.float64)
        w = problem.weight[0].to(torch.float64)
        losses = {}
        for pruned in itertools.combinations(range(8), 4):
            delta = torch.zeros(8, dtype=torch.float64)
            delta[list(pruned)] = w[list(pruned)]
            losses[pruned] = float(((x_in @ delta) ** 2).mean())
        optimum = min(losses.values())
        keep = _icbs(problem, **THOROUGH).keep
        assert int((~keep).sum()) == 4
        assert losses[tuple(torch.nonzero(~keep[0]).flatten().tolist())] == pytest.approx(optimum, rel=1e-9)
        wanda_keep = get_solver("wanda")(problem).keep
        wanda_suboptimal += losses[tuple(torch.nonzero(~wanda_keep[0]).flatten().tolist())] > optimum * (
            1 + 1e-9
        )
    assert wanda_suboptimal >= 1  # otherwise the check above would not test anything


def test_negative_couplings_are_exploited():
    """Two near-duplicate inputs with weights +2 and -2 cancel: pruning both costs almost nothing.

    Per-weight scores (Wanda) keep both; a solver that drops the negative entries of Q (the
    reference's bug) sees two expensive weights. The brute-force best mask prunes both.
    """
    g = torch.Generator().manual_seed(0)
    x_in = torch.randn(64, 8, generator=g)
    x_in[:, 1] = x_in[:, 0] + 0.01 * torch.randn(64, generator=g)
    weight = torch.tensor([[2.0, -2.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]])
    problem = LayerProblem(
        "layer", weight, LayerStats.from_inputs(x_in, {SQ_NORMS, HESSIAN}), SparsitySpec(0.5)
    )

    def loss(pruned: tuple[int, ...]) -> float:
        delta = torch.zeros(8, dtype=torch.float64)
        delta[list(pruned)] = weight[0, list(pruned)].double()
        return float(((x_in.double() @ delta) ** 2).mean())

    best = min(itertools.combinations(range(8), 4), key=loss)
    assert {0, 1} <= set(best)
    assert get_solver("wanda")(problem).keep[0, :2].all()
    keep = _icbs(problem, **THOROUGH).keep
    assert tuple(torch.nonzero(~keep[0]).flatten().tolist()) == best


@pytest.mark.parametrize("init", ["wanda", "magnitude"])
def test_unstructured_counts_per_row_are_the_init_masks(init):
    problem = _problem(8, 40, 0.6, seed=1)
    init_keep = get_solver(init)(problem).keep
    result = _icbs(problem, init=init, steps=6, block_size=12, update=False)
    assert torch.equal(result.keep.sum(1), init_keep.sum(1))
    assert result.weight is None


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "4:8"])
def test_nm_patterns_stay_valid(pattern):
    spec = SparsitySpec.parse(pattern)
    problem = _problem(6, 32, pattern, seed=2)
    keep = _icbs(problem, steps=6, block_size=16, ridge=0.0, update=False).keep
    assert nm_violations(keep, spec.pattern) == 0
    assert (keep.view(6, -1, spec.pattern.m).sum(-1) == spec.pattern.n).all()
    assert _error(problem, keep) <= _error(problem, get_solver("wanda")(problem).keep) * (1 + 1e-12)


def test_deterministic_for_a_seed():
    problem = _problem(6, 32, 0.5, seed=4)
    first = _icbs(problem, seed=3, steps=5, block_size=8).keep
    again = _icbs(problem, seed=3, steps=5, block_size=8).keep
    assert torch.equal(first, again)


def test_the_run_seed_reaches_icbs(token_ids):
    """Through the engine: one run seed gives one set of masks, two seeds give two (the annealer draws
    from the per-module generator the engine seeds from the run seed and the module name)."""

    def masks(seed: int) -> dict[str, torch.Tensor]:
        kw = dict(dataset=token_ids, num_calibration_samples=6, max_seq_length=24, progress=False)
        opts = dict(steps=6, block_size=8, update=False, ridge=0.0, beta_range=(0.1, 1.0))
        return llmprune.prune(make_model("llama"), None, method="icbs", seed=seed, **kw, **opts).keep_masks

    first, again, other = masks(1), masks(1), masks(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_time_budget_stops_the_descent():
    """A budget smaller than one step leaves the init mask as it is; without it the descent moves it."""
    problem = _problem(6, 32, 0.5, seed=6)
    wanda_keep = get_solver("wanda")(problem).keep
    options = dict(steps=4, block_size=8, ridge=0.0, update=False)
    assert not torch.equal(_icbs(problem, **options).keep, wanda_keep)
    assert torch.equal(_icbs(problem, time_budget=1e-9, **options).keep, wanda_keep)
    history: list[float] = []
    refine(problem.weight, problem.stats.hessian, wanda_keep, steps=4, block_size=8, time_budget=1e-9,
           history=history)  # fmt: skip
    assert len(history) == 1  # the loss before step 0, and no step after it


def test_frozen_fraction_and_restarts_keep_the_mask_valid():
    problem = _problem(6, 32, 0.5, seed=6)
    wanda_keep = get_solver("wanda")(problem).keep
    for options in ({"frozen_fraction": 0.5}, {"restarts": 3, "sweeps": 1}):
        keep = _icbs(problem, steps=4, block_size=8, ridge=0.0, update=False, **options).keep
        assert torch.equal(keep.sum(1), wanda_keep.sum(1))
        assert _error(problem, keep) <= _error(problem, wanda_keep) * (1 + 1e-12)


def test_update_reconstructs_kept_weights():
    """update=False then a separate fixed-mask reconstruction must not beat update=True from the same init."""
    problem = _problem(6, 32, 0.5, seed=8, tokens=128)
    plain = _icbs(problem, steps=4, block_size=8, update=False, ridge=0.0)
    updated = _icbs(problem, steps=4, block_size=8, init="wanda", ridge=0.0)
    assert torch.equal(updated.keep.sum(1), plain.keep.sum(1))
    assert (updated.weight[~updated.keep] == 0).all()
    assert not torch.signbit(updated.weight[~updated.keep]).any()
    h = problem.stats.hessian
    assert reconstruction_error(problem.weight, updated.weight, h) < _error(problem, plain.keep)


def _row_least_squares(weight: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Independent reference: per row, solve H_SS w'_S = (w H)_S in float64."""
    w, h = weight.double(), h.double()
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        s = keep[r].nonzero().flatten()
        out[r, s] = torch.linalg.solve(h[s][:, s], (w[r] @ h)[s])
    return out


@pytest.mark.parametrize("spec", [0.5, 0.75, "2:4"])
def test_refit_kept_is_the_per_row_least_squares_optimum(spec):
    problem = _problem(5, 24, spec, seed=9, tokens=96)
    h = ridged_hessian(problem.stats.hessian.double(), 0.01).float()
    keep = get_solver("wanda")(problem).keep

    def refit(iterations: int):  # iCBS's refit: no early stop
        return masked_least_squares(problem.weight, h, keep, problem.weight, iterations=iterations, rtol=0.0)

    fitted = refit(60)
    reference = _row_least_squares(problem.weight, h, keep)
    assert torch.allclose(fitted.double(), reference, rtol=1e-3, atol=1e-4)
    assert (fitted[~keep] == 0).all()
    # a few iterations already lower the loss, never raise it
    losses = [reconstruction_error(problem.weight, refit(i), h) for i in (0, 1, 2, 4, 8)]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.9 * losses[0]


def test_update_mode_block_qubo_is_the_row_loss_up_to_a_constant():
    """Kept weights at their current (updated) values: x^T Q x + c^T x - loss(x) is the same for all 2^B x."""
    problem = _problem(1, 10, 0.5, seed=10, tokens=40)
    h = problem.stats.hessian.double()
    start = get_solver("sparsegpt")(problem)
    state = _Descent(problem.weight, h, start.keep, start.weight)
    values = state.values()
    f2 = 2.0 * (values * state.g).float()
    idx = torch.tensor([[0, 2, 3, 5, 6, 9]])
    q, c = block_qubo(values.float(), h.float(), f2, state.pruned.float(), idx)
    gaps = []
    for bits in itertools.product([0.0, 1.0], repeat=6):
        x = torch.tensor([bits])
        new = state.new.clone()
        new[0, idx[0]] = torch.where(x[0] > 0, 0.0, values[0, idx[0]])
        delta = problem.weight.double() - new
        direct = float((delta @ h @ delta.T).squeeze())
        gaps.append(float(qubo_energy(q, x, c).squeeze()) - direct)
        _, _, _, trial_loss, _ = state.trial(values, idx, x.bool())
        if trial_loss.numel():  # rows whose block changed: the incremental loss is the direct one
            assert float(trial_loss[0]) == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert max(gaps) - min(gaps) < 1e-4 * max(1.0, abs(min(gaps)))


@pytest.mark.parametrize("spec", [0.5, 0.7, "2:4"])
def test_update_mode_is_monotone_and_never_worse_than_sparsegpt(spec):
    problem = _problem(8, 32, spec, seed=11, tokens=128)
    h = ridged_hessian(problem.stats.hessian.double(), 0.1)
    start = get_solver("sparsegpt")(problem)
    history: list[float] = []
    keep, new = refine(
        problem.weight,
        problem.stats.hessian,
        start.keep,
        new_weight=start.weight,
        group_size=4 if spec == "2:4" else None,
        steps=6,
        block_size=8,
        ridge=0.1,
        history=history,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(b <= a for a, b in itertools.pairwise(history))
    assert history[-1] == pytest.approx(reconstruction_error(problem.weight, new, h), rel=1e-5)
    assert history[-1] < reconstruction_error(problem.weight, start.weight, h)
    assert torch.equal(keep.sum(1), start.keep.sum(1))
    assert torch.equal(new != 0, keep)
    result = _icbs(problem, steps=6, block_size=8)
    assert reconstruction_error(problem.weight, result.weight, h) < reconstruction_error(
        problem.weight, start.weight, h
    )


def test_dense_target_keeps_everything():
    problem = _problem(3, 8, 0.0)
    assert _icbs(problem).keep.all()


@pytest.mark.parametrize(
    "options",
    [
        {"init": "icbs"},
        {"block_size": 8, "block_pruned": 8},
        {"frozen_fraction": 1.0},
        {"ridge": -0.1},
        {"beta_range": (10.0, 1.0)},
        {"steps": -1},
        {"time_budget": 0},
        {"update": "yes"},
    ],
)
def test_bad_options_name_the_fix(options):
    with pytest.raises(ConfigError, match="icbs"):
        _icbs(_problem(2, 8, 0.5), **options)


def test_registered_with_its_options():
    info = get_solver("icbs")
    assert info.needs == frozenset({SQ_NORMS, HESSIAN})
    assert {"init", "steps", "block_size", "restarts", "time_budget", "update"} <= set(info.options())
    assert "seed" not in info.options()  # the run's seed drives iCBS: no option to contradict it
    with pytest.raises(ConfigError, match="frozen_fraction"):  # values are checked before any work
        info.check_options({"frozen_fraction": 2.0})
