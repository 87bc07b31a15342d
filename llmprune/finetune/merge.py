"""``merge_adapter``: fold a standard peft LoRA adapter into a pruned model without un-pruning it.

peft's ``merge_and_unload`` adds ``s·BA`` to every base weight. ``BA`` is dense, so every pruned weight
becomes nonzero and the model is dense again. Here each LoRA layer's update is masked by the keep-mask
before it is added:

    W' = W + s·(B A) ⊙ keep        (summed over the active adapters)

so ``W'`` is exactly ``+0.0`` wherever ``W`` was pruned. The price is the part of the update that fell on
pruned weights: it is reported (its norm, per module and in total, as a fraction of the update's norm)
and warned about when large. A LoRA trained without knowing the mask puts about ``sqrt(sparsity)`` of
its norm there (71 % at 50 %); llmprune's PERP (``recover(method="perp")``) trains the masked product
itself and loses nothing at the merge.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import WeightView
from llmprune.errors import ConfigError
from llmprune.finetune.sources import MaskSource, base_model, resolve

log = logging.getLogger(__name__)


@dataclass
class ModuleMerge:
    update_norm: float  # ||s·BA||_F over the active adapters
    dropped_norm: float  # ||s·BA ⊙ pruned||_F: what the mask removed
    masked: bool  # False: the layer had no mask (e.g. lm_head) and was merged as peft would

    @property
    def dropped_fraction(self) -> float:
        return self.dropped_norm / self.update_norm if self.update_norm else 0.0


@dataclass
class MergeReport:
    """How much of the adapter's update the keep-masks dropped, per LoRA layer and in total."""

    modules: dict[str, ModuleMerge] = field(default_factory=dict)

    @property
    def update_norm(self) -> float:
        return math.sqrt(sum(m.update_norm**2 for m in self.modules.values()))

    @property
    def dropped_norm(self) -> float:
        return math.sqrt(sum(m.dropped_norm**2 for m in self.modules.values()))

    @property
    def dropped_fraction(self) -> float:
        """||dropped|| / ||update|| over all merged layers (Frobenius norms of the stacked updates)."""
        total = self.update_norm
        return self.dropped_norm / total if total else 0.0


def _lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """LoRA tuner layers by base-model name (as in ``masks.safetensors``), adapters checked."""
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(peft_model, "get_base_model"):
        raise ConfigError(
            "merge_adapter takes a peft model (peft.get_peft_model or PeftModel.from_pretrained); this model "
            "carries no adapter to merge."
        )
    for name, config in configs.items():
        kind = getattr(getattr(config, "peft_type", None), "value", str(getattr(config, "peft_type", "?")))
        if kind != "LORA":
            raise ConfigError(
                f"adapter {name!r} is {kind}, not LoRA: merge_adapter merges LoRA only; train a LoRA adapter "
                "(peft.LoraConfig) or merge yours with peft and re-prune with llmprune.keep_sparsity(model, "
                "masks, apply=True)."
            )
        if getattr(config, "use_dora", False):
            raise ConfigError(
                f"adapter {name!r} is DoRA (use_dora=True), whose merge rescales whole columns: train plain "
                "LoRA (use_dora=False) for merge_adapter."
            )
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in base_model(peft_model).named_modules() if isinstance(m, LoraLayer)}
    for name, layer in layers.items():
        if layer.merged:
            raise ConfigError(
                f"{name} already has its adapter merged (peft's merge), which un-pruned it: call "
                "model.unmerge_adapter() first, then merge_adapter(model)."
            )
        variants = [a for a in layer.active_adapters if a in getattr(layer, "lora_variant", {})]
        if variants:
            raise ConfigError(
                f"{name} uses a LoRA variant ({type(layer.lora_variant[variants[0]]).__name__}) whose merge "
                "is not an additive BA: train plain LoRA for merge_adapter."
            )
    return layers


@torch.no_grad()
def _merge_layer(layer: nn.Module, keep: Tensor | None) -> ModuleMerge:
    """Add the masked update of the active adapters to the base weight (and LoRA biases to the bias)."""
    base = layer.get_base_layer()
    delta = None
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        update = layer.get_delta_weight(adapter).float()  # weight layout, scale included
        delta = update if delta is None else delta + update
        if layer.lora_bias.get(adapter, False):
            base.bias.add_(layer.lora_B[adapter].bias * layer.scaling[adapter])
    if delta is None:
        return ModuleMerge(0.0, 0.0, keep is not None)
    update_norm = float(torch.linalg.vector_norm(delta))
    dropped_norm = 0.0
    if keep is not None:
        pruned = ~(keep.t() if WeightView(base).transposed else keep).to(delta.device)
        dropped_norm = float(torch.linalg.vector_norm(delta[pruned]))
        delta.masked_fill_(pruned, 0.0)
    base.weight.add_(delta.to(base.weight.dtype))
    if keep is not None:
        base.weight.masked_fill_(pruned, 0.0)  # canonical +0.0
    return ModuleMerge(update_norm, dropped_norm, keep is not None)


def merge_adapter(
    peft_model: nn.Module,
    masks: MaskSource = None,
    *,
    warn_above: float = 0.5,
    return_report: bool = False,
):
    """Merge the active LoRA adapters of ``peft_model`` into its pruned base weights, zeros kept exact.

    ``masks`` as in :func:`llmprune.keep_sparsity` (None = the zeros of the base weights, which LoRA
    training leaves untouched). LoRA layers without a mask (``lm_head``, embeddings) merge as peft merges
    them. Returns the plain transformers model (adapters removed), or ``(model, MergeReport)`` with
    ``return_report=True``; a warning is issued when the dropped fraction of the update norm exceeds
    ``warn_above``. Everything is checked before the first weight changes.

    >>> model = llmprune.merge_adapter(peft_model)       # not peft_model.merge_and_unload()  # doctest: +SKIP
    """
    layers = _lora_layers(peft_model)
    if not layers:
        raise ConfigError("the peft model has no LoRA layer: nothing to merge.")
    keep_by_module = {id(module): keep for module, keep in resolve(peft_model, masks).values()}
    report = MergeReport()
    for name, layer in layers.items():
        report.modules[name] = _merge_layer(layer, keep_by_module.get(id(layer.get_base_layer())))
    model = peft_model.unload()  # swaps each LoRA layer for its (now merged) base layer
    fraction = report.dropped_fraction
    log.info(
        "merge_adapter: %d LoRA layers merged, %d masked; the mask dropped %.1f %% of the update norm",
        len(report.modules), sum(m.masked for m in report.modules.values()), 100 * fraction,
    )  # fmt: skip
    if fraction > warn_above:
        warnings.warn(
            f"merge_adapter dropped {100 * fraction:.0f} % of the LoRA update's norm (the part on pruned "
            "weights): the merged model differs from the adapter you trained; evaluate it, or train with "
            "llmprune's PERP (recover(method='perp')), whose update lives on kept weights only.",
            stacklevel=2,
        )
    return (model, report) if return_report else model
