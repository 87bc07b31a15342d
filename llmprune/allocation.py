"""Non-uniform sparsity across layers: the math of ``--allocation {uniform,owl,error,depth}``.

Pure functions of per-layer numbers (outlier ratios, depths, measured errors, parameter counts) that
return per-layer sparsities whose mean, weighted by parameter count, is the requested sparsity, to
float precision. How the numbers are measured on a model is ``calibration/allocation_pass.py``'s job.

* ``owl`` (Yin et al., ICML 2024, arXiv 2310.05175): a block's outlier ratio is the fraction of its
  Wanda scores ``|W_ij|·||X_j||`` above ``owl_m`` times the block's mean score; blocks with more
  outliers keep more weights. Ratios are min-max scaled to a spread of ``2·owl_lambda`` around the
  target, as in the reference code (github.com/luuyin/OWL). Where the reference would leave
  ``[s − λ, s + λ]`` (skewed ratios: its shift by the mean can reach ``s ± 2λ``), the spread is
  narrowed until it fits, so the paper's stated bounds hold as well as the exact mean.
* ``depth`` (an arithmetic progression over depth, as in ATP): sparsity rises linearly with block
  depth from ``s − depth_lambda`` to ``s + depth_lambda``; early blocks feed every later one.
* ``error``: each Linear is pruned at a few trial sparsities in ``[s − error_lambda, s + error_lambda]``
  and its relative reconstruction error measured; the allocation minimises the sum of the (convex,
  piecewise-linear) error curves under the exact mean, greedily by marginal error per weight, which
  is optimal for convex curves.
* ``uniform``: every layer at the target (no pass at all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from llmprune.errors import ConfigError, did_you_mean

ALLOCATIONS = ("uniform", "owl", "error", "depth")


@dataclass(frozen=True)
class AllocationOptions:
    """Knobs of every allocation, prefixed by its name (``--option owl_lambda=0.08``)."""

    # chosen on the validation part (scripts/choose_defaults.py owl; Wanda at 70 % on SmolLM2): 0.12 beat
    # the paper's 0.08 and 0.04 there; M was not re-chosen (budget) and stays the paper's
    owl_lambda: float = 0.12  # sparsities within [s - λ, s + λ] (paper: 0.08)
    owl_m: float = 5.0  # the paper's M: a score is an outlier above M x its block's mean score
    depth_lambda: float = 0.08  # first block s - λ, last block s + λ
    error_lambda: float = 0.1  # trial sparsities and results within [s - λ, s + λ]
    error_trials: int = 5  # trial sparsities per Linear (evenly spaced over that range)
    error_solver: str = "wanda"  # solver whose reconstruction error is measured (wanda: mask only)

    def __post_init__(self) -> None:
        for name in ("owl_lambda", "depth_lambda", "error_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 0.5:
                raise ConfigError(f"allocation option {name} must be a fraction in [0, 0.5), got {value!r}.")
        if isinstance(self.owl_m, bool) or not isinstance(self.owl_m, (int, float)) or not self.owl_m > 0:
            raise ConfigError(f"allocation option owl_m must be a number > 0 (paper: 5), got {self.owl_m!r}.")
        if (
            isinstance(self.error_trials, bool)
            or not isinstance(self.error_trials, int)
            or self.error_trials < 2
        ):
            raise ConfigError(
                f"allocation option error_trials must be an integer >= 2, got {self.error_trials!r}."
            )
        if self.error_solver not in ("wanda", "sparsegpt"):
            raise ConfigError(
                f"allocation option error_solver must be 'wanda' (mask only, cheap) or 'sparsegpt' (with "
                f"weight update), got {self.error_solver!r}."
            )


OPTION_NAMES = tuple(f.name for f in fields(AllocationOptions))


def check_allocation(allocation: str) -> str:
    if allocation not in ALLOCATIONS:
        raise ConfigError(
            f"unknown allocation {allocation!r}{did_you_mean(str(allocation), ALLOCATIONS)}; choose one of "
            f"{', '.join(ALLOCATIONS)}."
        )
    return allocation


def split_options(allocation: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], AllocationOptions]:
    """Separate ``--option`` pairs into the solver's and the allocation's (validated).

    An allocation option given with another allocation is an error naming the flag that was meant.
    """
    check_allocation(allocation)
    solver_options, mine = {}, {}
    for key, value in options.items():
        if key not in OPTION_NAMES:
            solver_options[key] = value
        elif key.startswith(allocation + "_"):
            mine[key] = value
        else:
            owner = key.split("_")[0]
            raise ConfigError(
                f"option {key} belongs to allocation {owner!r}, but the allocation is {allocation!r}: add "
                f"--allocation {owner} (recipe prune.allocation, API allocation=) or drop the option."
            )
    return solver_options, AllocationOptions(**mine)


def check_allocation_target(allocation: str, options: AllocationOptions, default) -> None:
    """A non-uniform allocation needs an unstructured target with room for ``± λ`` inside [0, 1)."""
    if allocation == "uniform":
        return
    if default.pattern is not None:
        raise ConfigError(
            f"allocation {allocation!r} spreads an unstructured sparsity across layers; {default.pattern} is "
            "an N:M pattern, the same in every layer by design. Use allocation='uniform' with N:M, or a "
            "fraction."
        )
    lam = getattr(options, f"{allocation}_lambda")
    if default.sparsity == 0 or default.sparsity + lam >= 1:
        raise ConfigError(
            f"allocation {allocation!r} with {allocation}_lambda={lam} needs 0 < sparsity and sparsity + "
            f"{allocation}_lambda < 1, got sparsity {default.sparsity}: lower {allocation}_lambda."
        )


def _weighted_mean(values: Sequence[float], sizes: Sequence[int]) -> float:
    return math.fsum(v * n for v, n in zip(values, sizes, strict=True)) / math.fsum(sizes)


def spread(scores: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """Sparsities rising with ``scores``: min-max scaled to a spread of 2λ, shifted to the exact weighted
    mean ``sparsity``, and narrowed (never widened) until all lie within ``[sparsity − λ, sparsity + λ]``.

    >>> spread([0.0, 1.0, 2.0], [1, 1, 1], 0.5, 0.1)
    [0.4, 0.5, 0.6]
    """
    lo, hi = min(scores), max(scores)
    if hi == lo or lam == 0:
        return [sparsity] * len(scores)
    offsets = [2 * lam * (s - lo) / (hi - lo) for s in scores]
    centre = _weighted_mean(offsets, sizes)
    offsets = [o - centre for o in offsets]
    scale = min(1.0, lam / max(abs(o) for o in offsets))
    out = [sparsity + scale * o for o in offsets]
    return _exact_mean(out, sizes, sparsity)


def _exact_mean(values: list[float], sizes: Sequence[int], sparsity: float) -> list[float]:
    """Remove the last rounding residue of the weighted mean (a few ulps) from the largest layer."""
    residue = _weighted_mean(values, sizes) - sparsity
    big = max(range(len(values)), key=lambda i: sizes[i])
    values[big] -= residue * math.fsum(sizes) / sizes[big]
    return values


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """OWL's layerwise outlier distribution for one block: the fraction of its Wanda scores (all its
    Linears' ``|W|·||X||`` together) above ``m`` times their mean."""
    total = math.fsum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    if not count:
        return 0.0
    threshold = m * total / count
    return sum(int((s > threshold).sum()) for s in scores) / count


def owl(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """OWL: blocks with higher outlier ratios get lower sparsity (see the module docstring)."""
    return spread([-r for r in ratios], sizes, sparsity, lam)


def depth(num_blocks: int, sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """Sparsity rising linearly with depth, block 0 lowest (exact weighted mean, within s ± λ)."""
    return spread(list(range(num_blocks)), sizes, sparsity, lam)


def trial_sparsities(sparsity: float, lam: float, trials: int) -> list[float]:
    """Evenly spaced trial sparsities over ``[s − λ, s + λ]`` (clipped to [0, 0.99])."""
    lo, hi = max(0.0, sparsity - lam), min(0.99, sparsity + lam)
    return [lo + (hi - lo) * k / (trials - 1) for k in range(trials)]


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of (sparsity, error) points sorted by sparsity."""
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        if hull and p[0] == hull[-1][0]:  # the same trial twice (λ = 0): the lower error stands
            continue
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] is above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def by_error(
    curves: Sequence[Sequence[tuple[float, float]]], sizes: Sequence[int], sparsity: float
) -> list[float]:
    """Per-layer sparsities minimising the summed errors under the exact weighted mean ``sparsity``.

    ``curves[l]`` holds (trial sparsity, error) points of layer l; between them the error is taken on
    the lower convex hull, so spending sparsity where it costs least per weight, segment by segment,
    is optimal. Each layer starts at its lowest trial; the last segment taken is taken partly.
    """
    hulls = [_lower_hull(list(c)) for c in curves]
    values = [h[0][0] for h in hulls]
    budget = sparsity * math.fsum(sizes) - math.fsum(v * n for v, n in zip(values, sizes, strict=True))
    if budget < -1e-12 * math.fsum(sizes) or sparsity > _weighted_mean([h[-1][0] for h in hulls], sizes):
        raise ConfigError(
            f"the trial sparsities cannot average {sparsity}: widen error_lambda or change the sparsity."
        )
    segments = []
    for i, h in enumerate(hulls):
        for (x1, y1), (x2, y2) in zip(h, h[1:], strict=False):
            segments.append(((y2 - y1) / (sizes[i] * (x2 - x1)), i, x2 - x1))
    for _, i, width in sorted(segments):  # per-layer slopes rise (convex): segments come in order
        if budget <= 0:
            break
        take = min(width, budget / sizes[i])
        values[i] += take
        budget -= take * sizes[i]
    return _exact_mean(values, sizes, sparsity)
