"""``transformers.TrainerCallback``s: keep a mask through ``Trainer`` (and TRL's ``SFTTrainer``, built on
it), or reach one gradually while training.

>>> cb = llmprune.KeepSparsityCallback()                                     # doctest: +SKIP
>>> Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()          # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from llmprune.errors import ConfigError
from llmprune.finetune.gradual import GradualPruner, check_solver
from llmprune.finetune.keep import SparsityHandle, keep_sparsity
from llmprune.finetune.schedule import CubicSchedule
from llmprune.finetune.sources import MaskSource
from llmprune.spec import SparsitySpec

log = logging.getLogger(__name__)


class KeepSparsityCallback(TrainerCallback):
    """:func:`llmprune.keep_sparsity` for the length of ``trainer.train()``.

    Set up on train begin (masks as in ``keep_sparsity``: None = the model's zeros then), checked and
    removed on train end, where :attr:`report` says how many pruned weights got a nonzero gradient (each
    would have left zero without the callback), how many the optimiser moved and were put back, and how
    many are nonzero now: 0.
    """

    def __init__(self, masks: MaskSource = None, *, apply: bool = False) -> None:
        self.masks = masks
        self.apply = apply
        self.handle: SparsityHandle | None = None
        self.report: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.handle is not None and self.handle.active:  # a second train() on the same trainer
            self.handle.remove()
        self.handle = keep_sparsity(model, self.masks, apply=self.apply)

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is None or not self.handle.active:
            return
        stats = self.handle.stats()
        if stats.violations:  # something wrote the weights outside an optimiser step
            log.warning("%d pruned weights were nonzero at train end: zeroed again", stats.violations)
            self.handle.enforce()
        self.report = {
            "pruned_weights": self.handle.num_pruned,
            "nonzero_pruned_weights": sum(self.handle.violations().values()),
            "gradient_entries_blocked": stats.gradient_entries_blocked,
            "rezeroed_after_steps": stats.rezeroed,
            "optimizer_steps": stats.optimizer_steps,
        }
        log.info(
            "KeepSparsityCallback: %d pruned weights still exactly 0 after %d steps; without it %d would "
            "have received updates",
            self.report["pruned_weights"], stats.optimizer_steps, stats.gradient_entries_blocked,
        )  # fmt: skip
        self.handle.remove()


class GradualPruningCallback(TrainerCallback):
    """Raise sparsity to ``sparsity`` on Zhu & Gupta's cubic ramp while ``Trainer`` trains.

    Pruning happens after optimiser steps ``start_step, start_step + every, …, end_step`` with the
    registered solver ``method`` (``"magnitude"`` or ``"wanda"``; Wanda's activation norms come from the
    training batches since the previous pruning step). The reached mask is held fixed in between and
    afterwards (as :class:`KeepSparsityCallback` does). Defaults: ``end_step`` = two thirds of
    ``max_steps`` (the last third fine-tunes at the final mask), ``every`` = a tenth of the ramp.

    >>> cb = llmprune.GradualPruningCallback(sparsity=0.5, method="wanda")          # doctest: +SKIP
    >>> Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()              # doctest: +SKIP
    >>> cb.pruner.sparsity                                                         # doctest: +SKIP
    0.5
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        start_step: int = 0,
        end_step: int | None = None,
        method: str = "magnitude",
        every: int | None = None,
        initial_sparsity: float = 0.0,
        **options: Any,
    ) -> None:
        spec = SparsitySpec.parse(sparsity)
        if spec.pattern is not None:
            raise ConfigError("gradual pruning ramps an unstructured fraction: give sparsity=0.5, not 'N:M'.")
        check_solver(method, options)
        if end_step is not None:  # validate what is known now; the rest once max_steps is known
            CubicSchedule(spec.sparsity, start_step, end_step, every or 1, initial_sparsity)
        self.sparsity, self.start_step, self.end_step = spec.sparsity, start_step, end_step
        self.method, self.every, self.initial, self.options = method, every, initial_sparsity, options
        self.pruner: GradualPruner | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        end = self.end_step if self.end_step is not None else max(self.start_step, 2 * state.max_steps // 3)
        every = self.every or max(1, (end - self.start_step) // 10)
        schedule = CubicSchedule(self.sparsity, self.start_step, end, every, self.initial)
        if self.pruner is not None:
            self.pruner.remove()
        self.pruner = GradualPruner(schedule, self.method, **self.options).attach(model)

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner is None:
            return
        if self.pruner.sparsity < self.sparsity:
            log.warning(
                "training ended at step %d before gradual pruning reached %.3f (now %.3f): lower end_step",
                state.global_step, self.sparsity, self.pruner.sparsity,
            )  # fmt: skip
        self.pruner.handle.enforce()
        self.pruner.remove()
