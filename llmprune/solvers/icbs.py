"""iCBS (Rosenberg et al., arXiv 2411.17796): improve a one-shot mask by block coordinate descent.

Two modes share one descent (:func:`refine`); ``IcbsOptions.update`` picks one.

* ``update=True`` (default): start from SparseGPT's mask *and* weights and descend on the loss of the
  weights themselves, ``(w - ŵ) H (w - ŵ)^T`` per output row with ``H = mean x x^T`` (the layer-wise
  reconstruction loss ``||(W - Ŵ) X||^2 / tokens``). A kept weight is worth its current ŵ, a pruned
  one the value that best cancels the row's residual (one OBS re-add, ``g_j / H_jj``); every few
  steps the kept weights are re-fitted to the per-row least-squares optimum by CG (``solvers/pcg.py``).
* ``update=False``: the paper's mask-only descent from Wanda's mask. Weights keep their original
  values, so pruning the set ``x`` (x_j = 1: pruned) of one row costs exactly ``x^T Q x`` with
  ``Q = (w w^T) ∘ H``.

Rows are independent, so every row is improved at once, as one batch of tensors. Each step picks, per
row, a block of B weights: the k pruned weights whose un-pruning would save the most and the B - k
kept weights whose pruning would cost the least (with the rest of the row fixed, restoring a pruned j
saves ``2 (Qx)_j - Q_jj``, pruning a kept j costs ``2 (Qx)_j + Q_jj``, Q built from each weight's
value as above), skipping weights chosen in recent steps (tabu) and, optionally, a frozen fraction
that is surely pruned or surely kept. With the rest of the row fixed, the block is a QUBO
``min x^T Q_bb x + c^T x`` with ``c = 2 Q_bo x_o`` and ``sum x = k``, solved by simulated annealing
over swap moves (``qubo.anneal``); a row takes the new assignment only if its exact fp64 loss drops,
so the layer loss never rises from step to step (step 0 is the one-shot start: an anytime algorithm
whose quality-time knob is ``steps`` or ``time_budget``). Negative couplings of Q are kept (the
reference zeroes them): they are the interactions between weights that a one-shot score cannot see.

N:M patterns: a block is made of whole aligned groups and swaps stay inside a group.

Defaults (B = 32, k = B/4, 20 steps, 2 sweeps, 1 restart, beta 3 -> 300; ridge 0.03 with update, 0.5
without, see ``DEFAULT_RIDGE``) were chosen on held-out layer losses of SmolLM2-135M; the ridge with
update was then re-chosen on the validation text (``scripts/choose_defaults.py icbs``: whole-model
perplexity at 70 %, 0.01 / 0.03 / 0.1 / 0.3 gave 302.7 / 301.8 / 307.8 / 319.0). The ridge
(the paper's λ) matters: without it the mask-only calibration loss falls to a quarter of Wanda's, but
a mask fitted that closely to a few thousand tokens does no better than Wanda's on other text. The
paper's blocks are far larger (B = 4096) because it solves the whole model at once. The annealer's
randomness comes from torch's generator, which the engine seeds per module from the run's seed.

Left out: the paper's full-model mode (a Fisher/gradient loss over all layers jointly, with a
first-order term). In a block-sequential engine each solver minimises the layer-wise loss above,
which needs no gradients.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from llmprune.errors import ConfigError, DataError
from llmprune.registry import get_solver, register_solver
from llmprune.solvers.hessian import checked_hessian
from llmprune.solvers.pcg import masked_least_squares
from llmprune.solvers.qubo import anneal
from llmprune.solvers.threads import intra_op_threads
from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerProblem, SolverResult

log = logging.getLogger(__name__)

#: a row's new mask must beat its loss by this relative margin, far above fp64 rounding of the field
_MARGIN = 1e-10
#: below one swapped weight per this many mask entries, the field is updated row-of-H by row-of-H
_SPARSE_UPDATE = 96
#: rows of block QUBOs annealed at once are capped so that rows x restarts x B^2 stays below this
_MAX_QUBO_ENTRIES = 1 << 24


def ridged_hessian(hessian: Tensor, ridge: float) -> Tensor:
    """``H + ridge * mean(diag H) * I``: the paper's ``λ ||δ||^2`` term, scale-free.

    It adds ``ridge * mean(diag H) * w_j^2`` to the cost of pruning w_j. Off-diagonal couplings of a
    Hessian from a few thousand calibration tokens are noisy, and a mask fitted to them exactly
    transfers badly to other text; the ridge keeps the search to couplings that stand out.
    """
    if ridge == 0:
        return hessian
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    return hessian + ridge * torch.diagonal(hessian).mean() * eye


def _rank(score: Tensor) -> Tensor:
    """(rows, n) position of each entry in its row sorted by descending score (0 = highest)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(
        -1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order)
    )


def _pick(tier: Tensor, score: Tensor, count: int) -> Tensor:
    """Indices of ``count`` entries per row: lowest tier first, highest score within a tier.

    One ``topk`` on ``score - tier * span``, where ``span`` exceeds the row's score range, so tiers
    never mix (a full sort of the row is ten times slower). Scores must be finite.
    """
    span = score.amax(-1, keepdim=True) - score.amin(-1, keepdim=True) + 1.0  # (rows, 1)
    return torch.topk(score - tier * (2.0 * span), count, dim=-1, sorted=False).indices


def _select_unstructured(
    gain: Tensor, cost: Tensor, pruned: Tensor, held: Tensor, k: int, size: int
) -> Tensor:
    """(rows, size) block: k pruned weights most worth restoring + size - k kept ones cheapest to prune.

    ``pruned`` is 1.0 where pruned; ``held`` (rows, in) is 0 for eligible weights, 1 for tabu ones, 2
    for frozen ones: a row short of eligible weights takes tabu ones, then frozen ones, then the other
    kind (the annealer then just sees another count of ones). Tiers are float arithmetic, not
    ``torch.where``, which is several times slower on CPU.
    """
    tier_pruned = (held - 3.0).mul_(pruned).add_(3.0)  # held where pruned, 3 where kept
    first = _pick(tier_pruned, gain, k)
    tier_kept = (held + 3.0).sub_(tier_pruned).scatter_(-1, first, 4.0)  # held where kept, 3 where pruned
    return torch.cat([first, _pick(tier_kept, -cost, size - k)], dim=-1)


def _group_estimate(gain: Tensor, cost: Tensor, pruned: Tensor, m: int) -> Tensor:
    """(rows, in/m) best single swap saving per aligned group, ignoring the pair's coupling."""
    rows = gain.shape[0]
    is_pruned = pruned > 0.5
    best_gain = gain.masked_fill(~is_pruned, -math.inf).view(rows, -1, m).amax(-1)
    best_cost = cost.masked_fill(is_pruned, math.inf).view(rows, -1, m).amin(-1)
    return torch.nan_to_num(best_gain - best_cost, nan=-1e30, posinf=1e30, neginf=-1e30)


def _select_groups(gain: Tensor, cost: Tensor, pruned: Tensor, held: Tensor, m: int, groups: int) -> Tensor:
    """(rows, groups * m) block of whole aligned groups with the best estimated swap saving."""
    rows = gain.shape[0]
    chosen = _pick(held, _group_estimate(gain, cost, pruned, m), groups)  # (rows, groups)
    return (chosen.unsqueeze(-1) * m + torch.arange(m, device=chosen.device)).reshape(rows, groups * m)


def _frozen(gain: Tensor, cost: Tensor, pruned: Tensor, fraction: float, group_size: int | None) -> Tensor:
    """(rows, units) 1.0 for units never put in a block: surely pruned or surely kept from the start.

    Unstructured: the ``fraction`` of each row's pruned weights least worth restoring and of its kept
    weights dearest to prune. N:M: the ``fraction`` of groups with the lowest estimated swap saving.
    """
    if group_size:
        estimate = _group_estimate(gain, cost, pruned, group_size)
        return (_rank(-estimate) < int(fraction * estimate.shape[-1])).float()
    is_pruned = pruned > 0.5
    n_pruned = is_pruned.sum(-1, keepdim=True)
    width = pruned.shape[-1]
    low_gain = _rank(-gain.masked_fill(~is_pruned, math.inf)) < (fraction * n_pruned).floor()
    high_cost = _rank(cost.masked_fill(is_pruned, -math.inf)) < (fraction * (width - n_pruned)).floor()
    return ((is_pruned & low_gain) | (~is_pruned & high_cost)).float()


def block_qubo(
    values: Tensor, h32: Tensor, f2: Tensor, pruned32: Tensor, idx: Tensor
) -> tuple[Tensor, Tensor]:
    """Each row's block QUBO ``(Q_bb, c)``: the row loss is ``x_b^T Q_bb x_b + c^T x_b`` + a constant.

    A block weight j takes ``values_j`` if kept and 0 if pruned (x_j = 1), so ``Q_bb = (v v^T) ∘ H_bb``
    and ``c = 2 Q_bo x_o = (2 Q x)_b - 2 Q_bb x_b``: the rest of the row, fixed, seen by the block as
    a linear term. ``f2`` is ``2 Q x`` = 2 v ∘ ((w - ŵ) H) of the current state. -> (rows, B, B), (rows, B).
    """
    width = values.shape[1]
    size = idx.shape[1]
    vb = values.gather(1, idx)  # (rows, B)
    pair = (idx.unsqueeze(-1) * width + idx.unsqueeze(-2)).view(-1)
    q = h32.view(-1).index_select(0, pair).view(-1, size, size)
    q.mul_(vb.unsqueeze(-1) * vb.unsqueeze(-2))  # (rows, B, B) = (v v^T) ∘ H on the block
    x = pruned32.gather(1, idx)  # (rows, B)
    linear = f2.gather(1, idx).sub_(torch.bmm(q, x.unsqueeze(-1)).squeeze(-1), alpha=2.0)
    return q, linear


def _solve_blocks(
    values: Tensor,
    h32: Tensor,
    f2: Tensor,
    pruned32: Tensor,
    idx: Tensor,
    group_size: int | None,
    **anneal_options,
) -> Tensor:
    """Anneal every row's block QUBO; rows go in chunks so that Q (rows, B, B) stays a few hundred MB.

    Returns the new block assignment (out, B) bool.
    """
    rows = values.shape[0]
    size = idx.shape[1]
    chunk = max(1, _MAX_QUBO_ENTRIES // (size * size * anneal_options.get("restarts", 1)))
    out = []
    for r0 in range(0, rows, chunk):
        sl = slice(r0, min(rows, r0 + chunk))
        q, linear = block_qubo(values[sl], h32, f2[sl], pruned32[sl], idx[sl])
        x = pruned32[sl].gather(1, idx[sl])
        out.append(anneal(q, linear, x, group_size=group_size, **anneal_options)[0])
    return torch.cat(out)


class _Descent:
    """Per-row state of the descent, fp64: weights ``new`` (ŵ), field ``g = (w - ŵ) H``, loss ``(w - ŵ)·g``.

    Mask-only mode (the paper's): kept weights stay at their original values, so every weight's
    value if kept is ``w``. Update mode: a kept weight's value is its current ŵ, and a pruned one
    would come back at ``g_j / H_jj``, the value that best cancels the row's residual with the rest
    fixed (one OBS re-add); kept weights are re-fitted every few steps by CG (``solvers/pcg.py``).
    """

    def __init__(self, weight: Tensor, hessian: Tensor, keep: Tensor, new_weight: Tensor | None) -> None:
        self.w = weight.detach().to(torch.float64)  # (out, in)
        self.h = hessian  # (in, in) fp64, ridged
        self.h32 = hessian.to(torch.float32)
        self.h_diag32 = torch.diagonal(self.h32).clamp_min(torch.finfo(torch.float32).tiny)
        self.update = new_weight is not None
        start = self.w if new_weight is None else new_weight.detach().to(torch.float64)
        self.pruned = (~keep).to(torch.float64)  # (out, in) 1.0 = pruned
        self.new = start.masked_fill(~keep, 0.0)
        self.g, self.loss = self._field_and_loss(self.w - self.new)

    def _field_and_loss(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        g = delta @ self.h
        return g, (delta * g).sum(-1)

    def values(self) -> Tensor:
        """(out, in) fp64: what each weight is worth if kept (see the class docstring)."""
        if not self.update:
            return self.w
        return torch.where(self.pruned > 0.5, self.g / self.h_diag32.to(torch.float64), self.new)

    def trial(
        self, values: Tensor, idx: Tensor, x_new: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Rows whose block changed (changed,), with their new weights, field, loss and pruned mask.

        With few swaps per row, the field moves by just the swapped weights' rows of H, O(changes x
        in); with many, one product over the changed rows is cheaper than gathering that many rows.
        """
        x_new = x_new.to(torch.bool)
        change = x_new.to(torch.float64) - self.pruned.gather(1, idx)  # (out, B) in {-1, 0, 1}
        rows = change.any(-1).nonzero().squeeze(1)  # (changed,)
        change, sub_idx, x_rows = change[rows], idx[rows], x_new[rows]
        block_values = values[rows].gather(1, sub_idx)  # (changed, B)
        new = self.new[rows].scatter_(1, sub_idx, block_values.masked_fill(x_rows, 0.0))
        pruned = self.pruned[rows].scatter_(1, sub_idx, x_rows.to(torch.float64))
        step = change * block_values  # how much the residual w - ŵ moves at each block weight
        at, slots = step.nonzero(as_tuple=True)  # (swapped weights,)
        if at.numel() * _SPARSE_UPDATE < new.numel():
            coeff = step[at, slots]
            moved = torch.zeros_like(new).index_add_(
                0, at, self.h.index_select(0, sub_idx[at, slots]) * coeff.unsqueeze(1)
            )
            g = self.g[rows] + moved
            loss = ((self.w[rows] - new) * g).sum(-1)
        else:
            g, loss = self._field_and_loss(self.w[rows] - new)
        return rows, new, g, loss, pruned

    def accept(
        self, rows: Tensor, new: Tensor, g: Tensor, loss: Tensor, pruned: Tensor | None = None
    ) -> bool:
        """Take the rows whose loss drops by more than fp64 rounding could explain: the loss is monotone."""
        old = self.loss.index_select(0, rows)
        better_at = (loss < old - _MARGIN * old.abs()).nonzero().squeeze(1)
        if not better_at.numel():
            return False
        better = rows.index_select(0, better_at)
        self.new.index_copy_(0, better, new.index_select(0, better_at))
        self.g.index_copy_(0, better, g.index_select(0, better_at))
        self.loss.index_copy_(0, better, loss.index_select(0, better_at))
        if pruned is not None:
            self.pruned.index_copy_(0, better, pruned.index_select(0, better_at))
        return True

    def refit(self, iterations: int, threads: int) -> bool:
        """Re-fit every row's kept weights by CG (``solvers/pcg.py``); rows take it where the loss drops."""
        if iterations <= 0:
            return False
        keep = self.pruned < 0.5
        with intra_op_threads(threads):  # a few large GEMMs: the caller's threads pay off here
            new = masked_least_squares(self.w, self.h32, keep, self.new, iterations=iterations, rtol=0.0)
            new = new.to(torch.float64)
            g, loss = self._field_and_loss(self.w - new)
        rows = torch.arange(self.w.shape[0], device=self.w.device)
        return self.accept(rows, new, g, loss)


def refine(
    weight: Tensor,
    hessian: Tensor,
    keep: Tensor,
    *,
    new_weight: Tensor | None = None,
    group_size: int | None = None,
    steps: int = 20,
    block_size: int = 32,
    block_pruned: int | None = None,
    sweeps: int = 2,
    restarts: int = 1,
    tabu_steps: int = 2,
    frozen_fraction: float = 0.0,
    ridge: float = 0.0,
    beta_range: tuple[float, float] = (3.0, 300.0),
    refit_iterations: int = 5,
    refit_every: int = 5,
    time_budget: float | None = None,
    generator: torch.Generator | None = None,
    history: list[float] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Block coordinate descent on the keep-mask of ``weight`` (out, in) under ``hessian`` (in, in).

    ``new_weight=None``: mask-only (the paper's), objective ``(w∘x)^T H (w∘x)`` per row (x: pruned)
    under ``ridged_hessian(hessian, ridge)``; returns ``(keep, None)``. With ``new_weight`` (the init
    solver's reconstructed weights, or the masked originals), the objective is the loss of the
    weights themselves, ``(w - ŵ) H (w - ŵ)^T``, mask and weights move together (kept weights are
    re-fitted by ``refit_iterations`` CG iterations every ``refit_every`` steps, twice that before the
    first and after the last); returns ``(keep, ŵ)``. Every row keeps its pruned count (per aligned
    group of ``group_size`` for N:M). ``history`` receives the objective before the first step and
    after each step; it never increases.
    """
    h = ridged_hessian(hessian.detach().to(torch.float64), ridge)  # (in, in)
    state = _Descent(weight, h, keep, new_weight)
    rows, width = state.w.shape
    units = width // (group_size or 1)
    size = min(block_size, width)
    if group_size:
        size = max(1, min(units, size // group_size)) * group_size
    k = min(size - 1, max(1, block_pruned if block_pruned is not None else size // 4))
    threads = torch.get_num_threads()
    if state.update:
        state.refit(2 * refit_iterations, threads)

    def marginals() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Values, (2 Q x), the saving of restoring each pruned weight, the cost of pruning each kept."""
        values = state.values()
        v32 = values.to(torch.float32)
        f2 = 2.0 * (values * state.g).to(torch.float32)  # (Q x)_j = v_j (H (w - ŵ))_j
        diag_q = v32 * v32 * state.h_diag32
        return values, f2, f2 - diag_q, f2 + diag_q

    # many small ops per step: one thread avoids a hand-off per op (see threads.intra_op_threads)
    with intra_op_threads(1):
        values, f2, gain, cost = marginals()
        if history is not None:
            history.append(float(state.loss.sum()))
        frozen = torch.zeros(rows, units, device=state.w.device)
        if frozen_fraction > 0:
            frozen = _frozen(gain, cost, state.pruned.to(torch.float32), frozen_fraction, group_size)
        tabu_until = torch.zeros(rows, units, device=state.w.device)
        start = time.perf_counter()
        for step in range(steps):
            if time_budget is not None and time.perf_counter() - start >= time_budget:
                log.debug("time budget of %.1fs reached after %d of %d steps", time_budget, step, steps)
                break
            held = torch.maximum((tabu_until > step).to(torch.float32), 2.0 * frozen)  # (rows, units)
            pruned32 = state.pruned.to(torch.float32)
            if group_size:
                idx = _select_groups(gain, cost, pruned32, held, group_size, size // group_size)
                tabu_until.scatter_(1, idx[:, ::group_size] // group_size, float(step + 1 + tabu_steps))
            else:
                idx = _select_unstructured(gain, cost, pruned32, held, k, size)
                tabu_until.scatter_(1, idx, float(step + 1 + tabu_steps))
            x_new = _solve_blocks(
                values.to(torch.float32),
                state.h32,
                f2,
                pruned32,
                idx,
                group_size,
                sweeps=sweeps,
                restarts=restarts,
                beta_range=beta_range,
                generator=generator,
            )
            moved = state.accept(*state.trial(values, idx, x_new))
            if state.update and refit_every and (step + 1) % refit_every == 0:
                moved = state.refit(refit_iterations, threads) or moved
            if moved:
                values, f2, gain, cost = marginals()
            if history is not None:
                history.append(float(state.loss.sum()))
        if state.update and state.refit(2 * refit_iterations, threads) and history is not None:
            history[-1] = float(state.loss.sum())
    keep = state.pruned < 0.5
    return keep, (state.new.to(torch.float32).masked_fill(~keep, 0.0) if state.update else None)


#: the ridge (in units of mean(diag H)) each mode defaults to, tuned on SmolLM2 layers' held-out loss
DEFAULT_RIDGE = {False: 0.5, True: 0.03}


def _int_option(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"icbs option {name} must be an integer >= {low}, got {value!r}.")


@dataclass(frozen=True)
class IcbsOptions:
    """iCBS's knobs (``prune(method="icbs", **options)``, ``--option key=value``), checked on creation.

    ``update=True`` (default): mask and kept weights move together under the loss of the
    reconstructed weights, starting from ``init``'s mask and weights (default ``sparsegpt``); the
    kept weights are re-fitted by CG least squares (``refit_iterations`` every ``refit_every`` steps).
    ``update=False``: the paper's mask-only descent with weights left at their original values,
    starting from ``init``'s mask (default ``wanda``; its weight update, if any, is ignored).

    Each of ``steps`` steps re-solves, in every row, a block of ``block_size`` weights of which
    ``block_pruned`` (default a quarter) are pruned, by ``sweeps`` x ``block_size`` annealing moves
    in each of ``restarts`` chains, ``beta_range`` being the inverse temperatures (in units of the
    row's spread of flip costs). Weights picked in the last ``tabu_steps`` steps sit out, and a
    ``frozen_fraction`` of surely pruned / surely kept weights never enters a block. ``ridge`` (the
    paper's λ, in units of mean(diag H); default 0.03 with update, 0.5 without) adds
    ``ridge * mean(diag H) * |w - ŵ|^2`` to the loss: it keeps the search from fitting noise in the
    calibration Hessian. ``time_budget`` caps the seconds spent on steps per layer (results then
    depend on machine speed).
    """

    init: str | None = None
    steps: int = 20
    block_size: int = 32
    block_pruned: int | None = None
    sweeps: int = 2
    restarts: int = 1
    tabu_steps: int = 2
    frozen_fraction: float = 0.0
    ridge: float | None = None
    beta_range: tuple[float, float] = (3.0, 300.0)
    time_budget: float | None = None
    update: bool = True
    refit_iterations: int = 5
    refit_every: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.update, bool):
            raise ConfigError(f"icbs option update must be true or false, got {self.update!r}.")
        if self.init == "icbs":
            raise ConfigError(
                "icbs cannot start from its own mask: set init to a one-shot method such as 'sparsegpt' "
                "or 'wanda'."
            )
        _int_option("steps", self.steps, 0)
        _int_option("block_size", self.block_size, 2)
        _int_option("sweeps", self.sweeps)
        _int_option("restarts", self.restarts)
        _int_option("tabu_steps", self.tabu_steps, 0)
        _int_option("refit_iterations", self.refit_iterations, 0)
        _int_option("refit_every", self.refit_every, 0)
        if self.block_pruned is not None:
            _int_option("block_pruned", self.block_pruned)
            if self.block_pruned >= self.block_size:
                raise ConfigError(
                    f"icbs option block_pruned={self.block_pruned} must be smaller than "
                    f"block_size={self.block_size}: a block needs both pruned and kept weights to swap."
                )
        fraction = self.frozen_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ConfigError(f"icbs option frozen_fraction must be in [0, 1), got {fraction!r}.")
        ridge = self.ridge
        if ridge is not None and (
            isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < math.inf
        ):
            raise ConfigError(
                f"icbs option ridge must be a finite number >= 0 (default {DEFAULT_RIDGE[True]} with "
                f"update, {DEFAULT_RIDGE[False]} without), got {ridge!r}."
            )
        beta = self.beta_range
        if (
            not isinstance(beta, (tuple, list))
            or len(beta) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in beta)
            or not 0 < beta[0] <= beta[1] < math.inf
        ):
            raise ConfigError(
                f"icbs option beta_range must be two numbers 0 < start <= end, e.g. [3, 300], got {beta!r}."
            )
        budget = self.time_budget
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0
        ):
            raise ConfigError(
                f"icbs option time_budget must be a number of seconds > 0 or None, got {budget!r}."
            )

    @property
    def init_solver(self) -> str:
        return self.init or ("sparsegpt" if self.update else "wanda")

    @property
    def ridge_value(self) -> float:
        return DEFAULT_RIDGE[self.update] if self.ridge is None else float(self.ridge)

    def refine_options(self) -> dict:
        """The keywords of :func:`refine` these options set (every field of the same name, with the
        mode's default ridge filled in)."""
        accepted = inspect.signature(refine).parameters
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in accepted}
        return values | {"ridge": self.ridge_value, "beta_range": tuple(self.beta_range)}


@register_solver("icbs", needs={SQ_NORMS, HESSIAN}, options=IcbsOptions)
def icbs(problem: LayerProblem, **options) -> SolverResult:
    """iCBS: refine a one-shot mask by block coordinate descent on the layer loss (annealed QUBOs).

    ``options`` are :class:`IcbsOptions`. Sparsity per row (per N:M group) is the init mask's,
    exactly. The annealer draws from torch's random generator, which the engine seeds per module from
    the run's ``seed`` and the module's name: one seed gives one mask, another seed another.
    """
    opts = IcbsOptions(**options)
    init = opts.init_solver
    update = opts.update
    weight, spec = problem.weight, problem.spec
    out, width = weight.shape
    if spec.is_dense:
        return SolverResult(keep=torch.ones_like(weight, dtype=torch.bool))
    spec.check_width(width, problem.name)
    hessian = checked_hessian("icbs", problem.name, weight, problem.stats.hessian)
    starter = get_solver(init)
    missing = starter.needs - {SQ_NORMS, HESSIAN}
    if missing:
        raise ConfigError(
            f"icbs init={init!r} needs statistics icbs does not collect ({', '.join(sorted(missing))}): "
            "choose another init, e.g. 'sparsegpt' or 'wanda'."
        )
    first = starter(problem)
    keep = first.keep.to(torch.bool)
    if keep.shape != weight.shape:
        raise DataError(
            f"init solver {init!r} returned a mask of shape {tuple(keep.shape)}, not {(out, width)}."
        )
    if bool(keep.all()) or not bool(keep.any()):
        return SolverResult(keep=keep, weight=first.weight if update else None)  # nothing to swap
    start_weight = None
    if update:
        start_weight = weight if first.weight is None else first.weight
    seed = int(torch.randint(0, 2**62, (1,)))  # from the engine-seeded generator: per run seed and module
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    history: list[float] = []
    started = time.perf_counter()
    keep, new_weight = refine(
        weight,
        hessian,
        keep,
        new_weight=start_weight,
        group_size=spec.pattern.m if spec.pattern else None,
        generator=generator,
        history=history,
        **opts.refine_options(),
    )
    log.debug(
        "icbs %s: layer loss %.4g -> %.4g (%.1f%% of %s's) in %d steps, %.1fs",
        problem.name,
        history[0],
        history[-1],
        100.0 * history[-1] / history[0] if history[0] > 0 else 100.0,
        init,
        len(history) - 1,
        time.perf_counter() - started,
    )
    return SolverResult(keep=keep, weight=new_weight)
