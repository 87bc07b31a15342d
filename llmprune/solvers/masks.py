"""Turning scores into keep-masks, shared by every solver. Higher score = more worth keeping.

Ties are broken by a stable sort (lower column index pruned first), so masks are deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmprune.spec import NMPattern, SparsitySpec


def keep_all_but_lowest(scores: Tensor, count: int) -> Tensor:
    """Keep-mask over the last dim of ``scores`` pruning the ``count`` lowest entries of each row.

    A k-th value selection (linear time) instead of a full sort: in SparseGPT the sort was half of
    the solve time.
    """
    if count <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # ties go to the lower index, exactly as a stable ascending sort would order them
    threshold = torch.kthvalue(scores, count, dim=-1, keepdim=True).values
    below, tied = scores < threshold, scores == threshold
    room = count - below.sum(-1, keepdim=True)
    return ~(below | (tied & (tied.cumsum(-1) <= room)))


def keep_nm(scores: Tensor, pattern: NMPattern) -> Tensor:
    """Keep the ``n`` best of every aligned group of ``m`` columns, row by row. scores: (out, in)."""
    out, width = scores.shape
    groups = scores.reshape(out, width // pattern.m, pattern.m)  # (out, in/m, m)
    return keep_all_but_lowest(groups, pattern.m - pattern.n).reshape(out, width)


def keep_per_row(scores: Tensor, spec: SparsitySpec) -> Tensor:
    """Every output row gets the same sparsity (Wanda's comparison group), or N:M groups."""
    if spec.pattern is not None:
        return keep_nm(scores, spec.pattern)
    return keep_all_but_lowest(scores, spec.num_pruned(scores.shape[1]))


def keep_per_matrix(scores: Tensor, spec: SparsitySpec) -> Tensor:
    """One threshold over the whole matrix (magnitude's comparison group), or N:M groups."""
    if spec.pattern is not None:
        return keep_nm(scores, spec.pattern)
    flat = keep_all_but_lowest(scores.reshape(1, -1), spec.num_pruned(scores.numel()))
    return flat.reshape(scores.shape)


def nm_violations(keep: Tensor, pattern: NMPattern) -> int:
    """Number of aligned groups holding more than ``n`` kept weights (0 = valid pattern)."""
    out, width = keep.shape
    if width % pattern.m:
        return -1
    per_group = keep.reshape(out, width // pattern.m, pattern.m).sum(-1)
    return int((per_group > pattern.n).sum())
