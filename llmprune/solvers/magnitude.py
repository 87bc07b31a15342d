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

    Bisects the threshold t: layer l prunes min(#{|w| <= t}, (1 - min_density)·n_l) weights.
    Only reads the weights, so streaming loaders can call it block by block.
    """
    if scope == "layer" or spec.pattern is not None:
        return {}
    total = sum(w.numel() for w in weights.values())
    target = spec.num_pruned(total)
    caps = {k: int((1.0 - min_density) * w.numel()) for k, w in weights.items()}
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
    counts = pruned_at(hi)
    return {k: counts[k] / absw[k].numel() for k in absw}


@register_solver("magnitude", allocate=global_allocation)
def magnitude(problem: LayerProblem, *, scope: str = "layer", min_density: float = 0.05) -> SolverResult:
    """Prune the smallest |w| of each matrix (``scope='global'``: one threshold, per-layer floor)."""
    if scope not in ("layer", "global"):
        raise ConfigError(f"magnitude scope must be 'layer' or 'global', got {scope!r}.")
    if not 0.0 <= min_density <= 1.0:
        raise ConfigError(f"min_density must be in [0, 1], got {min_density}.")
    return SolverResult(keep=keep_per_matrix(problem.weight.abs(), problem.spec))
