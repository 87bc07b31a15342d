"""Full-parameter recovery (``method="full"``): every remaining weight trained, usually by distillation.

Why a third method: PERP and LIFT exist to keep a *mask* (they train a sliver of the weights so the zeros
survive a merge). A model shrunk by ``--structure`` has no mask: it is a smaller dense model, and the
best use of a short budget is to train all of it towards the original model's next-token distribution
(the teacher may have another shape: only its logits are used, ``recover(dense_model=…)``).

On a masked model ``full`` keeps the mask rather than refusing: the kept weights all train, and
``finetune.keep.SparsityHandle`` zeroes the gradient at pruned entries and writes ``+0.0`` back after each
optimiser step (AdamW's moments would otherwise move them), so the sparsity is exactly what it was.

Memory, fp32 on SmolLM2-135M (134.5 M parameters): weights 513 MiB, gradients 513 MiB, AdamW's two
moments 1.0 GiB, a CPU copy of the weights 513 MiB (put back if the run fails, as LIFT does), plus the
activations and logits of one batch. ``optimizer="adafactor"`` (``torch.optim.Adafactor``: factored second
moment, no first moment) cuts the optimiser state to a few MiB; ``train_embeddings=False`` freezes the
token embeddings and output head (28 M of SmolLM2's parameters, tied).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmprune.errors import ConfigError, did_you_mean
from llmprune.finetune.keep import SparsityHandle
from llmprune.recovery.train import GradFlags, TrainSettings, make_adamw

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adafactor")
#: AdamW's rate, chosen on the validation part (Emma) at a fixed 60 steps of 4 x 256 tokens of the default
#: recovery text (what ten minutes buy on one core): SmolLM2 at 30 % with 9 blocks dropped / the auto
#: split, validation perplexity 90.2/96.2 at 1e-4, 86.4/92.1 at 3e-4, 97.7/108.1 at 1e-3
#: (docs/benchmarks.md, "Structured pruning"; ``scripts/bench_structured.py --phase lr --lr_steps 60``)
FULL_LR = 3e-4


@dataclass
class FullOptions:
    """``optimizer``: ``adamw`` (``recover(optim=…)`` picks torch's or the 8-bit one) or ``adafactor``
    (``torch.optim.Adafactor``: optimiser state ≈ 0 instead of 2 × the parameters).
    ``train_embeddings``: also train the input embeddings and the output head (tied or not)."""

    optimizer: str = "adamw"
    train_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            hint = did_you_mean(str(self.optimizer), OPTIMIZERS)
            raise ConfigError(
                f"unknown full-recovery optimizer {self.optimizer!r}{hint}: use {' or '.join(OPTIMIZERS)}."
            )


def _embedding_params(model: nn.Module) -> set[int]:
    ids = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None:
            ids.update(id(p) for p in module.parameters())
    return ids


class FullSession:
    """Attach (everything trainable, mask hooks on pruned Linears) → train → ``finish()``."""

    def __init__(self, model: nn.Module, targets: dict[str, tuple[nn.Module, Tensor]], options: FullOptions):
        self.model, self.targets, self.options = model, targets, options
        self._grad_flags = GradFlags(model)
        self._backup: list[tuple[nn.Parameter, Tensor]] = []
        self._keep: SparsityHandle | None = None
        self._trained: list[nn.Parameter] = []

    def attach(self) -> None:
        frozen = set() if self.options.train_embeddings else _embedding_params(self.model)
        self._trained = [p for p in self.model.parameters() if id(p) not in frozen]  # tied weights once
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen)
        # trained in place: a CPU copy gives the weights back if the run fails or diverges
        self._backup = [(p, p.detach().to("cpu", copy=True)) for p in self._trained]

    def parameters(self, scope: nn.Module | None = None) -> list[nn.Parameter]:
        """The trained parameters (all of them, or those inside ``scope``)."""
        if scope is None:
            return list(self._trained)
        inside = {id(p) for p in scope.parameters()}
        return [p for p in self._trained if id(p) in inside]

    def optimizer(self, params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
        if self.options.optimizer == "adafactor":
            if settings.optim != "adamw":
                raise ConfigError(
                    f"optim={settings.optim!r} and optimizer='adafactor' both name the optimiser: drop one."
                )
            opt = torch.optim.Adafactor(params, lr=settings.lr, weight_decay=settings.weight_decay)
        else:
            opt = make_adamw(params, settings)
        if self.targets:  # a masked model: the pruned entries stay exactly +0.0
            if self._keep is not None:
                self._keep.remove()
            self._keep = SparsityHandle(optimizer=opt, track=False)
            self._keep.set_masks(self.targets)
        return opt

    def after_step(self, step: int) -> None:
        """Nothing to refresh: the optimiser holds all the state."""

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self._trained)

    @torch.no_grad()
    def finish(self, merge: bool = True) -> None:
        """Remove the mask hooks and restore ``requires_grad``; ``merge=False`` (a failed or diverged run)
        also puts the weights back as they were before training."""
        if self._keep is not None:
            self._keep.remove()
            self._keep = None
        if not merge:
            for p, saved in self._backup:
                p.copy_(saved.to(p.device))
        self._backup = []
        self._grad_flags.restore()
