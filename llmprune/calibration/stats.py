"""fp32 running means of a Linear's input statistics, updated batch by batch."""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerStats


class StatsAccumulator:
    """Accumulates only what the solver declared: per-channel mean x_j^2 and/or mean x x^T."""

    def __init__(self, in_features: int, needs: frozenset[str], device: torch.device) -> None:
        self.num_tokens = 0
        self.sq_norms = torch.zeros(in_features, device=device) if SQ_NORMS in needs else None
        self.hessian = torch.zeros(in_features, in_features, device=device) if HESSIAN in needs else None

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
        total = self.num_tokens + x.shape[0]
        keep, scale = self.num_tokens / total, 1.0 / total
        if self.sq_norms is not None:
            self.sq_norms.mul_(keep).add_(x.pow(2).sum(0), alpha=scale)
        if self.hessian is not None:
            self.hessian.mul_(keep).addmm_(x.t(), x, alpha=scale)
        self.num_tokens = total

    def result(self) -> LayerStats:
        return LayerStats(num_tokens=self.num_tokens, sq_norms=self.sq_norms, hessian=self.hessian)
