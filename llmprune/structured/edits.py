"""Function-equivalent edits used during the passes: choose groups of input columns, zero them and
refit the rest, remember and restore the original weights. Removal itself happens in ``surgery``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import WeightView
from llmprune.structured.arch import head_geometry
from llmprune.structured.passes import BlockStats, InputStats
from llmprune.structured.refit import augmented_hessian, mean_compensation, refit_columns, refit_with_bias
from llmprune.structured.scores import (
    block_influence,
    fluctuation_scores,
    group_scores,
    obs_group_removal,
    wanda_channel_scores,
)
from llmprune.structured.surgery import head_indices


def head_groups(model: nn.Module) -> Tensor:
    g = head_geometry(model.config)
    return torch.stack([head_indices(g, [k])[0] for k in range(g.num_kv_heads)])  # (G, rep * hd)


def augmented(W: Tensor, bias: Tensor | None, st: InputStats) -> tuple[Tensor, Tensor]:
    """[W | b] and the Hessian of [x; 1] for a biased layer (the bias column is never removed)."""
    if bias is None:
        return W, st.hessian
    return torch.cat([W, bias.detach().float()[:, None]], 1), augmented_hessian(st.hessian, st.mean)


def choose_groups(
    method: str, module: nn.Module, st: InputStats, groups: Tensor, count: int, opts: dict[str, Any]
) -> tuple[list[int], list[float] | None]:
    """Which ``count`` groups of input columns of ``module`` to remove (and the OBS error curve)."""
    W = WeightView(module).read()  # (out, in)
    if method == "obs":
        Wa, Ha = augmented(W, getattr(module, "bias", None), st)
        step = max(1, math.ceil(count / opts["obs_rounds"]))
        return obs_group_removal(Wa, Ha, groups, count, damp=opts["dampening_frac"], step=step)
    cols = (
        wanda_channel_scores(W, st.sq_norms)
        if method == "wanda_sp"
        else fluctuation_scores(W, st.sq_norms, st.mean)
    )
    order = torch.argsort(group_scores(cols, groups), stable=True)
    return order[:count].tolist(), None


@torch.no_grad()
def remove_columns(module: nn.Module, removed: Tensor, st: InputStats, refit: bool, damp: float) -> None:
    """Write the function-equivalent edit: removed input columns zero, the rest refitted (or kept), and
    the bias compensated for the removed columns' mean where the layer has one."""
    view = WeightView(module)
    W = view.read()  # (out, in)
    bias = getattr(module, "bias", None)
    keep = torch.ones(W.shape[1], dtype=torch.bool)
    keep[removed] = False
    new_b = None
    new = torch.zeros_like(W)
    if refit and bias is not None:
        new[:, keep], new_b = refit_with_bias(W, bias.detach().float(), st.hessian, st.mean, keep, damp=damp)
    elif refit:
        new[:, keep] = refit_columns(W, st.hessian, keep, damp=damp)
    else:
        new[:, keep] = W[:, keep]
        if bias is not None:
            new_b = mean_compensation(W, bias.detach().float(), st.mean, keep)
    view.write(keep[None, :].expand_as(W), new)
    if new_b is not None:
        bias.copy_(new_b.to(bias.dtype))


@torch.no_grad()
def restore(originals: list[tuple[nn.Module, Tensor, Tensor | None]]) -> None:
    """Put back the input model's weights: the edits were only needed to propagate the calibration."""
    for module, weight, bias in originals:
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)


def keep_original(module: nn.Module, originals: list) -> nn.Module:
    bias = getattr(module, "bias", None)
    originals.append(
        (module, module.weight.detach().clone(), None if bias is None else bias.detach().clone())
    )
    return module


def block_score(st: BlockStats) -> dict[str, float]:
    return {
        "block_influence": block_influence(st.cos_sum, st.num_tokens),
        "residual_error": st.residual_error,
    }
