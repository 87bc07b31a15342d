"""Least squares of the kept weights by preconditioned conjugate gradients, every row at once.

With a keep-mask fixed, the best kept weights of one row minimise ``(w - ŵ) H (w - ŵ)^T`` with ŵ zero
off the support S, i.e. solve ``H_SS ŵ_S = (w H)_S``. A direct solve factors one |S| x |S| matrix per
row; CG needs one ``(rows, in) x (in, in)`` product per iteration for all rows together, and from a
good start (the solver's own weights) a few iterations suffice. The preconditioner is the Jacobi
one, ``1 / diag(H)``: what ALPS gets by running plain CG on the Hessian normalised to a unit diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_least_squares(
    weight: Tensor,
    hessian: Tensor,
    keep: Tensor,
    start: Tensor | None = None,
    *,
    iterations: int = 10,
    rtol: float = 1e-4,
) -> Tensor:
    """Per-row ``argmin_ŵ (w - ŵ) H (w - ŵ)^T`` over ŵ on ``keep``. -> fp32 (out, in), exact zeros off it.

    weight (out, in), hessian (in, in) positive definite on every row's support (damp it first),
    keep (out, in) bool, start (out, in) or None (= weight on the support). Stops after ``iterations``
    or once every row's residual norm is below ``rtol`` times that row's right-hand side norm.

    >>> h = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    >>> masked_least_squares(torch.tensor([[1.0, 2.0]]), h, torch.tensor([[False, True]]))
    tensor([[0.0000, 2.5000]])
    """
    h = hessian.to(torch.float32)  # (in, in)
    keepf = keep.to(torch.float32)  # (out, in)
    tiny = torch.finfo(torch.float32).tiny
    inv_diag = torch.diagonal(h).clamp_min(tiny).reciprocal()  # (in,)
    rhs = (weight.to(torch.float32) @ h) * keepf  # (out, in) = (w H)_S
    x = (weight if start is None else start).to(torch.float32) * keepf
    residual = rhs - (x @ h) * keepf
    stop = rtol * rhs.norm(dim=-1, keepdim=True)  # (out, 1)
    z = residual * inv_diag
    direction = z.clone()
    rz = (residual * z).sum(-1, keepdim=True)  # (out, 1)
    for _ in range(iterations):
        if bool((residual.norm(dim=-1, keepdim=True) <= stop).all()):
            break
        h_dir = (direction @ h) * keepf  # (out, in)
        curvature = (direction * h_dir).sum(-1, keepdim=True)
        step = torch.where(curvature > tiny, rz / curvature.clamp_min(tiny), torch.zeros_like(rz))
        x.addcmul_(step, direction)
        residual.addcmul_(step, h_dir, value=-1.0)
        z = residual * inv_diag
        rz_new = (residual * z).sum(-1, keepdim=True)
        ratio = torch.where(rz > tiny, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        direction = z + ratio * direction
        rz = rz_new
    return x.masked_fill(~keep, 0.0)
