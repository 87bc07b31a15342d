"""ALPS (Meng et al., NeurIPS 2024, arXiv 2406.07831): ADMM on the ℓ0-constrained layer problem, then a
CG refit of the kept weights.

The layer problem is ``min_Ŵ ½ tr((W - Ŵ) H (W - Ŵ)^T)`` subject to Ŵ's sparsity pattern (so many
zeros per matrix or per row, or N:M). ADMM splits it into a smooth copy B and a feasible copy D:

    B ← (W H − V + ρ D) (H + ρ I)^-1         (a ridge-regularised least-squares step)
    D ← P(B + V / ρ)                         (Euclidean projection: keep the largest |entries|)
    V ← V + ρ (B − D)

and ρ grows as the support settles (every ``update_every`` iterations: by 1.3 when more than 10 % of
the kept entries moved, 1.2 above 0.5 %, 1.1 while anything still moves; ρ shrinks by 5 and the
iterates restart when the support is stuck before ρ ever grew). Large ρ forces B = D, so the
iterates end on a feasible point whose support was chosen with the weights moving, which one-shot
scores such as SparseGPT's cannot do. The final support is the projection of B, and the kept weights
are re-fitted to the exact least-squares optimum on it by preconditioned CG (``solvers/pcg.py``).

As in the reference (github.com/mazumder-lab/ALPS), the Hessian is damped (``dampening_frac`` of its
mean diagonal) and scaled to a unit diagonal, so ρ is in the same units on every layer, and the ℓ0
projection of unstructured targets is over the whole matrix of scaled weights ``|w_ij| sqrt(H_jj)``.
One eigendecomposition of H per layer makes every ``(H + ρ I)^-1`` a matrix product. Independently
written; differences from the reference: exact per-matrix counts (ties to the lower index, as
everywhere in llmprune), dead input channels (``H_jj = 0``) get a unit diagonal before damping
instead of dividing by ``1e-8``, ``scope='row'`` offers Wanda's per-row comparison group, and the CG
refit starts from B's projection with a per-row tolerance.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from llmprune.errors import ConfigError, did_you_mean
from llmprune.registry import register_solver
from llmprune.solvers.hessian import check_dampening, checked_hessian, dead_columns
from llmprune.solvers.masks import keep_per_matrix, keep_per_row
from llmprune.solvers.pcg import masked_least_squares
from llmprune.solvers.sparsegpt import sparsegpt
from llmprune.solvers.types import HESSIAN, LayerProblem, SolverResult
from llmprune.spec import SparsitySpec

log = logging.getLogger(__name__)

SCOPES = ("matrix", "row")
WARM_STARTS = ("projection", "sparsegpt")
#: ρ never exceeds this (the reference's cap): beyond it B = D to float32 precision anyway
_MAX_RHO = 1e6


@dataclass(frozen=True)
class AlpsOptions:
    """ALPS's knobs (``--option rho=0.3``, recipe ``options: {rho: 0.3}``, ``prune(..., rho=0.3)``)."""

    # ρ and the iteration budget were chosen on validation Hessians (scripts/choose_defaults.py admm): the
    # reference's 0.1 and 300 (about 30 used) reach the same validation loss within 0.5 % at 2-3x the time
    rho: float = 0.3  # initial ADMM penalty, in units of the unit-diagonal Hessian (reference: 0.1)
    max_iterations: int = 12  # ADMM iterations at most (reference: 300)
    min_iterations: int = 6  # before this, a nearly settled support does not stop the iterations
    update_every: int = 3  # iterations between penalty updates (and support-change checks)
    settled: float = 3e-4  # stop once fewer than this fraction of the kept entries moved in a check
    # 40 refit iterations, not the reference's 10, chosen on the validation text: whole-model perplexity at
    # 2:4 138.5 vs 140.7 and at 70 % 246.4 vs 253.2 (scripts/choose_defaults.py pipeline), for about a third
    # more CPU time; 10 stops the CG refit short of the least-squares optimum on the chosen support
    refit_iterations: int = 40  # CG iterations of the final least-squares refit (0 = none)
    dampening_frac: float = 0.01  # added to diag(H), as a fraction of its mean
    scope: str = "matrix"  # unstructured comparison group: the whole matrix (reference) or each row
    warm_start: str = "projection"  # ADMM's first feasible point: W's projection (reference) or SparseGPT's

    def __post_init__(self) -> None:
        for name in ("max_iterations", "min_iterations", "update_every", "refit_iterations"):
            value = getattr(self, name)
            low = 1 if name == "update_every" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"alps option {name} must be an integer >= {low}, got {value!r}.")
        for name in ("rho", "settled"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"alps option {name} must be a number > 0, got {value!r}.")
        check_dampening(self.dampening_frac)
        if self.warm_start not in WARM_STARTS:
            raise ConfigError(
                f"alps warm_start must be one of {', '.join(WARM_STARTS)}"
                f"{did_you_mean(str(self.warm_start), WARM_STARTS)}, got {self.warm_start!r}."
            )
        if self.scope not in SCOPES:
            raise ConfigError(
                f"alps scope must be one of {', '.join(SCOPES)}{did_you_mean(str(self.scope), SCOPES)}, "
                f"got {self.scope!r}."
            )


def project_keep(values: Tensor, spec: SparsitySpec, scope: str = "matrix") -> Tensor:
    """Support of the Euclidean projection of ``values`` (out, in) onto ``spec``'s sparsity set.

    The nearest point with at most k nonzeros keeps the k largest |values| (per matrix or per row);
    for N:M, the n largest of every aligned group of m. -> bool (out, in).
    """
    scores = values.square()
    return keep_per_row(scores, spec) if scope == "row" else keep_per_matrix(scores, spec)


def damped_unit_hessian(hessian: Tensor, dampening_frac: float) -> tuple[Tensor, Tensor]:
    """``(H_d, scale)``: H with dead diagonals set to 1 and ``dampening_frac·mean(diag)`` added, in float64,
    and ``scale = sqrt(diag H_d)`` (in,), so that ``H_d / (scale scale^T)`` has a unit diagonal."""
    h = hessian.to(torch.float64).clone()
    h.diagonal()[dead_columns(h)] = 1.0
    h.diagonal().add_(dampening_frac * float(h.diagonal().mean()))
    return h, h.diagonal().sqrt()


def eigen(hessian: Tensor) -> tuple[Tensor, Tensor]:
    """(eigenvalues clamped at 0 (in,), eigenvectors (in, in) float32) of a symmetric ``hessian``, in fp64."""
    eigvals, eigvecs = torch.linalg.eigh(hessian.to(torch.float64))
    return eigvals.clamp_min(0.0), eigvecs.to(torch.float32)  # fp64 only where it pays


def admm(
    weight: Tensor,
    hessian: Tensor,
    spec: SparsitySpec,
    options: AlpsOptions,
    *,
    start: Tensor | None = None,
    eig: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, int]:
    """ALPS's ADMM with its penalty schedule on a unit-diagonal ``hessian`` (in, in) and ``weight``
    (out, in) in the same scaling. ``start`` (out, in): a feasible first point (default: W's
    projection); ``eig``: ``eigen(hessian)`` if already known. Returns (B (out, in) float32, iterations)."""
    eigvals, eigvecs = eig if eig is not None else eigen(hessian)

    def ridge_inverse(rho: float) -> Tensor:  # (H + ρ I)^-1, symmetric, one (in, in) product
        return (eigvecs * (1.0 / (eigvals + rho)).to(torch.float32)) @ eigvecs.T

    h = hessian.to(torch.float32)
    w = weight.to(torch.float32)
    target = w @ h  # (out, in) = W H, the least-squares right-hand side
    if start is None:
        first_keep = project_keep(w, spec, options.scope)
        first_d = w.masked_fill(~first_keep, 0.0)
    else:
        first_d = start.to(torch.float32)
        first_keep = first_d != 0
    d, v = first_d.clone(), torch.zeros_like(w)
    kept = max(1, int(first_keep.sum()))
    last_keep, rho, raised = first_keep, float(options.rho), False
    inverse = ridge_inverse(rho)
    b = w if start is None else first_d  # what zero iterations return
    iteration = 0
    for iteration in range(1, options.max_iterations + 1):
        b = (target - v + rho * d) @ inverse  # (out, in)
        z = b + v / rho
        keep = project_keep(z, spec, options.scope)
        d = z.masked_fill(~keep, 0.0)
        v.add_(b - d, alpha=rho)
        if iteration % options.update_every:
            continue
        moved = int((keep != last_keep).sum())
        last_keep = keep
        if moved > 0.1 * kept:
            rho, raised = rho * 1.3, True
        elif moved > 0.005 * kept:
            rho, raised = rho * 1.2, True
        elif moved:
            if raised:
                rho *= 1.1
            else:  # the support barely moves at a small ρ: start over with a smaller one
                rho /= 5.0
                d, v = first_d.clone(), torch.zeros_like(w)
        elif raised:
            break  # ρ has grown and nothing moves any more: converged
        else:
            rho /= 5.0
        rho = min(rho, _MAX_RHO)
        inverse = ridge_inverse(rho)
        if iteration >= options.min_iterations and moved < options.settled * kept:
            break
    return b, iteration


_cache_lock = threading.Lock()
_cache: dict[str, object] = {}


def _shared_eigen(
    hessian: Tensor, dampening_frac: float
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """(damped H, scale, unit-diagonal H, its eigendecomposition), computed once per Hessian tensor.

    Linears that read the same input (q/k/v, gate/up) are handed the same Hessian tensor by the
    engine, so the last result is kept while that tensor is alive and unchanged (same object, same
    in-place version, same damping): three eigendecompositions per Llama block instead of seven.
    """
    key = (hessian._version, float(dampening_frac))
    with _cache_lock:
        ref = _cache.get("ref")
        if ref is not None and ref() is hessian and _cache.get("key") == key:
            return _cache["value"]  # type: ignore[return-value]
    damped, scale = damped_unit_hessian(hessian, dampening_frac)
    unit = damped / torch.outer(scale, scale)  # (in, in), unit diagonal
    value = (damped, scale, unit, eigen(unit))
    with _cache_lock:
        _cache.update(ref=weakref.ref(hessian), key=key, value=value)
    return value


def solve(problem: LayerProblem, options: AlpsOptions) -> SolverResult:
    """ALPS on one layer problem (see the module docstring); ``alps`` is its registered face."""
    weight, spec = problem.weight, problem.spec
    out, width = weight.shape
    if spec.is_dense or (spec.pattern is None and spec.num_pruned(out * width) == 0):
        return SolverResult(keep=torch.ones_like(weight, dtype=torch.bool))
    spec.check_width(width, problem.name)
    hessian = checked_hessian("alps", problem.name, weight, problem.stats.hessian)
    damped, scale, unit, eig = _shared_eigen(hessian, options.dampening_frac)
    start = None
    if options.warm_start == "sparsegpt":
        warm = sparsegpt(problem, dampening_frac=options.dampening_frac)
        start = warm.weight.to(torch.float64) * scale
    scaled, iterations = admm(weight.to(torch.float64) * scale, unit, spec, options, start=start, eig=eig)
    keep = project_keep(scaled, spec, options.scope)
    start = (scaled.to(torch.float64) / scale).to(torch.float32).masked_fill(~keep, 0.0)
    new_weight = masked_least_squares(
        weight, damped.to(torch.float32), keep, start, iterations=options.refit_iterations
    )
    log.debug("alps %s: %d ADMM iterations", problem.name, iterations)
    return SolverResult(keep=keep, weight=new_weight)


_DEFAULTS = {f.name: f.default for f in fields(AlpsOptions)}


@register_solver("alps", needs={HESSIAN})
def alps(
    problem: LayerProblem,
    *,
    rho: float = _DEFAULTS["rho"],
    max_iterations: int = _DEFAULTS["max_iterations"],
    min_iterations: int = _DEFAULTS["min_iterations"],
    update_every: int = _DEFAULTS["update_every"],
    settled: float = _DEFAULTS["settled"],
    refit_iterations: int = _DEFAULTS["refit_iterations"],
    dampening_frac: float = _DEFAULTS["dampening_frac"],
    scope: str = _DEFAULTS["scope"],
    warm_start: str = _DEFAULTS["warm_start"],
) -> SolverResult:
    """ADMM on the ℓ0/N:M-constrained layer loss with a growing penalty, then a CG refit (ALPS).

    Options are those of :class:`AlpsOptions` (validated there). Unstructured targets count zeros
    over the whole matrix (``scope='matrix'``, the reference's) or per row (``scope='row'``).

    >>> from llmprune.solvers.types import LayerStats
    >>> x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))  # (tokens, in)
    >>> stats = LayerStats.from_inputs(x, {HESSIAN})
    >>> r = alps(LayerProblem("fc1", torch.randn(4, 8), stats, SparsitySpec.parse("2:4")))
    >>> int(r.keep.sum()), bool((r.weight[~r.keep] == 0).all())
    (16, True)
    """
    options = AlpsOptions(
        rho=rho,
        max_iterations=max_iterations,
        min_iterations=min_iterations,
        update_every=update_every,
        settled=settled,
        refit_iterations=refit_iterations,
        dampening_frac=dampening_frac,
        scope=scope,
        warm_start=warm_start,
    )
    return solve(problem, options)
