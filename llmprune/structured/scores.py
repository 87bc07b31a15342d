"""Importance scores for whole structures: pure tensor math, no model.

* depth: ShortGPT's *block influence* ``1 - cos(h_in, h_out)`` averaged over tokens, and Gromov et al.'s
  *angular distance* ``arccos(cos(h_l, h_{l+n})) / π`` of a span of ``n`` consecutive blocks;
* width (MLP channels) and heads: Wanda-style ``‖X_j‖·‖W_:,j‖``, FLAP's fluctuation ``Var(X_j)·‖W_:,j‖²``,
  and the second-order (OBS / ZipLM) cost of removing a *group* of input columns of the output
  projection when the remaining columns are refitted: ``tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ)``.

Each score is "what removing it costs": lower is removed first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmprune.structured.refit import damped_inverse


def token_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Per-token cosine similarity of two hidden-state batches (..., d) -> (...,) in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def block_influence(cos_sum: float, num_tokens: int) -> float:
    """ShortGPT's BI = 1 - mean cosine(h_in, h_out), from a running sum of per-token cosines."""
    return 1.0 - cos_sum / max(num_tokens, 1)


def angular_distance(cos_sum: float, num_tokens: int) -> float:
    """Gromov et al.'s distance (1/π)·arccos(mean cosine) between the ends of a span, in [0, 1]."""
    mean = max(-1.0, min(1.0, cos_sum / max(num_tokens, 1)))
    return math.acos(mean) / math.pi


def wanda_channel_scores(weight: Tensor, sq_norms: Tensor) -> Tensor:
    """Wanda-SP score of input column j: ``‖X_j‖₂ · ‖W_:,j‖₂`` (weight (out, in), sq_norms = mean x_j²)."""
    return sq_norms.clamp_min(0).sqrt() * weight.to(torch.float32).norm(dim=0)  # (in,)


def fluctuation_scores(weight: Tensor, sq_norms: Tensor, mean: Tensor) -> Tensor:
    """FLAP's fluctuation of input column j: ``Var(X_j) · ‖W_:,j‖₂²`` (variance over tokens)."""
    var = (sq_norms - mean * mean).clamp_min(0)  # (in,)
    return var * weight.to(torch.float32).pow(2).sum(0)


def group_scores(column_scores: Tensor, groups: Tensor) -> Tensor:
    """Sum per-column scores over groups: (in,) scores, (G, g) column indices -> (G,)."""
    return column_scores[groups].sum(-1)


def spd_inverse(a: Tensor) -> Tensor:
    """Inverses of symmetric positive definite matrices (any leading batch shape), by Cholesky.

    Why not ``torch.linalg.inv``: with 2 threads, torch 2.13's batched LU on this CPU rejected a
    well-conditioned batch of three 192 × 192 float64 blocks of SmolLM2's o_proj (MKL "Parameter 6 was
    incorrect on entry to DLASWP", then "Pivots given to lu_solve must all be greater or equal to 1"),
    which crashed ``--structure auto`` at the default thread count. The blocks here are principal
    submatrices of a damped inverse Hessian, so Cholesky applies; any matrix it rejects is inverted
    alone by LU."""
    chol, info = torch.linalg.cholesky_ex(a)
    out = torch.cholesky_inverse(chol)
    bad = info.reshape(-1).nonzero().flatten().tolist()
    if bad:
        flat_in, flat_out = a.reshape(-1, *a.shape[-2:]), out.reshape(-1, *a.shape[-2:])
        for i in bad:
            flat_out[i] = torch.linalg.inv(flat_in[i])
    return out


def obs_group_removal(
    weight: Tensor, hessian: Tensor, groups: Tensor, count: int, *, damp: float = 0.01, step: int = 1
) -> tuple[list[int], list[float]]:
    """Greedy OBS/ZipLM choice of ``count`` groups of input columns to remove, with refit after each.

    ``weight`` (out, in), ``hessian`` (in, in) = mean x xᵀ, ``groups`` (G, g) column indices. At each
    round the ``step`` cheapest groups (each scored alone: ``tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ)`` under the current
    refitted weights) go together, then W and H⁻¹ are updated by the block Schur complement. Returns
    the removed group ids in order and the cumulative layer error ``mean‖ΔW x‖²`` after each removal:
    exact at the end of every round (OBS errors add up for this quadratic objective), interpolated
    inside a round. ``step=1`` is the exact greedy; larger steps trade a little choice for speed.

    >>> w, h = torch.tensor([[1.0, 0.1]]), torch.eye(2)
    >>> obs_group_removal(w, h, torch.tensor([[0], [1]]), 1, damp=0.0)[0]
    [1]
    """
    W = weight.to(torch.float64).clone()  # (out, in)
    Hinv = damped_inverse(hessian, damp)  # (in, in)
    alive = torch.ones(groups.shape[0], dtype=torch.bool)
    removed: list[int] = []
    curve: list[float] = []
    total = 0.0
    while len(removed) < count:
        ids = alive.nonzero().flatten()
        cols = groups[ids]  # (A, g)
        Hs = Hinv[cols[:, :, None], cols[:, None, :]]  # (A, g, g)
        Ws = W[:, cols].permute(1, 0, 2)  # (A, out, g)
        errs = torch.einsum("aog,agh,aoh->a", Ws, spd_inverse(Hs), Ws)  # (A,)
        take = ids[torch.argsort(errs, stable=True)[: min(step, count - len(removed))]].tolist()
        S = groups[take].flatten()  # the round's columns, removed jointly (exact for the set)
        Hss_inv = spd_inverse(Hinv[S][:, S])  # (s, s)
        WS = W[:, S]  # (out, s)
        err = max(float(torch.einsum("os,st,ot->", WS, Hss_inv, WS)), 0.0)
        W -= WS @ Hss_inv @ Hinv[S, :]
        Hinv -= Hinv[:, S] @ Hss_inv @ Hinv[S, :]
        W[:, S] = 0.0
        for k, gid in enumerate(take, 1):  # within a round the curve is interpolated linearly
            removed.append(gid)
            curve.append(total + err * k / len(take))
            alive[gid] = False
        total += err
    return removed, curve
