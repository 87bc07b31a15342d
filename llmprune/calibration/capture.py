"""Capturing what the model feeds its first decoder block: hidden states and ALL call arguments.

A forward pre-hook with ``with_kwargs=True`` records the block's positional and keyword arguments
(attention mask, position ids, rotary ``position_embeddings``, cache position, …) and stops the
forward, so the engine can replay blocks one at a time exactly as the model calls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    """Raised by a hook once it has what it needs; the rest of the forward is skipped."""


@dataclass
class BlockInputs:
    """Per calibration batch: hidden states (B, L, d), extra positional args, keyword args."""

    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)


def call_block(block: nn.Module, hidden: Tensor, args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """Run one block as the model does; blocks return a Tensor (transformers 5) or a tuple (older)."""
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def move_outside_blocks(model: nn.Module, blocks_prefix: str, device: torch.device) -> None:
    """Put embeddings, rotary tables, final norm… on ``device``; decoder blocks stay where they are."""
    for name, module in model.named_modules():
        if name == blocks_prefix or name.startswith(blocks_prefix + "."):
            continue
        for key, param in module.named_parameters(recurse=False):
            if param.device != device:
                module._parameters[key] = nn.Parameter(param.data.to(device), param.requires_grad)
        for key, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: Tensor, batch_size: int) -> BlockInputs:
    """Run the model on ``input_ids`` (N, L) batch by batch, stopping at the first block's input."""
    captured = BlockInputs()
    device = next(first_block.parameters()).device

    def hook(_module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.hidden.append(hidden.detach())
        captured.args.append(rest)
        captured.kwargs.append(dict(kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured
