"""Magnitude pruning: per matrix, or global with a per-layer floor.

Global mode follows "Is Complexity Required for Neural Network Pruning?" (Kuznedelev et al., 2023):
one threshold on |w| over every prunable weight, but each layer keeps at least ``min_density`` of its
weights, the other layers' ratios rising until the global target is met.
"""

from __future__ import annotations

from torch import Tensor

from llmprune.errors import ConfigError
from llmprune.registry import register_solver
from llmprune.solvers.masks import keep_per_matrix
from llmprune.solvers.types import LayerProblem, SolverResult
from llmprune.spec import SparsitySpec


def global_allocation(
    weights: dict[str, Tensor], spec: SparsitySpec, *, scope: str = "layer", min_density: float = 0.05
) -> dict[str, float]:
    """Per-layer sparsity for one global |w| threshold with each layer keeping >= ``min_density``.

    Bisects the threshold t: layer l prunes min(#{|w| <= t}, (1 - min_density)·n_l) weights, and at
    least one weight of every layer survives. Weights tied at the threshold are pruned only as far as
    the target needs (layers in name order), so the global count is exact.
    Only reads the weights, so streaming loaders can call it block by block.
    """
    _check_options(scope, min_density, spec)
    if scope == "layer":
        return {}
    total = sum(w.numel() for w in weights.values())
    target = spec.num_pruned(total)
    caps = {k: min(int((1.0 - min_density) * w.numel()), w.numel() - 1) for k, w in weights.items()}
    if target > sum(caps.values()):
        raise ConfigError(
            f"global sparsity {spec.sparsity} cannot be reached while every layer keeps "
            f"min_density={min_density}: lower min_density or the sparsity."
        )
    absw = {k: w.detach().abs().float().flatten() for k, w in weights.items()}

    def pruned_at(t: float) -> dict[str, int]:
        return {k: min(int((a <= t).sum()), caps[k]) for k, a in absw.items()}

    lo, hi = 0.0, max(float(a.max()) for a in absw.values())
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(pruned_at(mid).values()) < target:
            lo = mid
        else:
            hi = mid
    counts, below = pruned_at(hi), pruned_at(lo)
    excess = sum(counts.values()) - target  # weights tied at the threshold: prune only what is needed
    for k in sorted(counts, reverse=True):  # the last layers give theirs back first
        drop = min(excess, counts[k] - below[k])
        counts[k] -= drop
        excess -= drop
    return {k: counts[k] / absw[k].numel() for k in absw}


def _check_options(scope: str, min_density: float, spec: SparsitySpec | None = None) -> None:
    if scope not in ("layer", "global"):
        raise ConfigError(f"magnitude scope must be 'layer' or 'global', got {scope!r}.")
    number = isinstance(min_density, (int, float)) and not isinstance(min_density, bool)
    if not number or not 0 <= min_density <= 1:
        raise ConfigError(f"min_density must be a number in [0, 1], got {min_density!r}.")
    if scope == "global" and spec is not None and spec.pattern is not None:
        raise ConfigError(
            f"scope=global shares one sparsity across layers, which N:M ({spec.pattern}) fixes per group of "
            f"{spec.pattern.m}: drop scope=global, or give a fraction such as 0.5."
        )


@register_solver("magnitude", allocate=global_allocation)
def magnitude(problem: LayerProblem, *, scope: str = "layer", min_density: float = 0.05) -> SolverResult:
    """Prune the smallest |w| of each matrix (``scope='global'``: one threshold, per-layer floor)."""
    _check_options(scope, min_density)
    return SolverResult(keep=keep_per_matrix(problem.weight.abs(), problem.spec))
