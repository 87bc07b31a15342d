"""Pruning with no calibration data, for solvers that declare no statistics (magnitude).

Magnitude needs only the weights, so running calibration forwards for it is pure waste (it was 97 %
of its wall time on SmolLM2). This path solves every selected Linear directly. It adds no block
reports: with no activations there is no block output error to report.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.calibration.engine import EngineConfig, _selected, _solve_module, _specs
from llmprune.calibration.modules import find_blocks
from llmprune.result import PruneResult
from llmprune.solvers.types import LayerStats


@torch.no_grad()
def prune_weights_only(model: nn.Module, cfg: EngineConfig, result: PruneResult) -> PruneResult:
    prefix, blocks = find_blocks(model)
    specs = _specs(blocks, prefix, cfg)
    for i, block in enumerate(blocks):
        for name, module in _selected(block, f"{prefix}.{i}", cfg.selection).items():
            if specs[name].is_dense:
                continue
            report, keep, *_ = _solve_module(name, module, LayerStats(), specs[name], cfg)
            result.modules[name] = report
            result.keep_masks[name] = keep
    return result
