"""Least-squares compensation for removed input columns (OBS / ZipLM style): pure tensor math.

When input columns ``R`` of a Linear ``y = W x (+ b)`` are removed, the remaining columns ``K`` can absorb
what the removed ones carried: the weights minimising ``mean‖W x - W' x_K‖²`` over the calibration
tokens are ``W' = W H[:, K] H[K, K]⁻¹`` with ``H = mean x xᵀ`` (damped). When the layer has a bias, a
constant input ``1`` is appended to ``x`` so the bias is refitted too: the removed channels' mean
contribution ``W_R mean(x_R)`` moves into it (FLAP's bias compensation is the special case with no
refit of ``K``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from llmprune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_TRIES = 6


def damped_inverse(hessian: Tensor, damp: float = 0.01) -> Tensor:
    """``(H + λI)⁻¹`` in float64 with ``λ = damp·mean(diag H)``; dead channels (``H_jj = 0``) get 1.

    If Cholesky still fails, λ is multiplied by 10 (up to 5 times) with a warning naming the knob.

    >>> [round(v, 6) for v in damped_inverse(torch.tensor([[2.0, 0.0], [0.0, 4.0]]), 0.0).diagonal().tolist()]
    [0.5, 0.25]
    """
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0 <= damp < float("inf"):
        raise ConfigError(f"dampening_frac must be a finite number >= 0 (default 0.01), got {damp!r}.")
    H = hessian.detach().to(torch.float64).clone()
    if not bool(torch.isfinite(H).all()):
        raise DataError("a calibration Hessian has NaN/inf entries: calibrate in float32 or bfloat16.")
    dead = torch.diagonal(H) <= 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H.diagonal()[dead] = 1.0
    scale = float(torch.diagonal(H).mean())
    frac = float(damp)
    for attempt in range(_TRIES):
        L, info = torch.linalg.cholesky_ex(H + frac * scale * torch.eye(H.shape[0], dtype=H.dtype))
        if int(info) == 0:
            if attempt:
                log.warning(
                    "Hessian needed dampening_frac=%g (asked %g): raise `dampening_frac`.", frac, damp
                )
            return torch.cholesky_inverse(L)
        frac = max(frac, 1e-8) * 10
    raise DataError(f"the calibration Hessian is not positive definite even with dampening_frac={frac:g}.")


def refit_columns(weight: Tensor, hessian: Tensor, keep: Tensor, *, damp: float = 0.01) -> Tensor:
    """The least-squares weights on the kept columns: ``W H[:, K] (H[K, K] + λI)⁻¹`` → (out, |K|).

    ``weight`` (out, in); ``hessian`` (in, in) = mean x xᵀ; ``keep`` (in,) bool. With ``damp=0`` and a
    full-rank ``H`` this is the exact minimiser of ``mean‖W x - W' x_K‖²``.

    >>> h = torch.tensor([[1.0, 1.0], [1.0, 1.0]]) + 1e-9 * torch.eye(2)  # x_0 == x_1 on every token
    >>> refit_columns(torch.tensor([[1.0, 2.0]]), h, torch.tensor([True, False]), damp=0).round()
    tensor([[3.]])
    """
    K = keep.nonzero().flatten()
    H = hessian.to(torch.float64)
    Hkk_inv = damped_inverse(H[K][:, K], damp)  # (k, k)
    out = weight.to(torch.float64) @ H[:, K] @ Hkk_inv  # (out, k)
    return out.to(weight.dtype)


def augmented_hessian(hessian: Tensor, mean: Tensor) -> Tensor:
    """``mean [x; 1][x; 1]ᵀ`` from ``H = mean x xᵀ`` and ``mean x``: the statistics of a biased layer."""
    n = hessian.shape[0]
    out = hessian.new_empty(n + 1, n + 1)
    out[:n, :n] = hessian
    out[:n, n] = mean
    out[n, :n] = mean
    out[n, n] = 1.0
    return out


def refit_with_bias(
    weight: Tensor, bias: Tensor, hessian: Tensor, mean: Tensor, keep: Tensor, *, damp: float = 0.01
) -> tuple[Tensor, Tensor]:
    """Refit the kept columns *and* the bias: least squares on ``[x_K; 1]`` → ((out, |K|), (out,)).

    The bias is the extra column of ``[W | b]``; it is never removed.
    """
    Wb = torch.cat([weight, bias[:, None]], dim=1)  # (out, in + 1)
    keep_b = torch.cat([keep, keep.new_ones(1)])
    fitted = refit_columns(Wb, augmented_hessian(hessian, mean), keep_b, damp=damp)
    return fitted[:, :-1], fitted[:, -1]


def mean_compensation(weight: Tensor, bias: Tensor, mean: Tensor, keep: Tensor) -> Tensor:
    """FLAP's bias update without refit: ``b + W[:, R] mean(x_R)`` for the removed columns R."""
    removed = ~keep
    return bias + weight[:, removed].to(torch.float64).matmul(mean[removed].to(torch.float64)).to(bias.dtype)
