"""Pruning with no calibration data, for solvers that declare no statistics (magnitude).

Magnitude needs only the weights, so running calibration forwards for it is pure waste (it was 97 %
of its wall time on SmolLM2). This path solves every selected Linear directly, in memory or with the
blocks streamed from disk (``source``; ``checkpoint`` then records each pruned block for the writer).
It adds no block reports: with no activations there is no block output error to report.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.calibration.engine import BlockSource, EngineConfig, _selected, _solve_module, _specs
from llmprune.calibration.modules import find_blocks
from llmprune.result import PruneResult
from llmprune.solvers.types import LayerStats


@torch.no_grad()
def prune_weights_only(
    model: nn.Module,
    cfg: EngineConfig,
    result: PruneResult,
    source: BlockSource | None = None,
    checkpoint=None,
) -> PruneResult:
    """``checkpoint`` is a ``resume.Progress`` that records each pruned block (needed when streaming)."""
    prefix, blocks = find_blocks(model)
    source = source or BlockSource()
    specs = _specs(blocks, prefix, cfg)
    device = cfg.device or torch.device("cpu")
    for i, block in enumerate(blocks):
        if source.streaming:
            source.load(i, block, device)
        for name, module in _selected(block, f"{prefix}.{i}", cfg.selection).items():
            if specs[name].is_dense:
                continue
            report, keep, *_ = _solve_module(name, module, LayerStats(), specs[name], cfg)
            result.modules[name] = report
            result.keep_masks[name] = keep
        if checkpoint is not None:
            checkpoint.save_block(i, block, f"{prefix}.{i}", None, result, len(blocks))
            if source.streaming:  # on disk now
                for name in list(result.keep_masks):
                    if name.startswith(f"{prefix}.{i}."):
                        del result.keep_masks[name]
        if source.streaming:
            source.release(i, block)
    return result
