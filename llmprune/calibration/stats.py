"""Sums of a Linear's input statistics (mean x_j^2, mean x x^T) that do not depend on who adds them.

Floating-point addition is not associative: a running sum over the calibration batches gives
different bits when the batches are split across processes, or when a run is resumed half-way. So
the order of every addition is fixed by the data alone. Calibration batch ``b`` (its global index,
``0 <= b < B``) is a leaf; leaves are added along one fixed binary tree over ``[0, B)``: node
``[lo, hi) = [lo, mid) + [mid, hi)`` with ``mid = lo +`` the largest power of two below ``hi - lo``.
Every complete node is a *dyadic* interval ``[k 2^j, (k+1) 2^j)``, so a process holding any contiguous
share of the batches sums the nodes inside its share on its own (a binary counter), hands those partial
sums on, and :func:`combine` finishes the same tree everywhere. One process, two processes or a resumed
run therefore produce bit-identical statistics, with no float64 and no assumption about rounding.

The sums stay fp32 (as the statistics always were): pairwise summation keeps the rounding error at
O(log B) additions instead of O(B) for a running mean. The price is memory: a process holds at most
``floor(log2 B) + 1`` partial sums per statistic (5 for the default 16 batches), which for Hessians of
very wide Linears is worth knowing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerStats


def tree_split(lo: int, hi: int) -> int:
    """Where the fixed tree splits node ``[lo, hi)`` (``hi - lo >= 2``): lo + largest power of two < size."""
    return lo + (1 << ((hi - lo - 1).bit_length() - 1))


def dyadic_nodes(lo: int, hi: int) -> list[tuple[int, int]]:
    """The maximal tree nodes inside ``[lo, hi)``, left to right: what a process owning those leaves sums."""
    nodes = []
    while lo < hi:
        size = lo & -lo if lo else 1 << (hi.bit_length())  # largest power of two that ``lo`` is aligned to
        while lo + size > hi:
            size >>= 1
        nodes.append((lo, lo + size))
        lo += size
    return nodes


@dataclass
class Node:
    """Sums (not means) of one tree node's leaves."""

    lo: int
    hi: int
    sq_norms: Tensor | None  # (in,)
    hessian: Tensor | None  # (in, in)

    def add_(self, other: Node) -> Node:
        """``self + other`` into self's buffers (bitwise the same as the out-of-place sum)."""
        if self.sq_norms is not None:
            self.sq_norms.add_(other.sq_norms)
        if self.hessian is not None:
            self.hessian.add_(other.hessian)
        return Node(min(self.lo, other.lo), max(self.hi, other.hi), self.sq_norms, self.hessian)


class StatsAccumulator:
    """Accumulates only what the solver declared: per-channel sums of x_j^2 and/or of x x^T.

    ``add(x, batch)`` takes one batch's inputs (any leading shape, last dim = in_features); calls for
    the same ``batch`` (a Linear run twice in one forward) go into the same leaf. Batches must come in
    increasing order. ``batch=None`` means "the next one", which keeps the single-process use simple.
    """

    def __init__(self, in_features: int, needs: frozenset[str], device: torch.device) -> None:
        self.in_features = in_features
        self.needs = frozenset(needs)
        self.device = device
        self.num_tokens = 0
        self._stack: list[Node] = []  # complete dyadic nodes, left to right, then the open leaf
        self._open: int | None = None  # batch index of the leaf still receiving inputs

    @torch.no_grad()
    def add(self, x: Tensor, batch: int | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
        if batch is None:
            batch = 0 if self._open is None else self._open + 1
        if batch == self._open:  # the same batch again: extend its leaf
            leaf = self._stack[-1]
            if leaf.sq_norms is not None:
                leaf.sq_norms.add_(x.pow(2).sum(0))
            if leaf.hessian is not None:
                leaf.hessian.addmm_(x.t(), x)
        else:
            if self._open is not None and batch < self._open:
                raise ValueError(f"batches must arrive in increasing order: got {batch} after {self._open}")
            self._close()
            sq = x.pow(2).sum(0) if SQ_NORMS in self.needs else None  # (in,)
            hess = x.t() @ x if HESSIAN in self.needs else None  # (in, in)
            self._stack.append(Node(batch, batch + 1, sq, hess))
            self._open = batch
        self.num_tokens += x.shape[0]

    def _close(self) -> None:
        """Merge the finished leaf into its complete ancestors (binary counter over dyadic nodes)."""
        stack = self._stack
        while len(stack) >= 2:
            left, right = stack[-2], stack[-1]
            size = right.hi - right.lo
            if left.hi != right.lo or left.hi - left.lo != size or left.lo % (2 * size):
                break
            stack[-2:] = [left.add_(right)]

    def nodes(self) -> list[Node]:
        """This process's partial sums: the maximal tree nodes inside the batches it saw."""
        self._close()
        self._open = None
        return list(self._stack)

    def empty_stats(self) -> LayerStats:
        """Zero statistics, for a Linear that no calibration token reached."""
        sq = torch.zeros(self.in_features, device=self.device) if SQ_NORMS in self.needs else None
        hess = (
            torch.zeros(self.in_features, self.in_features, device=self.device)
            if HESSIAN in self.needs
            else None
        )
        return LayerStats(num_tokens=0, sq_norms=sq, hessian=hess)

    def result(self) -> LayerStats:
        """Means over all tokens this process saw (the whole calibration set when run alone). Call once."""
        nodes = self.nodes()
        if not nodes:
            return self.empty_stats()
        return combine(nodes, self.num_tokens)


def combine(nodes: list[Node], num_tokens: int) -> LayerStats:
    """Finish the fixed tree over ``[0, B)`` from partial sums covering it, and divide by the token count.

    The buffers of ``nodes`` are reused (summed into in place): do not use them afterwards.
    """
    by_span = {(n.lo, n.hi): n for n in nodes}
    num_batches = max(n.hi for n in nodes)

    def total(lo: int, hi: int) -> Node:
        node = by_span.get((lo, hi))
        if node is not None:
            return node
        if hi - lo < 2:
            raise ValueError(
                f"no statistics for calibration batch {lo}: partial sums do not cover [0, {num_batches})"
            )
        mid = tree_split(lo, hi)
        return total(lo, mid).add_(total(mid, hi))

    root = total(0, num_batches)
    count = max(num_tokens, 1)
    return LayerStats(
        num_tokens=num_tokens,
        sq_norms=None if root.sq_norms is None else root.sq_norms.div_(count),
        hessian=None if root.hessian is None else root.hessian.div_(count),
    )
