"""The solver contract: a layer problem in, a keep-mask (and maybe new weights) out.

Solvers see tensors only (no model, no hooks), so each one is testable on a 4x8 matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.spec import SparsitySpec

#: statistics a solver may declare it needs (the engine collects only those)
SQ_NORMS = "sq_norms"  # (in,)  mean over tokens of x_j^2, fp32
HESSIAN = "hessian"  # (in, in)  mean over tokens of x x^T, fp32


@dataclass
class LayerStats:
    """Running fp32 statistics of one Linear's *input*, as means over calibration tokens."""

    num_tokens: int = 0
    sq_norms: Tensor | None = None  # (in,)
    hessian: Tensor | None = None  # (in, in)

    @classmethod
    def from_inputs(cls, x: Tensor, needs: frozenset[str] | set[str]) -> LayerStats:
        """Statistics of a whole input matrix at once (tests and small cases). x: (tokens, in)."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        stats = cls(num_tokens=x.shape[0])
        if SQ_NORMS in needs:
            stats.sq_norms = (x * x).mean(0)
        if HESSIAN in needs:
            stats.hessian = x.T @ x / x.shape[0]
        return stats


@dataclass(frozen=True)
class LayerProblem:
    """All a solver may look at."""

    name: str
    weight: Tensor  # (out, in) fp32; GPT-2 Conv1D already transposed
    stats: LayerStats
    spec: SparsitySpec


@dataclass
class SolverResult:
    """``keep`` is True where a weight survives: one convention, one name, everywhere."""

    keep: Tensor  # (out, in) bool
    weight: Tensor | None = None  # updated (out, in) weights, or None: keep the originals


def reconstruction_error(weight: Tensor, new_weight: Tensor, hessian: Tensor) -> float:
    """Layer-wise loss ``mean_tokens ||(W - W') x||^2 = tr(dW H dW^T)`` with H = mean x x^T."""
    delta = (weight - new_weight).to(torch.float64)
    return float(((delta @ hessian.to(torch.float64)) * delta).sum())
