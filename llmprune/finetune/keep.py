"""``keep_sparsity``: every pruned weight stays exactly ``+0.0`` through any training loop.

Two hooks per protected weight, because neither alone is enough:

1. **Gradient mask** (a tensor hook on the weight ``Parameter``): each backward's gradient is zero at
   pruned entries *before* it is accumulated into ``.grad``. So gradient accumulation sums zeros,
   clipping measures the norm of the trainable entries only (a pruned entry's gradient would otherwise
   shrink every kept update), optimiser state built from gradients stays zero there, and a hand-written
   update such as ``p -= lr * p.grad`` cannot move a pruned weight either.
2. **Post-step re-zeroing** (an optimiser step post-hook): after every ``optimizer.step()``, pruned
   entries of the weights *that optimiser owns* are written back to ``+0.0`` with ``masked_fill_`` (a
   product ``W * mask`` would leave ``-0.0``). This is what stops an optimiser with state: AdamW moves a
   weight by ``m / (sqrt(v) + eps)`` even when this step's gradient is zero, so a first moment left from
   training before the mask (or from a weight pruned later by gradual pruning) would resurrect it.
   Decoupled weight decay multiplies by ``1 - lr·wd`` and keeps 0 at 0; coupled decay adds ``wd·w = 0``.

With no ``optimizer`` given, the post-hook is registered for every ``torch.optim.Optimizer`` in the
process (``register_optimizer_step_post_hook``), which reaches optimisers that Trainer, accelerate or TRL
create and wrap; it only touches weights the stepping optimiser holds. A step skipped by a gradient
scaler (fp16 overflow) changes nothing, so nothing needs fixing. bf16 autocast needs nothing special:
gradients arrive in the parameter's dtype and are masked there.

Memory: one ``torch.bool`` (1 byte) per weight of a protected Linear, in the weight's own layout and
device; no float copy of anything. A 50 %-pruned SmolLM2-135M costs 101 MiB of masks. Compute: one
``masked_fill`` per protected weight per backward and per step, and two ``count_nonzero`` reductions each
while ``track=True`` (the counts in :attr:`SparsityHandle.stats`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from llmprune.calibration.modules import WeightView
from llmprune.errors import ConfigError
from llmprune.finetune.sources import MaskSource, describe, resolve

log = logging.getLogger(__name__)


@dataclass
class _Protected:
    """One protected weight: its module and the pruned entries (True = pruned) in the weight's layout."""

    module: nn.Module
    pruned: Tensor  # bool, same shape and device as module.weight
    grad_hook: object | None = None
    blocked: Tensor | None = None  # most pruned entries with a nonzero gradient in one backward
    rezeroed: int = 0  # pruned entries an optimiser step moved off zero (then put back), summed


@dataclass
class SparsityStats:
    """What the hooks did, so a run can show that the mask mattered and held."""

    optimizer_steps: int = 0  # steps of an optimiser that holds a protected weight
    gradient_entries_blocked: int = 0  # sum over Linears of the most pruned entries one backward reached
    rezeroed: int = 0  # pruned entries an optimiser step moved off zero (AdamW moments), put back
    violations: int = 0  # pruned entries nonzero right now (0 unless something wrote outside a step)
    details: dict[str, int] = field(default_factory=dict)


class SparsityHandle:
    """Returned by :func:`keep_sparsity`; ``remove()`` (or leaving a ``with`` block) ends the protection.

    >>> with llmprune.keep_sparsity(model, "pruned/masks.safetensors"):      # doctest: +SKIP
    ...     train(model)
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None = None, track: bool = True) -> None:
        self._weights: dict[str, _Protected] = {}
        self._track = track
        self._optimizer = optimizer
        self._steps = 0
        if optimizer is None:
            self._step_hook = register_optimizer_step_post_hook(self._after_step)
        else:
            self._step_hook = _innermost(optimizer).register_step_post_hook(self._after_step)
        self.active = True

    # ------------------------------------------------------------ masks
    def set_masks(self, targets: Mapping[str, tuple[nn.Module, Tensor]]) -> None:
        """Protect (or re-protect with a new mask) ``{name: (module, keep (out, in) bool)}``."""
        for name, (module, keep) in targets.items():
            weight = module.weight
            keep = keep.to(device=weight.device, dtype=torch.bool)
            pruned = ~(keep.t() if WeightView(module).transposed else keep)
            entry = self._weights.get(name)
            if entry is not None and entry.module is module:
                entry.pruned = pruned
                continue
            if entry is not None and entry.grad_hook is not None:
                entry.grad_hook.remove()
            entry = _Protected(module, pruned)
            if weight.requires_grad:  # a frozen weight gets no gradient; the step hook still covers it
                entry.grad_hook = weight.register_hook(self._grad_mask(entry))
            self._weights[name] = entry

    def _grad_mask(self, entry: _Protected):
        def mask(grad: Tensor) -> Tensor:
            if entry.pruned.device != grad.device:  # the model moved after keep_sparsity
                entry.pruned = entry.pruned.to(grad.device)
            out = grad.masked_fill(entry.pruned, 0.0)
            if self._track:
                blocked = torch.count_nonzero(grad) - torch.count_nonzero(out)  # stays on the device
                entry.blocked = blocked if entry.blocked is None else torch.maximum(entry.blocked, blocked)
            return out

        return mask

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        touched = False
        for entry in self._weights.values():
            weight = entry.module.weight
            if id(weight) not in owned:
                continue
            touched = True
            if entry.pruned.device != weight.device:
                entry.pruned = entry.pruned.to(weight.device)
            if self._track:
                before = int(torch.count_nonzero(weight))
                weight.masked_fill_(entry.pruned, 0.0)
                entry.rezeroed += before - int(torch.count_nonzero(weight))
            else:
                weight.masked_fill_(entry.pruned, 0.0)
        self._steps += touched

    # ------------------------------------------------------------ use
    @torch.no_grad()
    def enforce(self) -> None:
        """Write ``+0.0`` at every pruned entry now (after loading a checkpoint, or a manual update)."""
        for entry in self._weights.values():
            entry.module.weight.masked_fill_(entry.pruned.to(entry.module.weight.device), 0.0)

    @torch.no_grad()
    def violations(self) -> dict[str, int]:
        """``{name: count}`` of pruned entries that are not exactly ``+0.0`` (``-0.0`` counts too)."""
        out = {}
        for name, entry in self._weights.items():
            w = entry.module.weight.detach()
            bad = int(((w != 0) | torch.signbit(w)).logical_and_(entry.pruned.to(w.device)).sum())
            if bad:
                out[name] = bad
        return out

    @property
    def keep_masks(self) -> dict[str, Tensor]:
        """The masks in force, ``(out, in)`` bool, True = kept (the layout of ``masks.safetensors``)."""
        out = {}
        for name, entry in self._weights.items():
            keep = ~entry.pruned
            out[name] = keep.t() if WeightView(entry.module).transposed else keep
        return out

    @property
    def num_pruned(self) -> int:
        return sum(int(e.pruned.sum()) for e in self._weights.values())

    @property
    def num_weights(self) -> int:
        return sum(e.pruned.numel() for e in self._weights.values())

    @property
    def mask_bytes(self) -> int:
        """Memory the masks hold: one byte (torch.bool) per weight of a protected Linear."""
        return sum(e.pruned.numel() * e.pruned.element_size() for e in self._weights.values())

    def stats(self) -> SparsityStats:
        """What the hooks did so far (reads counters from the device: call it after training)."""
        blocked = {n: int(e.blocked) for n, e in self._weights.items() if e.blocked is not None}
        return SparsityStats(
            optimizer_steps=self._steps,
            gradient_entries_blocked=sum(blocked.values()),
            rezeroed=sum(e.rezeroed for e in self._weights.values()),
            violations=sum(self.violations().values()),
            details=blocked,
        )

    def remove(self) -> None:
        """Detach every hook: training is ordinary again (the zeros stay until something moves them)."""
        if not self.active:
            return
        self._step_hook.remove()
        for entry in self._weights.values():
            if entry.grad_hook is not None:
                entry.grad_hook.remove()
                entry.grad_hook = None
        self.active = False

    def __enter__(self) -> SparsityHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"SparsityHandle({state}, {len(self._weights)} Linears, {self.num_pruned} pruned weights, "
            f"masks {self.mask_bytes / 2**20:.1f} MiB bool)"
        )


def _innermost(optimizer):
    """The torch optimiser inside wrappers (accelerate's ``AcceleratedOptimizer``, Trainer's …)."""
    while not hasattr(optimizer, "_optimizer_step_post_hooks") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not hasattr(optimizer, "register_step_post_hook"):
        raise ConfigError(
            f"optimizer {type(optimizer).__name__} is not a torch.optim.Optimizer: pass optimizer=None to "
            "protect the weights after every optimiser step."
        )
    return optimizer


@torch.no_grad()
def _nonzero_pruned(targets: Mapping[str, tuple[nn.Module, Tensor]]) -> dict[str, int]:
    """``{name: count}`` of entries the keep masks prune that hold a nonzero value."""
    out = {}
    for name, (module, keep) in targets.items():
        w = module.weight.detach()
        w = w.t() if WeightView(module).transposed else w  # (out, in) view
        bad = int(w[~keep.to(w.device)].count_nonzero())
        if bad:
            out[name] = bad
    return out


def keep_sparsity(
    model: nn.Module,
    masks: MaskSource = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    apply: bool = False,
    track: bool = True,
) -> SparsityHandle:
    """Keep every pruned weight of ``model`` exactly ``+0.0`` through any training, until ``remove()``.

    ``masks`` is a ``masks.safetensors`` path (or the pruned folder), a ``PruneResult``, a dict
    ``{name: (out, in) bool}`` (True = kept) or None: the exact zeros of the decoder-block Linears now.
    ``optimizer`` restricts the post-step re-zeroing to that optimiser (default: any optimiser stepping a
    protected weight). ``apply=True`` first writes the masks' zeros (re-pruning a model whose zeros were
    lost); by default a pruned entry that is not zero is an error, since masks of another model would
    silently wreck this one. ``track`` counts what the hooks blocked (see :meth:`SparsityHandle.stats`).
    The mechanism is in this module's docstring.

    >>> handle = llmprune.keep_sparsity(model, "pruned/masks.safetensors")     # doctest: +SKIP
    >>> trainer.train()  # or any loop: accelerate, TRL, plain PyTorch          # doctest: +SKIP
    >>> handle.stats().violations, handle.remove()                              # doctest: +SKIP
    (0, None)
    """
    targets = resolve(model, masks)
    handle = SparsityHandle(optimizer, track)
    try:
        handle.set_masks(targets)
        if apply:
            handle.enforce()
        bad = _nonzero_pruned(targets)
        if bad:
            name, count = next(iter(bad.items()))
            raise ConfigError(
                f"{sum(bad.values())} weights the masks mark as pruned are not zero (e.g. {count} in {name}):"
                " pass the masks saved with this model, or apply=True to zero them (re-prune)."
            )
        handle.enforce()  # a -0.0 left by a `W * mask` prune becomes +0.0
    except BaseException:
        handle.remove()
        raise
    log.info(
        "keep_sparsity: %d pruned weights in %d Linears held at +0.0 (masks from %s, %.1f MiB bool)",
        handle.num_pruned, len(targets), describe(masks), handle.mask_bytes / 2**20,
    )  # fmt: skip
    return handle
