"""PERP's reconstruct mode: per decoder block, train its recovery parameters to match the DENSE block.

Block by block, as the pruning engines run: the inputs of block i are the outputs of the already
recovered blocks before it (propagated through the pruned model), and the targets are what the dense
block i produces on those same inputs. Loss: MSE between the two outputs.

Design (memory ~ one block): ``dense_model`` is a dense copy with the same block structure. Only one of
its blocks is used at a time, moved to the compute device and back, so the copy can stay on the CPU (or
be offloaded) while the pruned model trains on the accelerator. Pruning engines that still hold the
dense block can skip the copy and call :func:`reconstruct_block` with outputs captured before pruning.
Activations for all windows are held for the current block (inputs and targets), as in the references.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmprune.errors import ConfigError
from llmprune.recovery import masking
from llmprune.recovery.train import LoopResult, TrainSettings, run

log = logging.getLogger(__name__)

BlockCall = tuple[Tensor, dict[str, Any]]  # (hidden_states (B, L, H), the other kwargs the block needs)


class _Stop(Exception):
    """Raised by the capture hook: nothing after block 0 needs to run."""


def _hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[Tensor]) -> list[BlockCall]:
    """Inputs and ALL keyword arguments of ``block`` per batch (forward pre-hook; the run stops there)."""
    calls: list[BlockCall] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        calls.append((hidden.detach(), kwargs))
        raise _Stop

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return calls


@torch.no_grad()
def block_outputs(block: nn.Module, calls: list[BlockCall]) -> list[Tensor]:
    return [_hidden(block(x, **kw)).detach() for x, kw in calls]


def reconstruct_block(
    block: nn.Module,
    calls: list[BlockCall],
    targets: list[Tensor],
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    *,
    seed: int,
    max_seconds: float | None = None,
    on_step: Callable[[int], None] | None = None,
    desc: str = "reconstructing",
) -> LoopResult:
    """Minimise ``MSE(block(x), target)`` over the parameters the optimiser holds."""
    gen = torch.Generator().manual_seed(seed)

    def order():
        while True:
            yield from torch.randperm(len(calls), generator=gen).tolist()

    def loss_fn(i: int) -> Tensor:
        x, kw = calls[i]
        return F.mse_loss(_hidden(block(x, **kw)).float(), targets[i].float())

    return run(loss_fn, order(), optimizer, settings, max_seconds=max_seconds, on_step=on_step, desc=desc)


def _mse(outputs: list[Tensor], targets: list[Tensor]) -> float:
    """Mean squared error over every element of every batch."""
    total = sum(
        float(F.mse_loss(y.float(), t.float(), reduction="sum"))
        for y, t in zip(outputs, targets, strict=True)
    )
    return total / sum(t.numel() for t in targets)


def _move(module: nn.Module, device: torch.device) -> torch.device:
    src = next(module.parameters()).device
    if src != device:
        module.to(device)
    return src


def reconstruct(
    model: nn.Module,
    dense_model: nn.Module,
    session,
    input_ids: Tensor,
    settings: TrainSettings,
    *,
    on_step: Callable[[int], None] | None = None,
) -> tuple[LoopResult, list[dict]]:
    """Run the reconstruct mode over every block; returns the merged loop record and per-block losses."""
    blocks, dense_blocks = masking.decoder_blocks(model), masking.decoder_blocks(dense_model)
    if [n for n, _ in blocks] != [n for n, _ in dense_blocks]:
        raise ConfigError(
            "dense_model does not have the blocks of the pruned model: pass a dense copy of the same model."
        )
    device = next(model.parameters()).device
    batches = list(input_ids.split(settings.batch_size))
    calls = capture_block_inputs(model, blocks[0][1], batches)
    total = LoopResult()
    per_block: list[dict] = []
    start = time.perf_counter()
    for i, ((name, block), (_, dense)) in enumerate(zip(blocks, dense_blocks, strict=True)):
        home = _move(dense, device)
        targets = block_outputs(dense, calls)
        _move(dense, home)
        params = session.parameters(block)
        record = {"block": name, "trainable": sum(p.numel() for p in params)}
        record["initial_error"] = _mse(block_outputs(block, calls), targets)
        if params:
            budget = None
            if settings.max_seconds is not None:
                budget = max(1e-3, (settings.max_seconds - (time.perf_counter() - start)) / (len(blocks) - i))
            with torch.enable_grad():
                res = reconstruct_block(
                    block,
                    calls,
                    targets,
                    session.optimizer(params, settings),
                    settings,
                    seed=settings.seed + i,
                    max_seconds=budget,
                    on_step=on_step or session.after_step,
                    desc=f"({i + 1}/{len(blocks)}) reconstructing",
                )
            total.losses += res.losses
            total.steps_done += res.steps_done
            record.update(first_loss=res.losses[0], last_loss=res.losses[-1], steps=res.steps_done)
        per_block.append(record)
        outputs = block_outputs(block, calls)  # propagate through the recovered block
        record["final_error"] = _mse(outputs, targets)
        calls = [(y, kw) for y, (_, kw) in zip(outputs, calls, strict=True)]
    total.seconds = time.perf_counter() - start
    return total, per_block
