"""How long the long stages of a run will take, said before they start.

One timed forward pass of one window on the loaded model, scaled by the number of windows each stage
runs: calibration makes about two passes per window (statistics through each block, then the pruned
block's outputs for the next one), evaluation one per window, before and after pruning. Solver time
(SparseGPT's and iCBS's per-layer solves) comes on top. Batching makes small models faster than this
says; for the models where the wait matters, compute dominates and the estimate holds.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

log = logging.getLogger(__name__)

CALIBRATION_PASSES = 2  # statistics, then propagation of the pruned block's outputs


@torch.no_grad()
def forward_seconds(model: nn.Module, seq_len: int) -> float:
    """Wall time of one forward pass of one ``seq_len``-token window (the second of two: warm caches)."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    model(input_ids=ids, use_cache=False)  # the first call pays for lazy initialisation and allocation
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    model.train(was_training)
    return time.perf_counter() - start


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def announce(
    model: nn.Module,
    *,
    calibration: tuple[int, int] | None,
    evaluation: tuple[int, int] | None,
    evaluations: int = 2,
) -> dict[str, float]:
    """Log the expected duration of calibration (``(windows, length)``) and of ``evaluations``
    perplexity runs (``(windows, length)`` each); return the estimates in seconds."""
    lengths = {n for _, n in filter(None, (calibration, evaluation))}
    per_window = {n: forward_seconds(model, n) for n in lengths}
    out: dict[str, float] = {}
    if calibration:
        windows, length = calibration
        out["calibration"] = CALIBRATION_PASSES * windows * per_window[length]
        log.info(
            "calibration: %d windows × %d tokens, about %s plus the solves (one window's forward: %.2f s)",
            windows, length, _minutes(out["calibration"]), per_window[length],
        )  # fmt: skip
    if evaluation:
        windows, length = evaluation
        out["evaluation"] = evaluations * windows * per_window[length]
        log.info(
            "perplexity: %d × %d windows of %d tokens, about %s (--eval_limit trades precision for time)",
            evaluations, windows, length, _minutes(out["evaluation"]),
        )  # fmt: skip
    return out
