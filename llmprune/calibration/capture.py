"""Capturing what the model feeds its first decoder block: hidden states and ALL call arguments.

A forward pre-hook with ``with_kwargs=True`` records the block's positional and keyword arguments
(attention mask, position ids, rotary ``position_embeddings``, cache position, …) and stops the
forward, so the engine can replay blocks one at a time exactly as the model calls them.

Hidden states are the bulk of the calibration memory (samples x length x width per block boundary).
When they exceed a budget (``max_memory``, read by :func:`parse_bytes`; :func:`spills` decides) they
live in a :class:`DiskList`: one ``torch.save`` file per batch, read back memory-mapped, so only the
batch being computed is resident.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import first_output
from llmprune.errors import ConfigError
from llmprune.io.atomic import remove_stale_temporaries, temp_path

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once it has what it needs; the rest of the forward is skipped."""


class DiskList:
    """A list of tensors kept on disk, one file per entry, loaded memory-mapped on access.

    Why files and not one big memmap: entries are replaced one batch at a time while later batches are
    still being read, and a checkpoint can hard-link a finished entry's file instead of copying it.
    Each replacement writes a new file and unlinks the old one, so a hard link elsewhere stays valid.
    """

    def __init__(self, folder: str | Path | None = None, *, owned: bool | None = None) -> None:
        self._owned = folder is None if owned is None else owned  # an owned folder goes on close()
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


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_bytes(value: int | float | str) -> int:
    """``4GB``, ``512MiB``, ``2e9`` or an int → bytes (``0``: every activation goes to disk)."""
    size = value
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m and m.group(2).lower() in _UNITS:
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 <= size < float("inf"):
        raise ConfigError(
            f"cannot read memory size {value!r}: write e.g. 4GB, 512MiB, 2GiB or a number of bytes."
        )
    return int(size)


def check_spill_settings(
    max_memory: int | str | None, offload_dir: str | os.PathLike | None, keys: str = ""
) -> None:
    """``max_memory`` readable, and ``offload_dir`` only with it, for ``prune()`` and recipes alike
    (``keys``: how the message names the settings, e.g. ``"calibration."`` for a recipe)."""
    if max_memory is not None:
        parse_bytes(max_memory)
    elif offload_dir is not None:
        raise ConfigError(
            "offload_dir is where calibration activations go once they exceed max_memory, and max_memory "
            f"is not set. Fix: set {keys}max_memory too (e.g. 8GB; 0 keeps them all on disk), or drop "
            f"{keys}offload_dir."
        )


def spills(max_memory: int | str | None, model: nn.Module, input_ids: Tensor, share: range) -> bool:
    """Whether this rank's activations (block inputs and dense outputs) exceed ``max_memory``."""
    if max_memory is None:
        return False
    samples = len(share)
    width = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    need = 2 * samples * input_ids.shape[1] * width * model.get_input_embeddings().weight.element_size()
    spill = need > parse_bytes(max_memory)
    if spill:
        log.info("calibration activations (%.2f GB) exceed max_memory: keeping them on disk", need / 1e9)
    return spill


def activation_list(spill: bool, folder: str | os.PathLike | None = None) -> list | DiskList:
    """An in-memory list, or a :class:`DiskList` in a fresh folder under ``folder`` (default: the
    system's temporary folder), named as llmprune's temporaries are: one a killed run leaves behind is
    removed by the next run that spills there."""
    if not spill:
        return []
    parent = Path(tempfile.gettempdir() if folder is None else folder)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent)
    return DiskList(temp_path(parent / "acts"), owned=True)


@dataclass
class BlockInputs:
    """Per calibration batch: hidden states (B, L, d), extra positional args, keyword args.

    ``starts[k]`` is the global index of the first sample in ``hidden[k]``: a process may hold a
    contiguous share of the samples only, and the statistics are summed per sample by that index.
    """

    hidden: list[Tensor] | DiskList = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)


def batch_ranges(share: range, batch_size: int) -> list[range]:
    """The batches of samples ``share``: one process's batches (multiples of ``batch_size``), cut at the
    share's ends, so a share that starts on a batch boundary batches exactly as one process does."""
    inner = range(-(-share.start // batch_size) * batch_size, share.stop, batch_size)
    edges = sorted({share.start, *inner, share.stop})
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def call_block(block: nn.Module, hidden: Tensor, args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """Run one block as the model does; blocks return a Tensor (transformers 5) or a tuple (older)."""
    return first_output(block(hidden, *args, **kwargs))


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
    samples: range | None = None,
    hidden: list | DiskList | None = None,
    device: torch.device | None = None,
) -> BlockInputs:
    """Run the model on ``input_ids`` (N, L) batch by batch, stopping at the first block's input.

    ``samples`` picks a contiguous range of samples (default: all; see :func:`batch_ranges`); ``hidden``
    is where the hidden states go (default: a list). ``device`` defaults to the first block's; the block
    itself never runs, so it may still be on the meta device.
    """
    samples = range(input_ids.shape[0]) if samples is None else samples
    batches = batch_ranges(samples, batch_size)
    captured = BlockInputs(hidden=[] if hidden is None else hidden, starts=[b.start for b in batches])
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
            batch = input_ids[b.start : b.stop].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return captured
