"""Finding decoder blocks and the prunable Linears inside them, for any architecture.

No ``model.model.layers``: blocks are the modules whose class is in ``model._no_split_modules``
(transformers' own list of blocks that must stay on one device), falling back to the longest
``nn.ModuleList`` of identical modules. GPT-2's ``Conv1D`` stores weights as (in, out); it is
transposed here, once, so solvers always see (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmprune.errors import ConfigError


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D``, whose weight is stored ``(in, out)``. By class name and its
    ``nf`` attribute, so remote-code copies of Conv1D count too."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_prunable(module: nn.Module) -> bool:
    """The one rule for what llmprune prunes (and recovery keeps masked): a Linear or a Conv1D."""
    return isinstance(module, nn.Linear) or is_transposed(module)


def first_output(out: Tensor | tuple | list) -> Tensor:
    """A block's (or attention's) main output: blocks return a Tensor in transformers 5 and a tuple in
    older versions, attention modules a tuple ``(output, weights)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """Return (prefix, blocks): the ModuleList path (e.g. ``model.layers``) and its blocks in order."""
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m).__name__ for m in module}
        if len(kinds) != 1:
            continue
        matches = kinds <= block_types
        if best is None or (matches, len(module)) > (type(best[1][0]).__name__ in block_types, len(best[1])):
            best = (name, module)
    if best is None:
        raise ConfigError(
            f"could not find decoder blocks in {type(model).__name__}: no nn.ModuleList of identical blocks. "
            "llmprune supports transformer causal LMs whose blocks sit in one ModuleList."
        )
    return best[0], list(best[1])


def prunable_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linears (and Conv1Ds) of a block by their name relative to the block, in definition order."""
    return {name: m for name, m in block.named_modules() if name and is_prunable(m)}


@dataclass
class WeightView:
    """A prunable module seen as an (out, in) matrix, whatever its storage layout."""

    module: nn.Module

    @property
    def transposed(self) -> bool:
        return is_transposed(self.module)

    def matrix(self) -> Tensor:
        """The weight as an (out, in) view: no copy, its own dtype."""
        w = self.module.weight.detach()
        return w.t() if self.transposed else w

    def read(self) -> Tensor:
        """fp32 copy of the weight as (out, in)."""
        w = self.module.weight.detach()
        return (w.t() if self.transposed else w).to(torch.float32).clone()

    @property
    def shape(self) -> tuple[int, int]:
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    @torch.no_grad()
    def write(self, keep: Tensor, new_weight: Tensor | None = None) -> None:
        """Store ``new_weight`` (if any) and set pruned entries to exact +0.0 (masked_fill, not a product)."""
        param = self.module.weight
        pruned = ~keep.to(param.device)
        if self.transposed:
            pruned = pruned.t()
            new_weight = None if new_weight is None else new_weight.t()
        if new_weight is not None:
            param.copy_(new_weight.to(param.dtype))
        param.masked_fill_(pruned, 0.0)
