"""Block-wise reconstruction after pruning (``recover(mode="reconstruct")``), from a dense copy.

Block by block, as the pruning engines run: the inputs of block i are the outputs of the already
recovered blocks before it (propagated through the pruned model), and the targets are what the dense
block i produces on those same inputs, at its attention and MLP outputs (``blockwise.py`` holds the loss
and the training; the pruning engine runs the same code fused into ``prune(..., recover=...)``, where the
dense targets come for free from its calibration forward).

Design (memory ~ one block): ``dense_model`` is a dense copy with the same block structure. Only one of
its blocks is used at a time, moved to the compute device and back, so the copy can stay on the CPU (or
be offloaded) while the pruned model trains on the accelerator. Activations for all windows are held for
the current block (inputs and targets), as in the references.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmprune.calibration.modules import first_output
from llmprune.calibration.rows import cut_call
from llmprune.errors import ConfigError
from llmprune.recovery import masking
from llmprune.recovery.blockwise import BlockReconstructor, SubBlockTaps
from llmprune.recovery.train import LoopResult

log = logging.getLogger(__name__)

BlockCall = tuple[Tensor, dict[str, Any]]  # (hidden_states (B, L, H), the other kwargs the block needs)


class _Stop(Exception):
    """Raised by the capture hook: nothing after block 0 needs to run."""


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
    return [first_output(block(x, **kw)).detach() for x, kw in calls]


def _call(block: nn.Module, calls: list[BlockCall], b: int, rows: slice = slice(None)) -> Any:
    hidden, kwargs = cut_call(rows, *calls[b])
    return block(hidden, **kwargs)


def _relative(outputs: list[Tensor], targets: list[Tensor]) -> float:
    """``‖Y − T‖² / ‖T‖²`` over every element of every batch (the engine's block error)."""
    pairs = zip(outputs, targets, strict=True)
    num = sum(float(F.mse_loss(y.float(), t.float(), reduction="sum")) for y, t in pairs)
    return num / max(sum(float(t.float().pow(2).sum()) for t in targets), 1e-30)


def _move(module: nn.Module, device: torch.device) -> torch.device:
    src = next(module.parameters()).device
    if src != device:
        module.to(device)
    return src


def reconstruct(
    model: nn.Module,
    dense_model: nn.Module,
    reconstructor: BlockReconstructor,
    input_ids: Tensor,
    batch_size: int,
    keep_masks: dict[str, Tensor] | None,
) -> tuple[LoopResult, list[dict]]:
    """Reconstruct every block towards ``dense_model``'s; returns the merged loop record and per-block
    records (``initial_error``/``final_error``: relative squared error of the block output over all
    windows, before and after training the block)."""
    blocks, dense_blocks = masking.decoder_blocks(model), masking.decoder_blocks(dense_model)
    if [n for n, _ in blocks] != [n for n, _ in dense_blocks]:
        raise ConfigError(
            "dense_model does not have the blocks of the pruned model: pass a dense copy of the same model."
        )
    device = next(model.parameters()).device
    calls = capture_block_inputs(model, blocks[0][1], list(input_ids.split(batch_size)))
    total = LoopResult()
    start = time.perf_counter()
    for i, ((name, block), (_, dense)) in enumerate(zip(blocks, dense_blocks, strict=True)):
        taps = reconstructor.tap(block)
        dense_taps = SubBlockTaps(dense, taps.paths)
        home = _move(dense, device)
        with dense_taps.record():
            targets = block_outputs(dense, calls)
        _move(dense, home)
        taps.targets = dense_taps.targets
        initial = _relative(block_outputs(block, calls), targets)
        record = reconstructor.recover(
            i, name, block, functools.partial(_call, block, calls), len(calls), taps, keep_masks
        )
        taps.remove()
        outputs = block_outputs(block, calls)  # propagate through the recovered block
        record.update(initial_error=initial, final_error=_relative(outputs, targets))
        total.steps_done += record["steps"]
        total.losses += record["losses"]
        calls = [(y, kw) for y, (_, kw) in zip(outputs, calls, strict=True)]
    total.seconds = time.perf_counter() - start
    return total, reconstructor.blocks
