"""Keep masks of a pruned model, and the guarantee that recovery never un-prunes a weight.

One convention everywhere (as in ``SolverResult.keep``): a keep mask is a bool tensor of shape
``(out, in)``, True = the weight is kept. GPT-2 style ``Conv1D`` layers store their weight as
``(in, out)``; :func:`weight_2d` hides that, so callers always see ``(out, in)``. What counts as
prunable is ``calibration.modules.is_prunable``, the engine's own rule.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import find_blocks, is_prunable, is_transposed, prunable_linears
from llmprune.errors import ConfigError, LlmpruneError


class SparsityViolation(LlmpruneError, RuntimeError):
    """A weight that the keep mask says is pruned is not exactly zero (or a kept one vanished)."""


def weight_2d(module: nn.Module) -> Tensor:
    """The module's weight as an ``(out, in)`` view (no copy)."""
    return module.weight.t() if is_transposed(module) else module.weight


def to_weight_layout(module: nn.Module, keep: Tensor) -> Tensor:
    """An ``(out, in)`` keep mask in the layout of ``module.weight``."""
    return keep.t() if is_transposed(module) else keep


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(full name, block)]`` in order, found the way the pruning engine finds them.

    Never a hard-coded path such as ``model.model.layers``: the engine matches ``model._no_split_modules``.
    """
    prefix, blocks = find_blocks(model)
    return [(f"{prefix}.{i}", block) for i, block in enumerate(blocks)]


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear / Conv1D inside a decoder block, by full module name: the prunable layers."""
    out: dict[str, nn.Module] = {}
    for block_name, block in decoder_blocks(model):
        out.update({f"{block_name}.{name}": m for name, m in prunable_linears(block).items()})
    return out


@torch.no_grad()
def keep_masks_from_zeros(model: nn.Module) -> dict[str, Tensor]:
    """``{name: keep (out, in) bool}`` from the exact zeros of each block Linear (True = nonzero)."""
    return {name: weight_2d(m) != 0 for name, m in block_linears(model).items()}


def resolve_targets(
    model: nn.Module, keep_masks: dict[str, Tensor] | None
) -> dict[str, tuple[nn.Module, Tensor]]:
    """``{name: (module, keep)}`` for the Linears that hold at least one pruned weight.

    Masks are validated against the modules (shape, dtype) and moved to the weight's device.
    """
    if keep_masks is None:
        keep_masks = keep_masks_from_zeros(model)
    modules = dict(model.named_modules())
    targets: dict[str, tuple[nn.Module, Tensor]] = {}
    for name, keep in keep_masks.items():
        module = modules.get(name)
        if module is None or not is_prunable(module):
            raise ConfigError(
                f"keep_masks names {name!r}, which is not a Linear of this model: check the mask keys."
            )
        w = weight_2d(module)
        if tuple(keep.shape) != tuple(w.shape):
            raise ConfigError(
                f"keep mask of {name} has shape {tuple(keep.shape)}, the weight (out, in) {tuple(w.shape)}."
            )
        keep = keep.to(device=w.device, dtype=torch.bool)
        if not bool(keep.all()):
            targets[name] = (module, keep)
    return targets


@torch.no_grad()
def enforce(targets: dict[str, tuple[nn.Module, Tensor]]) -> None:
    """Write exact zeros (``masked_fill``, never ``W * mask`` which leaves ``-0.0``) at every pruned entry."""
    for module, keep in targets.values():
        module.weight.masked_fill_(~to_weight_layout(module, keep), 0.0)


def violations(targets: dict[str, tuple[nn.Module, Tensor]]) -> Iterator[tuple[str, int]]:
    """``(name, count)`` of pruned entries that are not exactly zero."""
    for name, (module, keep) in targets.items():
        bad = int((weight_2d(module).detach()[~keep] != 0).sum())
        if bad:
            yield name, bad


def assert_preserved(targets: dict[str, tuple[nn.Module, Tensor]]) -> None:
    """Raise :class:`SparsityViolation` naming every layer where a pruned weight became nonzero."""
    bad = list(violations(targets))
    if bad:
        listing = ", ".join(f"{n} ({c})" for n, c in bad[:5])
        raise SparsityViolation(
            f"recovery changed pruned weights in {len(bad)} layers: {listing}. This is a bug."
        )


def sparsity(targets: dict[str, tuple[nn.Module, Tensor]]) -> float:
    """Fraction of exact zeros over the target layers (what users read as 'the sparsity')."""
    zeros = sum(int((weight_2d(m) == 0).sum()) for m, _ in targets.values())
    total = sum(m.weight.numel() for m, _ in targets.values())
    return zeros / total if total else 0.0
