"""``prune()``'s keywords, checked once for both ways of running: in memory (``api.prune``) and streamed
from disk (``prune(streaming=True)``).

Everything here runs before a model is loaded, so a typo or an impossible combination costs nothing
and each message names the fix. The calibration tokens are read here too, by rank 0 only under
``torchrun`` (the other ranks receive them), for the same reason on both paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.allocation import check_allocation_target, split_options
from llmprune.calibration.capture import check_spill_settings
from llmprune.calibration.data import calibration_tokens
from llmprune.calibration.distributed import Comm
from llmprune.calibration.engine import EngineConfig
from llmprune.calibration.resume import resolve_checkpoint_dir
from llmprune.errors import ConfigError, DataError
from llmprune.preflight import check_dataset, check_token_ids, window_length
from llmprune.registry import get_solver
from llmprune.spec import ModuleSelection

log = logging.getLogger(__name__)


def is_model_path(model: Any) -> bool:
    """A Hub id, folder or file to load, as opposed to a model already in memory."""
    return isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")


def engine_config(
    model: Any,
    *,
    method: str,
    sparsity: float | str,
    targets: Iterable[str] | None,
    ignore: Iterable[str] | None,
    overrides: Mapping[str, float | str] | None,
    true_sequential: bool,
    batch_size: int,
    seed: int,
    progress: bool,
    dataset: Any,
    output_dir: str | os.PathLike | None,
    streaming: bool,
    max_memory: int | str | None,
    offload_dir: str | None,
    checkpoint_dir: str | os.PathLike | None,
    resume: bool,
    options: Mapping[str, Any],
    allocation: str = "uniform",
) -> EngineConfig:
    """Check ``prune()``'s keywords (the solver's ``options`` too) and turn them into the engine's settings.

    ``checkpoint_dir`` comes back resolved (beside ``output_dir`` when resuming without one). The
    compute device and the process group are left to the caller: they may depend on the loaded model.
    """
    solver = get_solver(method)  # validates the name: "did you mean wanda?"
    options, allocation_options = split_options(allocation, options)  # --option carries both
    solver.check_options(options)
    selection = ModuleSelection.build(sparsity, targets, ignore, overrides)
    check_allocation_target(allocation, allocation_options, selection.default)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    check_spill_settings(max_memory, offload_dir)
    if streaming:
        if not is_model_path(model):
            raise ConfigError(
                "streaming=True reads the model's blocks from its checkpoint one at a time, so it takes the "
                "model's folder or Hub id, not a loaded model. Fix: llmprune.prune('path/to/model', "
                "streaming=True, output_dir=...), or drop streaming=True to prune this model in memory."
            )
        if output_dir is None:
            raise ConfigError(
                "streaming=True writes the pruned model block by block as it goes, so it needs "
                "output_dir=... (--output_dir): the model is never whole in memory to be returned."
            )
        if isinstance(dataset, str) and dataset == "self":
            raise DataError(
                "dataset='self' samples text from the whole model, which streaming never holds: give text."
            )
    ckpt = resolve_checkpoint_dir(checkpoint_dir, output_dir, resume)
    return EngineConfig(
        solver=solver,
        selection=selection,
        options=dict(options),
        true_sequential=true_sequential,
        batch_size=batch_size,
        progress=progress,
        seed=seed,
        max_memory=max_memory,
        offload_dir=offload_dir,
        checkpoint_dir=None if ckpt is None else str(ckpt),
        resume=resume,
        allocation=allocation,
        allocation_options=allocation_options,
    )


def calibration_ids(
    model: nn.Module,
    dataset: Any,
    tokenizer,
    num_samples: int | None,
    max_seq_length: int | None,
    seed: int,
    comm: Comm,
) -> Tensor:
    """The calibration tokens ``(N, L)``: read on rank 0 and sent to the others (every rank then
    holds them all and calibrates its share). ``model`` gives the position limit and, for
    ``dataset='self'``, the text. ``None`` sizes come from the model, the device and a token tensor's
    own shape (``calibration_size``).
    """
    num_samples, max_seq_length = calibration_size(model, dataset, num_samples, max_seq_length)
    if not comm.is_main:
        return comm.broadcast_tokens(torch.empty(0, 0, dtype=torch.int64))
    ids = calibration_tokens(dataset, tokenizer, num_samples, max_seq_length, seed, model=model)
    check_token_ids(ids, getattr(model.config, "vocab_size", None))
    return comm.broadcast_tokens(ids)


def default_num_samples(device: torch.device | str) -> int:
    """128 windows (the papers' setting) on a GPU; 32 on CPU, where 128 × 2048 tokens take an hour."""
    return 32 if torch.device(device).type == "cpu" else 128


def calibration_size(
    model: nn.Module, dataset: Any, num_samples: int | None, max_seq_length: int | None
) -> tuple[int, int]:
    """``(windows, tokens per window)`` for a run, with one position rule (``preflight.window_length``).

    A token tensor brings its own shape: asking for fewer rows or a narrower window cuts it (and says
    so); asking for more than it holds uses what it holds (and says so).
    """
    if isinstance(dataset, Tensor):
        check_dataset(dataset)
        rows, width = map(int, dataset.shape)
        seq = width if max_seq_length is None else min(max_seq_length, width)
        count = rows if num_samples is None else min(num_samples, rows)
        if (max_seq_length or 0) > width or (num_samples or 0) > rows:
            log.warning(
                "the token tensor holds %d × %d tokens: calibrating on %d × %d, not the %s × %s asked for",
                rows, width, count, seq, num_samples or rows, max_seq_length or width,
            )
        elif (count, seq) != (rows, width):
            log.info("calibrating on the first %d × %d of the %d × %d token tensor", count, seq, rows, width)
        return count, window_length(seq, model.config)
    device = next(model.parameters()).device
    if device.type == "meta":  # a streaming skeleton: the compute device decides
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = default_num_samples(device) if num_samples is None else num_samples
    return count, window_length(max_seq_length, model.config)
