"""SparseGPT (Frantar & Alistarh, ICML 2023): prune column by column, compensating with OBS updates.

Each pruned weight's error is pushed onto the input columns not yet visited, through the upper
Cholesky factor of the damped inverse Hessian (reference: github.com/IST-DASLab/sparsegpt, Apache-2.0).
Columns are swept in blocks: each column's error updates only the rest of its block at once, and
the block's accumulated errors reach the later columns in one matrix product ("lazy batch update").
Unlike the reference, the unstructured count is exact (per-block counts by cumulative rounding) and
dead input channels are not zeroed outside the keep-mask.

One sweep serves two callers: :func:`sparsegpt` chooses the mask as it goes (per column block for
unstructured targets, per aligned group for N:M), :func:`reconstruct_with_keep` is handed a mask by
another solver and only reconstructs the kept weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmprune.errors import ConfigError, DataError
from llmprune.registry import register_solver
from llmprune.solvers.hessian import check_dampening, damped_inverse_cholesky, dead_columns
from llmprune.solvers.masks import keep_all_but_lowest
from llmprune.solvers.threads import intra_op_threads
from llmprune.solvers.types import HESSIAN, LayerProblem, SolverResult
from llmprune.spec import SparsitySpec


def _sweep(
    weight: Tensor,
    hinv: Tensor,
    *,
    block_size: int,
    keep: Tensor | None = None,
    spec: SparsitySpec | None = None,
    dead: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The column sweep. Returns (new weight (out, in) with exact zeros, keep (out, in)).

    ``keep`` given: fixed mask. Otherwise the mask follows ``spec`` and is chosen from the already
    updated weights by the OBS saliency ``w^2 / U_jj^2`` (``U = hinv``); ``dead`` columns score 0,
    as pruning them costs nothing. Works on W^T so that each input column is one contiguous row:
    the per-column updates run about 3x faster than on column slices of W.
    """
    w_t = weight.detach().to(torch.float32).T.contiguous()  # (in, out)
    width, out = w_t.shape
    adaptive = keep is None
    pattern = spec.pattern if adaptive else None
    total = spec.num_pruned(out * width) if adaptive and pattern is None else 0
    if pattern is not None:  # an N:M group's scores need its columns up to date: never straddle blocks
        block_size = math.ceil(block_size / pattern.m) * pattern.m
    if adaptive:
        keep_t = torch.ones_like(w_t, dtype=torch.bool)  # (in, out)
    else:
        keep_t = keep.to(w_t.device, torch.bool).T.contiguous()
    saliency_scale = torch.diagonal(hinv).pow(-2).reshape(-1, 1)  # (in, 1)
    if dead is not None:
        saliency_scale = saliency_scale.masked_fill(dead.to(w_t.device).reshape(-1, 1), 0.0)
    err_t = w_t.new_empty(min(block_size, width), out)  # (B, out)

    def pruned_before(col: int) -> int:  # cumulative rounding: block counts sum exactly to `total`
        return (2 * total * col + width) // (2 * width)

    for i1 in range(0, width, block_size):
        i2 = min(i1 + block_size, width)
        block = w_t[i1:i2]  # (B, out) view, updated in place
        if adaptive and pattern is None:
            count = pruned_before(i2) - pruned_before(i1)
            scores = block.square() * saliency_scale[i1:i2]  # (B, out): one threshold per block
            keep_t[i1:i2] = keep_all_but_lowest(scores.reshape(1, -1), count).reshape(scores.shape)
        with intra_op_threads(1):  # many small ops: thread hand-offs cost more than they give
            for i in range(i1, i2):
                if pattern is not None and i % pattern.m == 0:  # block starts are multiples of m
                    g = slice(i, i + pattern.m)
                    scores = w_t[g].square() * saliency_scale[g]  # (m, out)
                    lowest = torch.topk(scores, pattern.m - pattern.n, dim=0, largest=False).indices
                    keep_t[g].scatter_(0, lowest, False)  # m - n pruned in every row of W
                err = w_t[i].masked_fill(keep_t[i], 0.0).div_(hinv[i, i])  # (out,)
                w_t[i + 1 : i2].addr_(hinv[i, i + 1 : i2], err, alpha=-1.0)
                err_t[i - i1] = err
        # assign zeros (never multiply: that leaves -0.0), so the keep-mask alone decides sparsity
        block.masked_fill_(~keep_t[i1:i2], 0.0)
        w_t[i2:].addmm_(hinv[i1:i2, i2:].T, err_t[: i2 - i1], alpha=-1.0)
    return w_t.T.contiguous(), keep_t.T.contiguous()


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size must be a positive integer (default 128), got {block_size!r}.")


def reconstruct_with_keep(
    weight: Tensor,
    hessian: Tensor,
    keep: Tensor,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    name: str = "layer",
) -> Tensor:
    """SparseGPT's weight reconstruction for a mask chosen elsewhere: zeros where ``~keep``, exactly.

    weight (out, in), hessian (in, in) = mean x x^T, keep (out, in) bool. Returns float32 (out, in).
    Kept weights in column j absorb the errors of pruned weights in columns < j (the sweep is
    left to right), which is SparseGPT's approximation of the per-row least-squares optimum.

    >>> w = torch.tensor([[1.0, 2.0]]); h = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    >>> reconstruct_with_keep(w, h, torch.tensor([[False, True]]), dampening_frac=0.0)
    tensor([[0.0000, 2.5000]])
    """
    _check_block_size(block_size)
    if weight.ndim != 2 or keep.shape != weight.shape or hessian.shape != (weight.shape[1],) * 2:
        raise DataError(
            f"{name}: expected weight (out, in), keep (out, in) and hessian (in, in); got "
            f"{tuple(weight.shape)}, {tuple(keep.shape)} and {tuple(hessian.shape)}."
        )
    hinv = damped_inverse_cholesky(hessian.to(weight.device), dampening_frac, name=name)
    return _sweep(weight, hinv, block_size=block_size, keep=keep)[0]


@register_solver("sparsegpt", needs={HESSIAN})
def sparsegpt(problem: LayerProblem, *, block_size: int = 128, dampening_frac: float = 0.01) -> SolverResult:
    """Second-order pruning with OBS weight updates (unstructured per column block, or N:M).

    ``block_size`` columns share one mask choice and one lazy update (rounded up to a multiple of M
    for N:M so groups never straddle blocks); ``dampening_frac`` of mean(diag H) is added to the
    Hessian's diagonal. Returns the keep-mask and the updated weights, pruned entries exactly 0.0.

    >>> from llmprune.solvers.types import LayerStats
    >>> x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))  # (tokens, in)
    >>> stats = LayerStats.from_inputs(x, {HESSIAN})
    >>> r = sparsegpt(LayerProblem("fc1", torch.randn(4, 8), stats, SparsitySpec.parse("2:4")))
    >>> int(r.keep.sum()), bool((r.weight[~r.keep] == 0).all())
    (16, True)
    """
    _check_block_size(block_size)
    check_dampening(dampening_frac)
    weight, spec = problem.weight, problem.spec
    out, width = weight.shape
    if spec.is_dense or (spec.pattern is None and spec.num_pruned(out * width) == 0):
        return SolverResult(keep=torch.ones_like(weight, dtype=torch.bool))
    spec.check_width(width, problem.name)
    hessian = problem.stats.hessian
    if hessian is None or hessian.shape != (width, width):
        raise DataError(
            f"sparsegpt needs the ({width}, {width}) input Hessian of {problem.name}, got "
            f"{None if hessian is None else tuple(hessian.shape)}: collect LayerStats with needs={{HESSIAN}}."
        )
    if not bool(torch.isfinite(weight).all()):
        raise DataError(f"{problem.name} has NaN/inf weights before pruning: check the loaded checkpoint.")
    hessian = hessian.to(weight.device)
    # Dead columns (never active in calibration) are NOT zeroed as the reference does: only the
    # keep-mask writes zeros, so achieved sparsity is exactly the target. They score 0 (pruned first,
    # as it costs nothing) and their weights, kept or not, do not change the layer-wise loss.
    # one thread: at SmolLM2-to-7B widths these ops are too small to amortise hand-offs between threads,
    # which made the solve 3-7x slower on a busy 2-core machine
    with intra_op_threads(1):
        hinv = damped_inverse_cholesky(hessian, dampening_frac, name=problem.name)
        new_weight, keep = _sweep(weight, hinv, block_size=block_size, spec=spec, dead=dead_columns(hessian))
    return SolverResult(keep=keep, weight=new_weight)
