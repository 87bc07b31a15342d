"""Cardinality-constrained QUBOs: ``min_x x^T Q x + c^T x`` over x in {0,1}^B with fixed counts.

iCBS (``icbs.py``) reduces pruning a block of weights to this problem (x_j = 1: prune weight j). The
count of ones is fixed so a block swap can never change sparsity; with ``group_size`` the count is
fixed inside every aligned group of that size, so N:M patterns stay valid.

The annealer is batched over a leading dimension (one independent problem per output row). Its
independent reference, a brute-force minimum over every feasible x, lives in ``tests/test_icbs.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.solvers.threads import intra_op_threads

#: half of the penalty that rules a non-swap out of a best-partner search (float32 max is 3.4e38)
_HALF_BIG = 1e30


def anneal(
    q: Tensor,
    linear: Tensor,
    x0: Tensor,
    *,
    group_size: int | None = None,
    sweeps: int = 8,
    restarts: int = 2,
    beta_range: tuple[float, float] = (3.0, 300.0),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Simulated annealing over swap moves, batched over problems and restarts.

    A move picks a random anchor position p and pairs it with the partner q of opposite value (in
    the same group when ``group_size`` is set) whose swap costs least; the swap is accepted with the
    Metropolis probability ``min(1, exp(-beta * dE))``. Pairing with the best partner rather than a
    random one makes every move count at low temperature; the random anchor and the uphill moves
    accepted at high temperature keep the search from locking in. Swaps never change the number of
    ones (per group), so every visited state is feasible.

    Each chain keeps ``s = 2 Q x + c`` up to date, so a move costs O(B): the swap cost of (p, q) is
    ``phi_p + phi_q - 2 Q_pq`` with the flip costs ``phi = (1 - 2x) s + diag(Q)``. ``beta`` rises
    geometrically over ``beta_range`` per move, in units of each problem's spread of flip costs at
    x0, so one schedule fits rows of any weight scale. Restarts start from x0 with their own random
    anchors and acceptances; the best state a chain saw at the end of a sweep (B moves) is kept.

    q: (batch, B, B) symmetric; linear, x0: (batch, B). Returns x (batch, B) bool and its exact
    float64 energy (batch,): the best over restarts, possibly x0 itself. The caller decides whether
    to accept it.
    """
    batch, width = x0.shape
    size = group_size or width
    groups = width // size
    if groups * size != width:
        raise ValueError(f"block width {width} is not a multiple of group size {size}")
    device = q.device
    chains = batch * restarts
    owner = torch.arange(batch, device=device).repeat_interleave(restarts)  # (chains,) problem index

    q = q.to(torch.float32).contiguous()
    q_rows = q.reshape(batch * width, width)  # row b*B + i is Q_b[i, :]
    lin = linear.to(torch.float32)
    x_start = x0.to(torch.float32)
    s0 = 2.0 * torch.bmm(q, x_start.unsqueeze(-1)).squeeze(-1) + lin  # (batch, B) = 2 Q x0 + c
    diag = torch.diagonal(q, dim1=-2, dim2=-1)  # (batch, B)
    # temperature unit: the spread of single-flip costs at x0 (a swap costs two such terms)
    flip = (1.0 - 2.0 * x_start) * s0 + diag
    scale = (flip - flip.mean(-1, keepdim=True)).abs().mean(-1)
    scale = torch.where(scale > 0, scale, q.abs().mean((-2, -1))).clamp_min(torch.finfo(torch.float32).tiny)

    s = s0[owner].clone()  # (chains, B)
    sign = (1.0 - 2.0 * x_start)[owner].clone()  # (chains, B): +1 where x = 0, -1 where x = 1
    sign_flat = sign.view(-1)
    diag_c = diag[owner]  # (chains, B)
    energy = torch.zeros(chains, device=device)  # relative to x0, tracked incrementally
    best_sign, best_e = sign.clone(), energy.clone()

    group_of = torch.arange(width, device=device) // size  # (B,)
    other_group = group_of.unsqueeze(0) != torch.arange(groups, device=device).unsqueeze(1)  # (G, B)
    group_penalty = other_group.to(torch.float32) * (2 * _HALF_BIG)
    chain_base = torch.arange(chains, device=device) * width
    row_base = owner * width
    moves = max(1, width)
    total = sweeps * moves
    lo, hi = beta_range
    inv_scale = (1.0 / scale)[owner]  # (chains,)
    with intra_op_threads(1):
        for sweep in range(sweeps):
            anchors = torch.randint(0, width, (moves, chains), generator=generator, device=device)
            u = torch.rand(moves, chains, generator=generator, device=device)
            betas = lo * (hi / lo) ** (
                torch.arange(sweep * moves, (sweep + 1) * moves, device=device) / max(1, total - 1)
            )
            # Metropolis: accept iff dE < -log(u) / beta (in units of the problem's scale)
            threshold = -torch.log(u.clamp_min(1e-30)) / (betas.unsqueeze(1) * inv_scale.unsqueeze(0))
            threshold.clamp_(max=_HALF_BIG)  # a penalised non-swap is never accepted
            for step in range(moves):
                p = anchors[step]  # (chains,)
                fp = chain_base + p
                row_p = q_rows.index_select(0, row_base + p)  # (chains, B) = Q[p, :]
                sign_p = sign_flat.index_select(0, fp)  # (chains,)
                phi = torch.addcmul(diag_c, sign, s)  # (chains, B) flip costs
                phi_p = phi.view(-1).index_select(0, fp)  # (chains,)
                cost = phi.sub_(row_p, alpha=2.0).add_(phi_p.unsqueeze(1))
                # same value as p (not a swap) or another group: +BIG, by float arithmetic (bool ops are slow)
                cost.add_(torch.mul(sign, (sign_p * _HALF_BIG).unsqueeze(1)).add_(_HALF_BIG))
                if groups > 1:
                    cost.add_(group_penalty.index_select(0, p // size))
                best, partner = cost.min(-1)  # (chains,)
                accept = best < threshold[step]
                if not bool(accept.any()):
                    continue
                # x_p moves by sign_p (0 -> 1 when sign_p = +1), x_q by -sign_p: s += 2 sign_p (Q_p - Q_q).
                # Float arithmetic instead of torch.where: much faster on CPU for these small vectors.
                a = accept.to(torch.float32)
                row_q = q_rows.index_select(0, row_base + partner)
                s.addcmul_(row_p.sub_(row_q), (2.0 * a * sign_p).unsqueeze(1))
                new_sign_p = sign_p * (1.0 - 2.0 * a)
                sign_flat.index_copy_(0, fp, new_sign_p)
                sign_flat.index_copy_(0, chain_base + partner, new_sign_p.neg_())
                energy.addcmul_(a, best)
            better = energy < best_e
            best_e = torch.where(better, energy, best_e)
            best_sign = torch.where(better.unsqueeze(1), sign, best_sign)

    # exact energies of every restart's best state, then the best restart of each problem
    x_all = (best_sign < 0).view(batch, restarts, width).to(torch.float64)
    q64 = q.to(torch.float64)
    exact = ((x_all @ q64) * x_all).sum(-1) + (x_all * lin.to(torch.float64).unsqueeze(1)).sum(-1)
    pick = exact.argmin(-1)  # (batch,)
    x_out = x_all[torch.arange(batch, device=device), pick]
    return x_out > 0.5, exact.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


__all__ = ["anneal"]
