"""Gradual pruning while training: the cubic ramp, any registered solver, statistics from training batches.

At each pruning step every decoder-block Linear becomes a ``LayerProblem`` (its current weight, the input
statistics gathered from the training batches since the previous pruning step, the scheduled sparsity)
and goes through the solver registry like a one-shot prune: ``magnitude`` needs no statistics, ``wanda``
its per-channel ``sq_norms`` (forward pre-hooks on the Linears feed ``calibration.stats``'
accumulators while the model is in training mode). The new mask is ANDed with the previous one, so a
pruned weight is never revived, and :class:`~llmprune.finetune.keep.SparsityHandle` holds it between
pruning steps and afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from llmprune.calibration.modules import WeightView
from llmprune.calibration.stats import StatsAccumulator
from llmprune.errors import ConfigError
from llmprune.finetune.keep import SparsityHandle
from llmprune.finetune.schedule import CubicSchedule
from llmprune.finetune.sources import base_model, block_linears
from llmprune.registry import get_solver
from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerProblem, LayerStats
from llmprune.spec import SparsitySpec

log = logging.getLogger(__name__)


def check_solver(method: str, options: dict[str, Any]):
    """The registered solver for ``method`` with ``options`` validated (did-you-mean on typos)."""
    solver = get_solver(method)
    solver.check_options(options)
    unknown = solver.needs - {SQ_NORMS, HESSIAN}
    if unknown:
        raise ConfigError(f"method {method!r} needs statistics {sorted(unknown)} training cannot gather.")
    if solver.allocate is not None and options.get("scope", "layer") != "layer":
        raise ConfigError(f"gradual pruning prunes each Linear on its own: drop {method}'s scope option.")
    return solver


class GradualPruner:
    """Prune ``model`` along ``schedule`` with ``method``; call :meth:`step` after each optimiser step.

    >>> pruner = GradualPruner(CubicSchedule(0.5, 0, 300, every=30), "wanda").attach(model)  # doctest: +SKIP
    >>> for step, batch in enumerate(loader, 1):                                            # doctest: +SKIP
    ...     model(**batch).loss.backward(); opt.step(); opt.zero_grad(); pruner.step(step)
    >>> pruner.remove()                                                                     # doctest: +SKIP
    """

    def __init__(self, schedule: CubicSchedule, method: str = "magnitude", **options: Any) -> None:
        self.schedule = schedule
        self.method = method
        self.options = options
        self.solver = check_solver(method, options)
        self.sparsity = 0.0  # the target reached so far
        self.history: list[tuple[int, float]] = []  # (step, target) of every pruning step
        self.handle: SparsityHandle | None = None
        self._modules: dict[str, nn.Module] = {}
        self._keep: dict[str, torch.Tensor] = {}
        self._accs: dict[str, StatsAccumulator] = {}
        self._hooks: list = []

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> GradualPruner:
        self._modules = block_linears(base_model(model))
        if not self._modules:
            raise ConfigError("the model has no Linear in its decoder blocks: nothing to prune.")
        self.handle = SparsityHandle(optimizer)
        if self.solver.needs:
            for name, module in self._modules.items():
                self._hooks.append(module.register_forward_pre_hook(self._collector(name)))
            self._reset_stats()
        return self

    def _collector(self, name: str):
        def collect(module: nn.Module, args: tuple) -> None:
            if module.training and args:  # training batches only, never evaluation
                self._accs[name].add(args[0].detach())

        return collect

    def _reset_stats(self) -> None:
        self._accs = {
            name: StatsAccumulator(WeightView(m).shape[1], self.solver.needs, m.weight.device)
            for name, m in self._modules.items()
        }

    def step(self, step: int) -> float | None:
        """After optimiser step ``step``: prune if the schedule says so; return the new target, else None."""
        if not self.schedule.is_pruning_step(step):
            return None
        target = self.schedule.sparsity_at(step)
        if target > self.sparsity:
            self.prune_to(target)
            self.history.append((step, target))
            log.info("gradual pruning: step %d, sparsity %.4f", step, target)
        return target

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Prune every Linear to ``sparsity`` with the solver (fp32 copy of one weight at a time)."""
        spec = SparsitySpec(sparsity=sparsity)
        for name, module in self._modules.items():
            view = WeightView(module)
            acc = self._accs.get(name)
            if acc is not None and acc.num_tokens == 0:
                raise ConfigError(
                    f"no training batch reached {name} since the last pruning step: set every= to at least "
                    "one step with a forward pass in training mode."
                )
            stats = acc.result() if acc is not None else LayerStats()
            result = self.solver(LayerProblem(name, view.read(), stats, spec), **self.options)
            keep = result.keep.to(module.weight.device)
            if name in self._keep:
                keep &= self._keep[name]  # never revive: the mask only grows
            view.write(keep, result.weight)
            self._keep[name] = keep
        self.handle.set_masks({n: (self._modules[n], k) for n, k in self._keep.items()})
        self.sparsity = sparsity
        if self.solver.needs:
            self._reset_stats()

    @property
    def keep_masks(self) -> dict[str, torch.Tensor]:
        """The reached masks, ``(out, in)`` bool (save them with ``save_keep_masks`` or hand them on)."""
        return {n: k.cpu() for n, k in self._keep.items()}

    def remove(self) -> None:
        """Stop collecting and stop holding the mask (its zeros stay in the weights)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._accs.clear()
        if self.handle is not None:
            self.handle.remove()
