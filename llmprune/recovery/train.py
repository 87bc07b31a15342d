"""The training loop PERP and LIFT share: batches, optimiser, schedule, accumulation, budgets, progress.

The schedule is linear warmup then linear decay to zero, as in both papers, but driven by *progress*:
``max(step / steps, elapsed / max_seconds)``. So when the time budget ends first, the learning rate
has still decayed to ~0 by then instead of stopping mid-schedule at full rate. With ``max_seconds``
unset, everything is step-based and deterministic for a seed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llmprune.errors import ConfigError, LlmpruneError, did_you_mean

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_8bit")


class TrainingDiverged(LlmpruneError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainSettings:
    """Budgets and optimiser settings (the names are the ``recover()`` keywords and CLI flags)."""

    steps: int = 100
    max_seconds: float | None = None
    lr: float = 1e-3
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optim: str = "adamw"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}.")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"max_seconds must be > 0 (or None for no time limit), got {self.max_seconds}.")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}.")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("batch_size and gradient_accumulation_steps must be >= 1.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optim {self.optim!r}{did_you_mean(self.optim, OPTIMIZERS)}: use {OPTIMIZERS}."
            )


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)  # mean loss of each optimiser step
    steps_done: int = 0
    seconds: float = 0.0


class GradFlags:
    """The model's ``requires_grad`` flags when a session attaches, put back when it finishes: a session
    freezes everything, then unfreezes what it trains, and must leave the caller's flags as they were."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = list(model.parameters())
        self._flags = [p.requires_grad for p in self.params]

    def restore(self) -> None:
        for p, flag in zip(self.params, self._flags, strict=True):
            p.requires_grad_(flag)


def make_adamw(params: Iterable[Tensor], settings: TrainSettings) -> torch.optim.Optimizer:
    """``torch.optim.AdamW``, or bitsandbytes' 8-bit AdamW (moments in 8 bits: 4x less optimiser memory)."""
    params = list(params)
    if settings.optim == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError(
                "optim='adamw_8bit' needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
                "(CUDA builds), or use optim='adamw'."
            ) from exc
        return bnb.optim.AdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def window_batches(input_ids: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless ``(batch_size, L)`` batches of token windows: seeded shuffles, epoch after epoch."""
    return (input_ids[rows] for rows in index_batches(input_ids, batch_size, seed))


def index_batches(input_ids: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """The window indices of :func:`window_batches`' batches (to fetch per-window targets alongside)."""
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ConfigError(f"input_ids must be (N, L) with N >= 1 and L >= 2, got {tuple(input_ids.shape)}.")
    gen = torch.Generator().manual_seed(seed)
    n = input_ids.shape[0]
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def lr_factor(step: int, steps: int, elapsed: float, max_seconds: float | None, warmup_ratio: float) -> float:
    """Linear warmup over the first ``warmup_ratio`` of progress, then linear decay to 0 at progress 1."""
    progress = step / steps
    progress_end = (step + 1) / steps
    if max_seconds is not None:
        progress = max(progress, elapsed / max_seconds)
        progress_end = max(progress_end, progress)
    if warmup_ratio > 0 and progress_end <= warmup_ratio:
        return progress_end / warmup_ratio
    return min(1.0, max(0.0, (1.0 - progress) / (1.0 - warmup_ratio)))


def _clip(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    if hasattr(optimizer, "clip_grad_norm_"):  # sparse optimisers clip only what they update
        optimizer.clip_grad_norm_(max_norm)
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if params:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def run(
    loss_fn: Callable[[Any], Tensor],
    batches: Iterator[Any],
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    *,
    max_seconds: float | None = None,
    on_step: Callable[[int], None] | None = None,
    desc: str = "recovering",
) -> LoopResult:
    """Minimise ``loss_fn(batch)`` for ``settings.steps`` steps or ``max_seconds``, whichever ends first.

    The time budget is kept, not overrun: training stops when another step (at the mean step time so far)
    would end past ``max_seconds``; at least one step is always made.

    ``max_seconds`` overrides ``settings.max_seconds`` (the reconstruct mode gives each block its share).
    ``on_step(step)`` runs after every optimiser step (LIFT refreshes its selection there).
    """
    max_seconds = settings.max_seconds if max_seconds is None else max_seconds
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    result = LoopResult()
    start = time.perf_counter()
    bar = tqdm(total=settings.steps, desc=desc, leave=False, dynamic_ncols=True)
    try:
        for step in range(settings.steps):
            factor = lr_factor(
                step, settings.steps, time.perf_counter() - start, max_seconds, settings.warmup_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            total = 0.0
            for _ in range(settings.gradient_accumulation_steps):
                loss = loss_fn(next(batches))
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"the recovery loss became {value} at step {step}: lower lr (now {settings.lr:g}) "
                        "or set max_grad_norm."
                    )
                (loss / settings.gradient_accumulation_steps).backward()
                total += value
            if settings.max_grad_norm is not None:
                _clip(optimizer, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(total / settings.gradient_accumulation_steps)
            result.steps_done = step + 1
            if on_step is not None:
                on_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", lr=f"{settings.lr * factor:.2e}")
            elapsed = time.perf_counter() - start
            if (
                max_seconds is not None and elapsed + elapsed / (step + 1) > max_seconds
            ):  # next step won't fit
                log.info("%s: time budget of %.0f s reached after %d steps", desc, max_seconds, step + 1)
                break
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    return result
