"""Capturing what the model feeds its first decoder block: hidden states and ALL call arguments.

A forward pre-hook with ``with_kwargs=True`` records the block's positional and keyword arguments
(attention mask, position ids, rotary ``position_embeddings``, cache position, …) and stops the
forward, so the engine can replay blocks one at a time exactly as the model calls them.

Hidden states are the bulk of the calibration memory (samples x length x width per block boundary).
When they exceed a budget they live in a :class:`DiskList`: one ``torch.save`` file per batch, read
back memory-mapped, so only the batch being computed is resident.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    """Raised by a hook once it has what it needs; the rest of the forward is skipped."""


class DiskList:
    """A list of tensors kept on disk, one file per entry, loaded memory-mapped on access.

    Why files and not one big memmap: entries are replaced one batch at a time while later batches are
    still being read, and a checkpoint can hard-link a finished entry's file instead of copying it.
    Each replacement writes a new file and unlinks the old one, so a hard link elsewhere stays valid.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self._owned = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="llmprune-acts-") if folder is None else folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._paths: list[Path] = []
        self.device: torch.device | None = None  # where entries are handed back: where they came from

    def _write(self, index: int, tensor: Tensor) -> Path:
        self.device = self.device or tensor.device
        path = self.folder / f"{index:06d}-{uuid.uuid4().hex[:8]}.pt"
        torch.save(tensor.detach().cpu().contiguous(), path)
        return path

    def append(self, tensor: Tensor) -> None:
        self._paths.append(self._write(len(self._paths), tensor))

    def __setitem__(self, index: int, tensor: Tensor) -> None:
        old, self._paths[index] = self._paths[index], self._write(index, tensor)
        old.unlink(missing_ok=True)

    def __getitem__(self, index: int) -> Tensor:
        t = torch.load(self._paths[index], mmap=True, weights_only=True)
        return t if self.device is None or self.device.type == "cpu" else t.to(self.device)

    def __len__(self) -> int:
        return len(self._paths)

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    def path(self, index: int) -> Path:
        return self._paths[index]

    def close(self) -> None:
        """Delete the files (and the folder if this list created it)."""
        for p in self._paths:
            p.unlink(missing_ok=True)
        self._paths = []
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)


def activation_list(spill: bool, folder: str | os.PathLike | None = None) -> list | DiskList:
    """An in-memory list, or a :class:`DiskList` under ``folder`` (a temporary folder if None)."""
    if not spill:
        return []
    return DiskList(None if folder is None else Path(folder) / f"acts-{uuid.uuid4().hex[:8]}")


@dataclass
class BlockInputs:
    """Per calibration batch: hidden states (B, L, d), extra positional args, keyword args.

    ``first_batch`` is the global index of ``hidden[0]``: a process may hold a contiguous share only.
    """

    hidden: list[Tensor] | DiskList = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    first_batch: int = 0

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
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    input_ids: Tensor,
    batch_size: int,
    *,
    batches: range | None = None,
    hidden: list | DiskList | None = None,
    device: torch.device | None = None,
) -> BlockInputs:
    """Run the model on ``input_ids`` (N, L) batch by batch, stopping at the first block's input.

    ``batches`` picks a contiguous range of batch indices (default: all); ``hidden`` is where the hidden
    states go (default: a list). ``device`` defaults to the first block's; the block itself never runs,
    so it may still be on the meta device.
    """
    num_batches = -(-input_ids.shape[0] // batch_size)
    batches = range(num_batches) if batches is None else batches
    captured = BlockInputs(hidden=[] if hidden is None else hidden, first_batch=batches.start)
    device = device or next(first_block.parameters()).device

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
        for b in batches:
            batch = input_ids[b * batch_size : (b + 1) * batch_size].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return captured
