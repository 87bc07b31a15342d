"""Sums of a Linear's input statistics (mean x_j^2, mean x x^T) that do not depend on who adds them.

Floating-point addition is not associative: a running sum over the calibration data gives different
bits when the samples are split across processes, batched differently, or when a run is resumed
half-way. So the order of every addition is fixed by the data alone, per calibration *sample* (the
*unit*; its global index ``0 <= u < N``), never per batch:

* a unit's term is the sum of its rows, ``x^T x`` over its tokens (one matmul per sample, the same
  shape whatever batch the sample came in; a Linear run twice in one forward adds both calls);
* units are folded left to right within fixed *chunks* of ``CHUNK`` consecutive units
  (``[kC, (k+1)C)``): ``((t_kC + t_kC+1) + t_kC+2) + …``. One open fold per accumulator, so the extra
  memory of summing per sample instead of per batch is one buffer;
* chunks are added along one fixed binary tree over ``[0, K)``: node ``[lo, hi) = [lo, mid) + [mid, hi)``
  with ``mid = lo +`` the largest power of two below ``hi - lo``. Every complete node is a *dyadic*
  interval, so a process holding a contiguous run of whole chunks sums the nodes inside it on its own
  (a binary counter) and :func:`combine` finishes the same tree everywhere.

``CHUNK`` is a constant, not the batch size or anything derived from the number of processes: that is
what makes 1, 2 or 3 processes, any batch size, and a resumed run give bit-identical statistics, in
fp32, with no assumption about rounding. Processes are given whole chunks when there are at least as
many chunks as processes; with fewer, a process's share may start inside a chunk, and it keeps those
units' terms apart (``loose``, at most ``CHUNK - 1``) for the owner of the chunk's start to fold in.

Memory: per statistic, the open fold, the unit being added, and at most ``floor(log2 K) + 1`` finished
nodes (3 for the CPU default of 32 samples, 5 for 128 on a GPU): one buffer more than summing per
batch of 8 did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerStats

#: units (calibration samples) per chunk, the leaves of the fixed tree. A constant on purpose: the bits
#: of the statistics depend on it, so it must not follow the batch size or the number of processes.
CHUNK = 8


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


def part_spans(lo: int, hi: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """The unit spans of the partial sums an accumulator fed units ``[lo, hi)`` hands on, in its order:
    loose units before the first chunk start, whole-chunk tree nodes, then the open fold of the last
    chunk if the range ends inside it. Every process can so tell the shapes of every other's share."""
    first = -(-lo // chunk) * chunk  # first chunk start at or after lo
    spans = [(u, u + 1) for u in range(lo, min(hi, first))]
    if first >= hi:
        return spans
    last = hi // chunk * chunk  # last chunk start at or before hi
    spans += [(a * chunk, b * chunk) for a, b in dyadic_nodes(first // chunk, last // chunk)]
    if last < hi:
        spans.append((last, hi))
    return spans


@dataclass
class Node:
    """Sums (not means) over units ``[lo, hi)``."""

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

    ``add(x, unit)`` takes one unit's inputs (any leading shape, last dim = in_features): the engine
    gives one calibration sample per call, so the sums do not depend on how samples were batched.
    Calls for the same ``unit`` (a Linear run twice in one forward) add to the same term. Units must
    come in increasing, contiguous order. ``unit=None`` means "the next one", which keeps simple
    single-process uses (one unit per batch) simple.
    """

    def __init__(
        self, in_features: int, needs: frozenset[str], device: torch.device, chunk: int = CHUNK
    ) -> None:
        self.in_features = in_features
        self.needs = frozenset(needs)
        self.device = device
        self.chunk = chunk
        self.num_tokens = 0
        self.per_batch = False  # set by the engine when inputs could not be split per sample
        self._done: list[Node] = []  # loose units, then whole-chunk tree nodes, left to right
        self._fold: Node | None = None  # the chunk being folded, units [chunk start, hi)
        self._term: Node | None = None  # the unit still receiving inputs

    def _product(self, x: Tensor, unit: int) -> Node:
        sq = x.pow(2).sum(0) if SQ_NORMS in self.needs else None  # (in,)
        hess = x.t() @ x if HESSIAN in self.needs else None  # (in, in)
        return Node(unit, unit + 1, sq, hess)

    @torch.no_grad()
    def add(self, x: Tensor, unit: int | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
        open_unit = self._term.lo if self._term is not None else None
        if unit is None:
            unit = self._next_unit() or 0
        if unit == open_unit:  # the same unit again: extend its term
            term = self._term
            if term.sq_norms is not None:
                term.sq_norms.add_(x.pow(2).sum(0))
            if term.hessian is not None:
                term.hessian.addmm_(x.t(), x)
        else:
            expected = self._next_unit()
            if expected is not None and unit != expected:
                raise ValueError(
                    f"units must arrive in order, one after another: got {unit}, expected {expected}"
                )
            self._flush()  # fold the finished unit before making the next one's product: one buffer less
            self._term = self._product(x, unit)
        self.num_tokens += x.shape[0]

    def skip(self, unit: int) -> None:
        """Mark ``unit`` as having no inputs of its own (its rows went to another sample's term), so the
        units still arrive one after another and every process adds the same terms in the same order."""
        self.add(torch.zeros(0, self.in_features, device=self.device), unit)

    def _next_unit(self) -> int | None:
        if self._term is not None:
            return self._term.hi
        if self._fold is not None:
            return self._fold.hi
        return self._done[-1].hi if self._done else None

    def _flush(self) -> None:
        """Fold the finished unit into its chunk; a finished chunk joins the tree (binary counter)."""
        term, self._term = self._term, None
        if term is None:
            return
        if self._fold is not None:
            self._fold = self._fold.add_(term)
        elif term.lo % self.chunk == 0:
            self._fold = term
        else:  # the share began inside this chunk: its start is folded by another process
            self._done.append(term)
            return
        if self._fold.hi - self._fold.lo == self.chunk:
            self._done.append(self._fold)
            self._fold = None
            self._merge()

    def _merge(self) -> None:
        stack = self._done
        while len(stack) >= 2:
            left, right = stack[-2], stack[-1]
            size = right.hi - right.lo
            if left.hi != right.lo or left.hi - left.lo != size or left.lo % (2 * size):
                break
            stack[-2:] = [left.add_(right)]

    def nodes(self) -> list[Node]:
        """This process's partial sums (spans as :func:`part_spans` says): ends the accumulation."""
        self._flush()
        nodes = self._done + ([self._fold] if self._fold is not None else [])
        self._done, self._fold = [], None
        return nodes

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
        return combine(nodes, self.num_tokens, self.chunk)


def combine(nodes: list[Node], num_tokens: int, chunk: int = CHUNK) -> LayerStats:
    """Finish the fixed tree over all units from partial sums covering them, and divide by the token count.

    ``nodes`` are every process's partial sums in process order. Their buffers are reused (summed
    into in place): do not use them afterwards.
    """
    num_units = max(n.hi for n in nodes)
    by_chunk: dict[tuple[int, int], Node] = {}  # tree nodes over chunk indices
    folds: dict[int, Node] = {}  # chunk -> its fold from the chunk start (the whole chunk or a prefix)
    loose: dict[int, Node] = {}
    for n in nodes:
        if n.lo % chunk:
            loose[n.lo] = n
        elif (n.hi - n.lo) % chunk == 0:
            by_chunk[(n.lo // chunk, n.hi // chunk)] = n
        else:
            folds[n.lo // chunk] = n

    def missing(unit: int) -> ValueError:
        return ValueError(
            f"no statistics for calibration unit {unit}: partial sums do not cover [0, {num_units})"
        )

    for k, fold in folds.items():  # complete the chunks a process boundary cut: loose units, in order
        for u in range(fold.hi, min((k + 1) * chunk, num_units)):
            if u not in loose:
                raise missing(u)
            fold = fold.add_(loose[u])
        by_chunk[(k, k + 1)] = fold

    def total(lo: int, hi: int) -> Node:
        node = by_chunk.get((lo, hi))
        if node is not None:
            return node
        if hi - lo < 2:
            raise missing(lo * chunk)
        mid = tree_split(lo, hi)
        return total(lo, mid).add_(total(mid, hi))

    root = total(0, -(-num_units // chunk))
    count = max(num_tokens, 1)
    return LayerStats(
        num_tokens=num_tokens,
        sq_norms=None if root.sq_norms is None else root.sq_norms.div_(count),
        hessian=None if root.hessian is None else root.hessian.div_(count),
    )
