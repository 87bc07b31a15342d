"""PERP (Zimmer et al., arXiv 2312.15230): retrain a tiny, sparsity-preserving subset after pruning.

Trainable: all biases, all norm weights, ``lm_head`` through plain LoRA, and a *mask-preserving* LoRA on
every pruned Linear (r=16, alpha=32, dropout 0). Plain LoRA cannot be merged into a sparse weight without
densifying it; the two variants of the paper can:

- MaskLoRA (default): ``W + s·(BA ⊙ keep)``; the merge adds the masked product, so pruned entries stay 0.
- ScaleLoRA: ``W ⊙ (BA)`` with ``BA`` initialised to all ones (no ``s``); pruned entries are ``0 · x = 0``.
  The reference initialises A and B to the constant ``1/sqrt(r)``: every rank-one component then gets the
  same gradient forever and the adapter is effectively rank 1. Here ``B = [1, 0, …]``, ``A = [1; random]``
  gives the same ``BA = 1`` start with the symmetry broken, as in plain LoRA.

Both are peft ``lora.Linear`` subclasses registered through ``LoraConfig._register_custom_module`` (no fork):
peft injects and merges them; only the delta and the forward differ. A tied ``lm_head`` is skipped (with a
log line): merging LoRA into a weight shared with the input embeddings would change the embeddings too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmprune.errors import ConfigError, did_you_mean
from llmprune.recovery import masking
from llmprune.recovery.train import GradFlags, TrainSettings, make_adamw

log = logging.getLogger(__name__)

ADAPTER = "perp"
VARIANTS = ("mask", "scale")


def _peft():
    try:
        import peft
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError as exc:
        raise ConfigError(
            "method='perp' needs peft: `pip install 'llmprune[recover]'` (or `pip install peft`)."
        ) from exc
    return peft, LoraLinear


def _layer_classes() -> tuple[type, type]:
    """Build the two peft layer classes lazily, so importing llmprune never imports peft."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    _, LoraLinear = _peft()

    class MaskLoraLinear(LoraLinear):
        """peft LoRA whose update is restricted to kept weights: ``W + s·(BA ⊙ keep)``.

        ``keep_mask`` (weight layout, bool) is None for layers that were not pruned (``lm_head``): those
        behave exactly as peft's plain LoRA.
        """

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
            super().__init__(base_layer, adapter_name, config, **kwargs)
            self.fan_in_fan_out = masking.is_transposed(self.get_base_layer())
            self.register_buffer("keep_mask", None, persistent=False)

        def set_keep(self, keep_weight_layout: Tensor) -> None:
            self.keep_mask = keep_weight_layout

        def as_plain_lora(self) -> None:
            """For layers that were not pruned (``lm_head``): peft's plain LoRA, initialised as such."""
            self.keep_mask = None
            for adapter in self.lora_A:
                LoraLinear.reset_lora_parameters(self, adapter, True)

        def _product(self, adapter: str) -> Tensor:
            """``BA`` in the layout of the base weight."""
            prod = self.lora_B[adapter].weight @ self.lora_A[adapter].weight  # (out, in)
            return prod.t() if self.fan_in_fan_out else prod

        def _masked_product(self, adapter: str, dtype: torch.dtype) -> Tensor:
            """``BA ⊙ keep``: one pass over the matrix (it is rebuilt in every forward)."""
            return torch.where(self.keep_mask, self._product(adapter).to(dtype), 0.0)

        def get_delta_weight(self, adapter: str) -> Tensor:
            if self.keep_mask is None:
                return super().get_delta_weight(adapter)
            prod = self._masked_product(adapter, self.lora_B[adapter].weight.dtype)
            return prod * self.scaling[adapter]

        def _effective_weight(self) -> Tensor:
            """``W + s·(BA ⊙ keep)``, the merge's formula, with the scale folded into the add."""
            weight = self.get_base_layer().weight
            for adapter in self.active_adapters:
                if adapter in self.lora_A:
                    masked = self._masked_product(adapter, weight.dtype)
                    weight = torch.add(weight, masked, alpha=self.scaling[adapter])
            return weight

        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            if self.keep_mask is None or self.disable_adapters or self.merged:
                return super().forward(x, *args, **kwargs)
            base = self.get_base_layer()
            weight = self._effective_weight()
            if self.fan_in_fan_out:  # Conv1D: y = x W + b with W (in, out)
                out = x.to(weight.dtype) @ weight
                return out + base.bias if base.bias is not None else out
            return F.linear(x.to(weight.dtype), weight, base.bias)

    class ScaleLoraLinear(MaskLoraLinear):
        """``W ⊙ (BA)``, BA = 1 at the start; pruned entries stay 0 because they are multiplied."""

        def reset_lora_parameters(self, adapter_name, init_lora_weights) -> None:
            super().reset_lora_parameters(adapter_name, init_lora_weights)
            if adapter_name in self.lora_A:
                with torch.no_grad():
                    self.lora_B[adapter_name].weight.zero_()[:, 0] = 1.0  # (out, r)
                    self.lora_A[adapter_name].weight[0, :] = 1.0  # (r, in); rows 1.. keep LoRA's random init

        def get_delta_weight(self, adapter: str) -> Tensor:
            if self.keep_mask is None:
                return super().get_delta_weight(adapter)  # plain LoRA
            weight = self.get_base_layer().weight
            delta = weight * (self._product(adapter).to(weight.dtype) - 1.0)  # W ⊙ BA − W
            return delta.masked_fill(~self.keep_mask, 0.0)

        def _effective_weight(self) -> Tensor:
            weight = self.get_base_layer().weight
            for adapter in self.active_adapters:
                if adapter in self.lora_A:
                    weight = weight * self._product(adapter).to(weight.dtype)
            return weight

    _CLASSES = (MaskLoraLinear, ScaleLoraLinear)
    return _CLASSES


_CLASSES: tuple[type, type] | None = None


@dataclass
class PerpOptions:
    """PERP's knobs (``recover(method="perp", **options)``); defaults are the paper's."""

    lora: str = "mask"  # "mask" (MaskLoRA) or "scale" (ScaleLoRA)
    r: int = 16  # 0: no LoRA at all, only norms and biases (the paper's cheapest setting)
    alpha: float = 32.0
    lm_head: bool = True  # plain LoRA on an untied lm_head
    train_norms: bool = True
    train_biases: bool = True

    def __post_init__(self) -> None:
        if self.lora not in VARIANTS:
            raise ConfigError(
                f"unknown PERP lora {self.lora!r}{did_you_mean(self.lora, VARIANTS)}: use mask or scale."
            )
        if self.r < 0:
            raise ConfigError(
                f"LoRA rank r must be >= 1 (or 0 for no LoRA: norms and biases only), got {self.r}."
            )


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), nn.Parameter)


def _tied_output_embeddings(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


class PerpSession:
    """Attach → train (``parameters(scope)``) → ``finish()`` merges with sparsity preserved exactly."""

    def __init__(self, model: nn.Module, targets: dict[str, tuple[nn.Module, Tensor]], options: PerpOptions):
        self.model, self.targets, self.options = model, targets, options
        self._grad_flags = GradFlags(model)
        self._backup: list[tuple[nn.Parameter, Tensor]] = []

    def attach(self) -> None:
        peft, _ = _peft()
        mask_cls, scale_cls = _layer_classes()
        names = list(self.targets) if self.options.r > 0 else []
        head = self.model.get_output_embeddings() if self.options.lm_head else None  # None: one block
        if head is not None and self.options.r > 0:
            if _tied_output_embeddings(self.model):
                log.info(
                    "lm_head is tied to the input embeddings: PERP leaves it out (a merge would change both)"
                )
            else:
                names.append(next(n for n, m in self.model.named_modules() if m is head))
        for p in self.model.parameters():
            p.requires_grad_(False)
        if names:
            config = peft.LoraConfig(
                r=self.options.r, lora_alpha=self.options.alpha, lora_dropout=0.0, target_modules=names
            )
            cls = mask_cls if self.options.lora == "mask" else scale_cls
            config._register_custom_module({nn.Linear: cls, **_conv1d_mapping(cls)})
            peft.inject_adapter_in_model(config, self.model, adapter_name=ADAPTER)
        for name, module in self.model.named_modules():
            if isinstance(module, mask_cls):
                if name in self.targets:
                    base, keep = self.targets[name]
                    module.set_keep(masking.to_weight_layout(base, keep))
                else:
                    module.as_plain_lora()
        for module in self.model.modules():
            if _is_norm(module) and self.options.train_norms:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
            bias = getattr(module, "bias", None)
            if self.options.train_biases and isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
        base = {id(p) for p in self._grad_flags.params}  # norms and biases are trained in place: keep a copy
        self._backup = [(p, p.detach().clone()) for p in self.parameters() if id(p) in base]

    def parameters(self, scope: nn.Module | None = None) -> list[nn.Parameter]:
        """Trainable parameters, all of them or only those inside ``scope`` (one block)."""
        root = self.model if scope is None else scope
        return [p for p in root.parameters() if p.requires_grad]

    def optimizer(self, params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
        return make_adamw(params, settings)

    def after_step(self, step: int) -> None:
        """Nothing to refresh; the adapters hold all the state."""

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def finish(self, merge: bool = True) -> None:
        """Merge every adapter into its base weight (``merge=False``: drop them, e.g. after a failure),
        put the plain Linear back and restore ``requires_grad``."""
        mask_cls, _ = _layer_classes()
        for name, module in list(self.model.named_modules()):
            if isinstance(module, mask_cls):
                if merge:
                    module.merge(adapter_names=[ADAPTER])
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, module.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        if not merge:
            for p, saved in self._backup:
                p.copy_(saved)
        self._grad_flags.restore()


def _conv1d_mapping(cls: type) -> dict[type, type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return {}
    return {Conv1D: cls}
