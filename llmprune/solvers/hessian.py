"""Damped inverse-Hessian factors shared by the second-order solvers (SparseGPT, iCBS).

Calibration Hessians ``H = mean x x^T`` are often singular: dead input channels, duplicated
channels, fewer tokens than features. A relative damping ``dampening_frac * mean(diag H)`` on the
diagonal makes them invertible; when float32 Cholesky still fails we escalate the damping rather
than emit NaN weights, and say which knob would have avoided it.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from llmprune.errors import ConfigError, DataError
from llmprune.solvers import fallbacks

log = logging.getLogger(__name__)

#: each retry multiplies the damping by this; after ``_TRIES`` attempts we fall back to diag(H)
_ESCALATION = 10.0
_TRIES = 6
#: relative damping the escalation starts from when the user asked for none at all
_MIN_ESCALATED = 1e-4


def check_dampening(dampening_frac: float) -> None:
    if isinstance(dampening_frac, bool) or not isinstance(dampening_frac, (int, float)):
        raise ConfigError(f"dampening_frac must be a number such as 0.01, got {dampening_frac!r}.")
    if not math.isfinite(dampening_frac) or dampening_frac < 0:
        raise ConfigError(
            f"dampening_frac must be a finite fraction >= 0 (default 0.01), got {dampening_frac}."
        )


def dead_columns(hessian: Tensor) -> Tensor:
    """(in,) bool: input channels that were zero on every calibration token (``H_dd == 0``).

    A negative diagonal cannot come from ``mean x x^T``; it is treated as dead too rather than
    allowed to poison the factorisation.
    """
    return torch.diagonal(hessian) <= 0


def _upper_inverse_cholesky(hessian: Tensor, damp: float) -> Tensor | None:
    """Upper Cholesky factor of ``(H + damp I)^-1``, or None when float32 cannot factor it."""
    damped = hessian.clone()
    damped.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(damped)  # (in, in)
    if int(info) != 0 or not bool(torch.isfinite(lower).all()):
        return None
    inverse = torch.cholesky_inverse(lower)  # (in, in) = (H + damp I)^-1
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        return None
    return upper


def damped_inverse_cholesky(hessian: Tensor, dampening_frac: float = 0.01, *, name: str = "layer") -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1`` in float32, with ``λ = dampening_frac·mean(diag H)``.

    Row ``i`` of ``U`` is row ``i`` of the inverse Hessian of the columns ``i..`` (scaled by one over
    the square root of its diagonal), which is what column-by-column OBS updates need. Dead channels
    get ``H_dd = 1`` first, so their rows and columns of ``U`` stay zero off the diagonal and pruning
    them moves no other weight. If a factorisation fails or is not finite, λ is multiplied by 10 (up
    to 5 times) with a warning; as a last resort ``diag(H)`` alone is used (no cross-channel updates).

    >>> h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    >>> u = damped_inverse_cholesky(h, 0.0)
    >>> torch.allclose(u.T @ u, torch.linalg.inv(h))
    True
    """
    check_dampening(dampening_frac)
    hessian = hessian.detach().to(torch.float32)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise DataError(f"the Hessian of {name} must be square (in, in), got shape {tuple(hessian.shape)}.")
    if not bool(torch.isfinite(hessian).all()):
        raise DataError(
            f"the calibration Hessian of {name} has NaN/inf entries: its inputs overflowed. Calibrate in "
            "float32 or bfloat16 rather than float16, or check the calibration text."
        )
    hessian = hessian.clone()
    dead = dead_columns(hessian)
    hessian.diagonal()[dead] = 1.0
    mean_diag = float(torch.diagonal(hessian).mean())

    frac = float(dampening_frac)
    for attempt in range(_TRIES):
        upper = _upper_inverse_cholesky(hessian, frac * mean_diag)
        if upper is not None:
            if attempt:
                fallbacks.note("damping_raised")
                log.warning(
                    "%s: the damped Hessian was not positive definite in float32 with dampening_frac=%g; "
                    "it needed %g. Pass a larger `dampening_frac` solver option to avoid this retry.",
                    name,
                    dampening_frac,
                    frac,
                )
            return upper
        frac = max(frac, _MIN_ESCALATED) * _ESCALATION

    fallbacks.note("diagonal_hessian")
    log.warning(
        "%s: the Hessian could not be factored even with dampening_frac=%g; falling back to its diagonal "
        "(no weight reconstruction across input channels). Check the calibration data, or raise the "
        "`dampening_frac` solver option.",
        name,
        frac / _ESCALATION,
    )
    return torch.diag(torch.rsqrt(torch.diagonal(hessian) + dampening_frac * mean_diag))


def checked_hessian(method: str, name: str, weight: Tensor, hessian: Tensor | None) -> Tensor:
    """The layer's (in, in) Hessian on the weight's device, after the checks every second-order solver
    needs: present, the right shape, and finite like the weight (an overflow would poison every solve)."""
    width = weight.shape[1]
    if hessian is None or hessian.shape != (width, width):
        raise DataError(
            f"{method} needs the ({width}, {width}) input Hessian of {name}, got "
            f"{None if hessian is None else tuple(hessian.shape)}: collect LayerStats with needs={{HESSIAN}}."
        )
    if not bool(torch.isfinite(hessian).all()) or not bool(torch.isfinite(weight).all()):
        raise DataError(
            f"{name} has NaN/inf weights or calibration Hessian: check the checkpoint, and calibrate in "
            "float32 or bfloat16 rather than float16."
        )
    return hessian.to(weight.device)
