"""The statistics pass behind ``--allocation owl|error``: per-layer numbers of the *dense* model, before
any block is pruned.

The engine holds one block at a time, but an allocation needs a number from every block first. So
the calibration inputs of block 0 are run through the dense blocks once more, block by block: each
block is calibrated (only the statistics the allocation needs), its per-layer numbers are kept as
a few floats, and its dense outputs become the next block's inputs. Cost: one extra dense forward
over the calibration tokens (plus, for ``error``, ``error_trials`` solves of every Linear with the
cheap ``error_solver``), and a second set of block activations alive at a time. Under ``torchrun``
the statistics are reduced like the pruning pass's, so every rank computes the same allocation. The
allocation math itself is ``llmprune/allocation.py``; ``depth`` needs no pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune import allocation as alloc
from llmprune.calibration.capture import BlockInputs, DiskList
from llmprune.calibration.modules import WeightView
from llmprune.registry import get_solver
from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerProblem, LayerStats, reconstruction_error
from llmprune.spec import SparsitySpec

log = logging.getLogger(__name__)

#: collect(block, modules, inputs, needs, outputs) -> reduced statistics of each module's input;
#: the block's outputs are appended to ``outputs``
Collect = Callable[[nn.Module, dict[str, nn.Module], BlockInputs, frozenset[str], Any], dict[str, LayerStats]]


def _needs(allocation: str, options: alloc.AllocationOptions) -> frozenset[str]:
    if allocation == "owl":
        return frozenset({SQ_NORMS})
    if allocation == "error":
        return frozenset({HESSIAN}) | get_solver(options.error_solver).needs
    return frozenset()


def _relative_errors(name: str, weight, stats: LayerStats, trials: list[float], solver: str) -> list[float]:
    """Layer loss at each trial sparsity over the dense layer's output energy ``tr(W H W^T)``."""
    energy = reconstruction_error(weight, torch.zeros_like(weight), stats.hessian)
    out = []
    for t in trials:
        result = get_solver(solver)(LayerProblem(name, weight, stats, SparsitySpec(sparsity=t)))
        new = result.weight if result.weight is not None else weight.masked_fill(~result.keep, 0.0)
        out.append(reconstruction_error(weight, new, stats.hessian) / energy if energy > 0 else 0.0)
    return out


def allocate_sparsity(
    blocks: list[nn.Module],
    prefix: str,
    inputs: BlockInputs,
    modules: dict[str, nn.Module],
    default: SparsitySpec,
    allocation: str,
    options: alloc.AllocationOptions,
    *,
    collect: Collect,
    load: Callable[[int, nn.Module], None],
    release: Callable[[int, nn.Module], None],
    new_list: Callable[[], list | DiskList],
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-module sparsities for the ``modules`` (name -> Linear, all at ``default``) and a record of how
    they were found (for ``sparsity.json``). ``inputs`` are block 0's captured inputs, left untouched."""
    start = time.perf_counter()
    names = list(modules)
    block_of = {n: int(n[len(prefix) + 1 :].split(".")[0]) for n in names}
    sizes = {n: WeightView(m).shape[0] * WeightView(m).shape[1] for n, m in modules.items()}
    used = sorted(set(block_of.values()))
    record: dict[str, Any] = {"allocation": allocation, "target": default.sparsity}
    if not names:  # every selected module has an override of its own: nothing to spread
        record.update(seconds=0.0, sparsity={})
        return {}, record
    if allocation == "depth":
        block_sizes = [sum(sizes[n] for n in names if block_of[n] == b) for b in used]
        per_block = alloc.depth(len(used), block_sizes, default.sparsity, options.depth_lambda)
        record["options"] = {"depth_lambda": options.depth_lambda}
        chosen = dict(zip(used, per_block, strict=True))
        sparsity = {n: chosen[block_of[n]] for n in names}
        record.update(seconds=time.perf_counter() - start, sparsity=sparsity)
        return sparsity, record

    needs = _needs(allocation, options)
    trials = alloc.trial_sparsities(default.sparsity, options.error_lambda, options.error_trials)
    ratios: dict[int, float] = {}
    curves: dict[str, list[float]] = {}
    current = inputs
    bar = tqdm(total=len(used), desc="allocation statistics", unit="block", disable=not progress)
    for i in range(used[-1] + 1):
        block = blocks[i]
        load(i, block)
        mine = {n: modules[n] for n in names if block_of[n] == i}
        outputs = new_list()
        stats = collect(block, mine, current, needs, outputs)
        if allocation == "owl" and mine:
            scores = [
                WeightView(m).read().abs() * stats[n].sq_norms.clamp_min(0).sqrt()  # (out, in) Wanda scores
                for n, m in mine.items()
            ]
            ratios[i] = alloc.outlier_ratio(scores, options.owl_m)
        elif allocation == "error":
            for n, m in mine.items():
                curves[n] = _relative_errors(n, WeightView(m).read(), stats[n], trials, options.error_solver)
        release(i, block)
        if current is not inputs and isinstance(current.hidden, DiskList):
            current.hidden.close()
        current = BlockInputs(outputs, inputs.args, inputs.kwargs, inputs.starts)
        if i in used:
            bar.update(1)
    bar.close()
    if current is not inputs and isinstance(current.hidden, DiskList):
        current.hidden.close()

    if allocation == "owl":
        block_sizes = [sum(sizes[n] for n in names if block_of[n] == b) for b in used]
        per_block = alloc.owl([ratios[b] for b in used], block_sizes, default.sparsity, options.owl_lambda)
        chosen = dict(zip(used, per_block, strict=True))
        sparsity = {n: chosen[block_of[n]] for n in names}
        record["options"] = {"owl_lambda": options.owl_lambda, "owl_m": options.owl_m}
        record["outlier_ratio"] = {f"{prefix}.{b}": ratios[b] for b in used}
    else:
        values = alloc.by_error(
            [list(zip(trials, curves[n], strict=True)) for n in names],
            [sizes[n] for n in names],
            default.sparsity,
        )
        sparsity = dict(zip(names, values, strict=True))
        record["options"] = {k: v for k, v in asdict(options).items() if k.startswith("error_")}
        record["trial_sparsities"] = trials
        record["relative_error"] = curves
    record.update(seconds=time.perf_counter() - start, sparsity=sparsity)
    log.info("%s allocation: %d Linears, statistics pass %.1fs", allocation, len(names), record["seconds"])
    return sparsity, record
