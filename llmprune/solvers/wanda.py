"""Wanda (Sun et al., ICLR 2024): score |W_ij| * ||X_j||, compared within each output row."""

from __future__ import annotations

from llmprune.registry import register_solver
from llmprune.solvers.masks import keep_per_row
from llmprune.solvers.types import SQ_NORMS, LayerProblem, SolverResult


def wanda_scores(problem: LayerProblem):
    """(out, in) scores; ``sq_norms`` is a mean over tokens, a constant factor away from the paper's."""
    return problem.weight.abs() * problem.stats.sq_norms.sqrt().unsqueeze(0)


@register_solver("wanda", needs={SQ_NORMS})
def wanda(problem: LayerProblem) -> SolverResult:
    """Prune by |w|·‖x‖ per output row (unstructured or N:M); no weight update."""
    return SolverResult(keep=keep_per_row(wanda_scores(problem), problem.spec))
