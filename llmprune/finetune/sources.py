"""Where keep-masks come from when fine-tuning: a ``masks.safetensors``, a ``PruneResult``, a dict, or
the model's own zeros. One resolver, so ``keep_sparsity``, the callbacks and ``merge_adapter`` accept
the same things and reject bad input with the same one-line errors.

The rule for *which* modules can carry a mask is the pruning engine's (``calibration.modules``): Linears
(and GPT-2 ``Conv1D``) inside the decoder blocks. A peft-wrapped model is seen through its adapters:
``q_proj`` means the wrapped base Linear, never ``lora_A``/``lora_B``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import WeightView, find_blocks, is_prunable
from llmprune.errors import ConfigError
from llmprune.io.masks import load_keep_masks
from llmprune.result import PruneResult

#: what ``masks=`` accepts
MaskSource = str | os.PathLike | PruneResult | Mapping[str, Tensor] | None


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (names then match ``masks.safetensors``)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _unwrap(module: nn.Module) -> nn.Module:
    """A peft tuner layer's wrapped base layer, else the module itself."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: Linear}`` for every prunable module in the decoder blocks, adapters looked through."""
    prefix, blocks = find_blocks(model)
    out: dict[str, nn.Module] = {}

    def walk(module: nn.Module, name: str) -> None:
        base = _unwrap(module)
        if base is not module:  # a peft layer: its base Linear is the candidate, lora_A/B are not
            if is_prunable(base):
                out[name] = base
            return
        if is_prunable(module):
            out[name] = module
            return
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}")

    for i, block in enumerate(blocks):
        walk(block, f"{prefix}.{i}")
    return out


def find_linear(model: nn.Module, name: str) -> nn.Module | None:
    """The prunable module called ``name`` in ``model`` (or in its peft base model), adapters unwrapped."""
    for root in (model, base_model(model)):
        try:
            module = _unwrap(root.get_submodule(name))
        except AttributeError:
            continue
        return module if is_prunable(module) else None
    return None


@torch.no_grad()
def masks_from_zeros(model: nn.Module) -> dict[str, Tensor]:
    """Keep-masks ``(out, in)`` bool of the block Linears that hold at least one exact zero."""
    masks = {}
    for name, module in block_linears(base_model(model)).items():
        keep = module.weight != 0
        if not bool(keep.all()):
            masks[name] = (keep.t() if WeightView(module).transposed else keep).cpu()
    return masks


def load_masks(masks: MaskSource, model: nn.Module) -> dict[str, Tensor]:
    """Bool keep-masks ``(out, in)`` by module name, from any :data:`MaskSource` (None = current zeros)."""
    if masks is None:
        found = masks_from_zeros(model)
        if not found:
            raise ConfigError(
                "the model has no zero weights in its decoder-block Linears and no masks were given: prune "
                "it first (llmprune.prune) or pass masks='<pruned folder>/masks.safetensors'."
            )
        return found
    if isinstance(masks, PruneResult):
        if not masks.keep_masks:
            raise ConfigError(
                "this PruneResult carries no keep masks (nothing was pruned): pass masks=None to use the "
                "model's zeros, or the masks.safetensors of the run."
            )
        return dict(masks.keep_masks)
    if isinstance(masks, (str, os.PathLike)):
        return load_keep_masks(masks)
    if isinstance(masks, Mapping):
        return dict(masks)
    raise ConfigError(
        f"masks must be a path to masks.safetensors, a PruneResult, a dict of keep masks or None (the "
        f"model's zeros), got {type(masks).__name__}."
    )


def resolve(model: nn.Module, masks: MaskSource) -> dict[str, tuple[nn.Module, Tensor]]:
    """``{name: (module, keep (out, in) bool)}`` checked against ``model``; masks with nothing pruned are
    dropped (they would cost memory and protect nothing)."""
    out: dict[str, tuple[nn.Module, Tensor]] = {}
    for name, keep in load_masks(masks, model).items():
        module = find_linear(model, name)
        if module is None:
            raise ConfigError(
                f"mask {name!r} names no Linear of this model: the masks belong to another model (use the "
                "masks.safetensors saved with this checkpoint)."
            )
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
            raise ConfigError(
                f"mask {name!r} must be a bool tensor (True = kept), got {getattr(keep, 'dtype', type(keep))}"
            )
        shape = WeightView(module).shape
        if tuple(keep.shape) != shape:
            raise ConfigError(
                f"mask {name!r} has shape {tuple(keep.shape)} but the weight is {shape} (out, in): the masks "
                "belong to another model (use the masks.safetensors saved with this checkpoint)."
            )
        if not bool(keep.all()):
            out[name] = (module, keep)
    if not out:
        raise ConfigError("the masks prune nothing (every entry is True): pass the masks of a pruned model.")
    return out


def describe(masks: Any) -> str:
    """Where masks came from, for logs."""
    if masks is None:
        return "the model's zeros"
    if isinstance(masks, PruneResult):
        return f"PruneResult ({masks.method} {masks.sparsity})"
    if isinstance(masks, (str, os.PathLike)):
        return str(masks)
    return "a dict of keep masks"
