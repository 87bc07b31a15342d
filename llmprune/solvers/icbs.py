"""iCBS (Rosenberg et al., arXiv 2411.17796): improve a one-shot mask by block coordinate descent.

Weights keep their original values, so pruning the set ``x`` (x_j = 1: pruned) of one output row
costs exactly ``x^T Q x`` with ``Q = (w w^T) ∘ H`` and ``H = mean x x^T`` (the layer-wise
reconstruction loss ``||(W - Ŵ) X||^2 / tokens`` summed over rows). Rows are independent, so every
row is improved at once, as one batch of tensors.

Each step picks, per row, a block of B weights: the k pruned weights whose un-pruning would save the
most and the B - k kept weights whose pruning would cost the least (both read off the marginal costs
``±2 (Qx)_j + Q_jj`` with the rest of the row fixed), skipping weights chosen in recent steps (tabu)
and a frozen fraction that is surely pruned or surely kept. With the rest of the row fixed, the
block is a QUBO ``min x^T Q_bb x + c^T x`` with ``c = 2 Q_bo x_o`` and ``sum x = k``, solved by
simulated annealing (``qubo.anneal``); the new assignment is taken only where it lowers the exact
objective, so the layer loss never rises from step to step (step 0 is the one-shot mask).
Negative couplings of Q are kept: they are the interactions a one-shot score cannot see.

N:M patterns: a block is made of whole aligned groups and swaps stay inside a group.

Left out: the paper's full-model mode (a Fisher/gradient loss over all layers jointly, with a
first-order term); in a block-sequential engine the layer-wise loss above is what each solver
minimises, and it needs no gradients.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import Tensor

from llmprune.errors import ConfigError, DataError
from llmprune.registry import get_solver, register_solver
from llmprune.solvers.qubo import anneal, qubo_energy
from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerProblem, SolverResult

log = logging.getLogger(__name__)


def mask_objective(weight: Tensor, hessian: Tensor, keep: Tensor) -> Tensor:
    """Per-row loss ``(w∘x)^T H (w∘x)`` of pruning ``~keep`` without weight update. -> (out,) float64."""
    pruned = weight.to(torch.float64).masked_fill(keep, 0.0)  # (out, in)
    return ((pruned @ hessian.to(torch.float64)) * pruned).sum(-1)


def _rank(score: Tensor) -> Tensor:
    """(rows, n) position of each entry in its row sorted by descending score (0 = highest)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[-1]).expand_as(order))


def _pick(tier: Tensor, score: Tensor, count: int) -> Tensor:
    """Indices of ``count`` entries per row: lowest tier first, highest score within a tier."""
    width = score.shape[-1]
    key = tier * width + _rank(score)
    return torch.topk(key, count, dim=-1, largest=False, sorted=True).indices


def _select_unstructured(gain: Tensor, cost: Tensor, pruned: Tensor, blocked: Tensor, frozen: Tensor, k: int, size: int) -> Tensor:
    """(rows, size) block: k pruned weights most worth restoring + size - k kept ones cheapest to prune.

    Tiers keep the block well formed when a row runs short of eligible weights: tabu ones come
    next, then frozen ones, then the other kind (the annealer then just sees another count).
    """
    kept = ~pruned
    base = torch.where(blocked & ~frozen, 1, torch.where(frozen, 2, 0))  # (rows, in)
    first = _pick(torch.where(pruned, base, 3), gain, k)
    taken = torch.zeros_like(pruned).scatter_(-1, first, True)
    tier = torch.where(kept, base, 3).masked_fill(taken, 4)
    second = _pick(tier, -cost, size - k)
    return torch.cat([first, second], dim=-1)


def _select_groups(
    gain: Tensor, cost: Tensor, pruned: Tensor, blocked: Tensor, frozen: Tensor, m: int, groups: int
) -> Tensor:
    """(rows, groups * m) block of whole aligned groups with the best estimated swap gain."""
    rows, width = gain.shape
    g_gain = gain.masked_fill(~pruned, -math.inf).view(rows, -1, m).amax(-1)  # (rows, in/m)
    g_cost = cost.masked_fill(pruned, math.inf).view(rows, -1, m).amin(-1)
    estimate = torch.nan_to_num(g_gain - g_cost, nan=-math.inf)
    tier = torch.where(frozen, 2, torch.where(blocked, 1, 0))
    chosen = _pick(tier, estimate, groups)  # (rows, groups)
    return (chosen.unsqueeze(-1) * m + torch.arange(m)).reshape(rows, groups * m)


def refine_mask(
    weight: Tensor,
    hessian: Tensor,
    keep: Tensor,
    *,
    group_size: int | None = None,
    steps: int = 40,
    block_size: int = 64,
    block_pruned: int | None = None,
    sweeps: int = 16,
    restarts: int = 2,
    tabu_steps: int = 4,
    frozen_fraction: float = 0.0,
    beta_range: tuple[float, float] = (0.3, 300.0),
    time_budget: float | None = None,
    generator: torch.Generator | None = None,
    history: list[float] | None = None,
) -> Tensor:
    """Block coordinate descent on the keep-mask of ``weight`` (out, in) under ``hessian`` (in, in).

    Returns a new keep-mask with the same pruned count per row (per aligned group of ``group_size``
    for N:M). ``history``, if given, receives the layer objective after every step (index 0 = the
    starting mask), which never increases.
    """
    w = weight.to(torch.float64)  # (out, in)
    h = hessian.to(torch.float64)  # (in, in)
    w32, h32 = weight.to(torch.float32), hessian.to(torch.float32)
    rows, width = w.shape
    pruned = ~keep.clone()  # (out, in) bool, True = pruned
    diag_q = w * w * torch.diagonal(h)  # (out, in) = Q_jj
    unit = group_size or 1
    units = width // unit
    size = min(block_size, width)
    if group_size:
        groups_per_block = max(1, min(units, size // group_size))
        size = groups_per_block * group_size
    k = min(size - 1, max(1, block_pruned if block_pruned is not None else size // 2))

    def field() -> Tensor:  # (out, in) float64: (Q x)_j for every row
        return w * ((w * pruned) @ h)

    f = field()
    if history is not None:
        history.append(float((f * pruned).sum()))
    gain, cost = 2 * f - diag_q, 2 * f + diag_q  # saving of restoring j / cost of pruning j

    # frozen: the fraction of pruned weights least worth restoring and of kept ones dearest to prune
    frozen = torch.zeros(rows, units, dtype=torch.bool)
    if frozen_fraction > 0 and not group_size:
        n_p = pruned.sum(-1, keepdim=True)
        frozen = pruned & (_rank(-gain.masked_fill(~pruned, math.inf)) < (frozen_fraction * n_p).floor())
        n_k = width - n_p
        frozen |= ~pruned & (_rank(cost.masked_fill(pruned, -math.inf)) < (frozen_fraction * n_k).floor())
    elif frozen_fraction > 0:
        est = gain.masked_fill(~pruned, -math.inf).view(rows, units, unit).amax(-1)
        est = est - cost.masked_fill(pruned, math.inf).view(rows, units, unit).amin(-1)
        est = torch.nan_to_num(est, nan=-math.inf)
        frozen = _rank(-est) < int(frozen_fraction * units)

    tabu_until = torch.zeros(rows, units, dtype=torch.long)
    start = time.perf_counter()
    row_idx = torch.arange(rows).unsqueeze(-1)
    for step in range(steps):
        if time_budget is not None and time.perf_counter() - start >= time_budget:
            log.debug("time budget %.1fs reached after %d steps", time_budget, step)
            break
        blocked = tabu_until > step
        if group_size:
            idx = _select_groups(gain, cost, pruned, blocked, frozen, group_size, size // group_size)
            idx_units = idx[:, ::group_size] // group_size
        else:
            idx = _select_unstructured(gain, cost, pruned, blocked, frozen, k, size)
            idx_units = idx
        tabu_until[row_idx, idx_units] = step + 1 + tabu_steps

        wb = w32.gather(1, idx)  # (out, B)
        q = wb.unsqueeze(-1) * wb.unsqueeze(-2) * h32[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (out, B, B)
        x = pruned.gather(1, idx)  # (out, B)
        q64 = q.to(torch.float64)
        # c = 2 Q_bo x_o: the rest of the row, seen by the block as a linear term
        linear = 2 * (f.gather(1, idx) - (q64 @ x.to(torch.float64).unsqueeze(-1)).squeeze(-1))
        x_new, _ = anneal(
            q, linear.to(torch.float32), x, group_size=group_size, sweeps=sweeps, restarts=restarts,
            beta_range=beta_range, generator=generator,
        )
        better = qubo_energy(q64, x_new, linear) < qubo_energy(q64, x, linear)  # (out,)
        if bool(better.any()):
            pruned.scatter_(1, idx, torch.where(better.unsqueeze(-1), x_new, x))
            f = field()
            gain, cost = 2 * f - diag_q, 2 * f + diag_q
        if history is not None:
            history.append(float((f * pruned).sum()))
    return ~pruned
