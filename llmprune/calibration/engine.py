"""The block-sequential engine: calibrate, solve and propagate one decoder block at a time.

For each block: hook its selected Linears, run the calibration inputs through it accumulating only
the statistics the solver declared (Linears that read the same tensor, such as q/k/v or gate/up,
share one accumulator), solve each Linear, write exact zeros, then run the *pruned* block to make the
next block's inputs. Peak memory is one block plus the calibration activations.

With ``true_sequential`` the Linears are solved in groups in execution order (q,k,v → o → gate,up →
down for Llama), each group calibrated on inputs produced by the already-pruned earlier groups.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import (
    BlockInputs,
    _StopForward,
    call_block,
    capture_block_inputs,
    move_outside_blocks,
)
from llmprune.calibration.modules import WeightView, find_blocks, prunable_linears
from llmprune.calibration.stats import StatsAccumulator
from llmprune.registry import SolverInfo
from llmprune.result import BlockReport, ModuleReport, PruneResult
from llmprune.solvers.types import LayerProblem, reconstruction_error
from llmprune.spec import ModuleSelection, SparsitySpec

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    solver: SolverInfo
    selection: ModuleSelection
    options: dict[str, Any] = field(default_factory=dict)
    true_sequential: bool = False
    batch_size: int = 8
    device: torch.device | None = None  # compute device; None = where the first block lives
    progress: bool = True


def _selected(block: nn.Module, prefix: str, selection: ModuleSelection) -> dict[str, nn.Module]:
    return {f"{prefix}.{rel}": m for rel, m in prunable_linears(block).items() if selection.selects(f"{prefix}.{rel}")}


class _InputRecorder:
    """Forward hooks that record (module name, input tensor) in execution order during one call."""

    def __init__(self, modules: dict[str, nn.Module], stop_after: str | None = None) -> None:
        self.seen: list[tuple[str, Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook(name, name == stop_after)) for name, m in modules.items()]

    def _hook(self, name: str, stop: bool):
        def hook(_module, inputs, _output):
            self.seen.append((name, inputs[0]))  # the very object: shared inputs compare `is`
            if stop:
                raise _StopForward

        return hook

    def take(self) -> list[tuple[str, Tensor]]:
        seen, self.seen = self.seen, []
        return seen

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def execution_groups(block: nn.Module, modules: dict[str, nn.Module], inputs: BlockInputs) -> list[list[str]]:
    """Modules in execution order, grouped when consecutive ones read the very same tensor."""
    rec = _InputRecorder(modules)
    try:
        call_block(block, inputs.hidden[0], inputs.args[0], inputs.kwargs[0])
    finally:
        rec.remove()
    groups: list[list[str]] = []
    last: Tensor | None = None
    for name, x in rec.take():
        if groups and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    missing = set(modules) - {n for g in groups for n in g}
    if missing:  # never called in a forward (e.g. unused heads): solve them last, with no statistics
        groups.append(sorted(missing))
    return groups


@torch.no_grad()
def _calibrate(
    block: nn.Module,
    modules: dict[str, nn.Module],
    inputs: BlockInputs,
    needs: frozenset[str],
    stop_after: str | None,
    keep_outputs: bool,
) -> tuple[dict[str, StatsAccumulator], list[Tensor]]:
    """One pass over the calibration batches, accumulating statistics of the given modules' inputs."""
    device = next(block.parameters()).device
    accs: dict[str, StatsAccumulator] = {}
    outputs: list[Tensor] = []
    rec = _InputRecorder(modules, stop_after)
    try:
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            try:
                out = call_block(block, hidden, args, kwargs)
                if keep_outputs:
                    outputs.append(out)
            except _StopForward:
                pass
            leaders: dict[int, str] = {}
            for name, x in rec.take():
                leader = leaders.setdefault(id(x), name)
                if name not in accs:
                    accs[name] = (
                        accs[leader] if leader != name else StatsAccumulator(x.shape[-1], needs, device)
                    )
                if leader == name:
                    accs[name].add(x)
    finally:
        rec.remove()
    return accs, outputs


def _solve_module(
    name: str, module: nn.Module, stats, spec: SparsitySpec, cfg: EngineConfig
) -> tuple[ModuleReport, Tensor]:
    view = WeightView(module)
    weight = view.read()  # (out, in) fp32
    spec.check_width(weight.shape[1], name)
    start = time.perf_counter()
    problem = LayerProblem(name=name, weight=weight, stats=stats, spec=spec)
    result = cfg.solver(problem, **cfg.options)
    keep = result.keep.to(torch.bool)
    if result.weight is not None and not torch.isfinite(result.weight).all():
        log.warning("%s: solver %s produced non-finite weights; keeping original values", name, cfg.solver.name)
        result.weight = None
    view.write(keep, result.weight)
    seconds = time.perf_counter() - start
    written = view.read()
    error = reconstruction_error(weight, written, stats.hessian) if stats.hessian is not None else None
    report = ModuleReport(
        name=name,
        shape=tuple(weight.shape),
        target=str(spec),
        sparsity=float((written == 0).sum()) / written.numel(),
        layer_error=error,
        seconds=seconds,
    )
    return report, keep.cpu()


def _specs(model_blocks, prefix: str, cfg: EngineConfig) -> dict[str, SparsitySpec]:
    """Resolve every selected module's spec, applying a solver's whole-model allocation if it has one."""
    specs: dict[str, SparsitySpec] = {}
    for i, block in enumerate(model_blocks):
        for name in _selected(block, f"{prefix}.{i}", cfg.selection):
            specs[name] = cfg.selection.spec_for(name)
    if cfg.solver.allocate is not None:
        default = cfg.selection.default
        weights = {}
        for i, block in enumerate(model_blocks):
            for name, m in _selected(block, f"{prefix}.{i}", cfg.selection).items():
                if specs[name] == default:
                    weights[name] = WeightView(m).read()
        allocation = cfg.solver.allocate(weights, default, **cfg.options) if weights else {}
        specs.update({name: SparsitySpec(sparsity=s) for name, s in allocation.items()})
    return specs


@torch.no_grad()
def prune_blocks(model: nn.Module, input_ids: Tensor, cfg: EngineConfig, result: PruneResult) -> PruneResult:
    """Prune ``model`` in place with calibration tokens ``input_ids`` (N, L); fill ``result``."""
    prefix, blocks = find_blocks(model)
    home = next(blocks[0].parameters()).device
    device = cfg.device or home
    move_outside_blocks(model, prefix, device)
    specs = _specs(blocks, prefix, cfg)
    needs = cfg.solver.needs
    blocks[0].to(device)
    inputs = capture_block_inputs(model, blocks[0], input_ids, cfg.batch_size)
    bar = tqdm(total=len(blocks), desc="pruning", unit="block", disable=not cfg.progress)
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        block.to(device)
        label = f"({i + 1}/{len(blocks)})"
        modules = {n: m for n, m in _selected(block, f"{prefix}.{i}", cfg.selection).items() if not specs[n].is_dense}
        dense_out: list[Tensor] = []
        if modules:
            if cfg.true_sequential:
                groups = execution_groups(block, modules, inputs)
            else:
                groups = [list(modules)]
            for g, group in enumerate(groups):
                bar.set_postfix_str(f"{label} calibrating {g + 1}/{len(groups)}")
                group_modules = {n: modules[n] for n in group}
                accs, outs = _calibrate(
                    block,
                    group_modules,
                    inputs,
                    needs,
                    stop_after=None if g == 0 else group[-1],
                    keep_outputs=g == 0,
                )
                if g == 0:
                    dense_out = outs
                for name in group:
                    stats = accs[name].result() if name in accs else StatsAccumulator(
                        WeightView(modules[name]).shape[1], needs, device
                    ).result()
                    report, keep = _solve_module(name, modules[name], stats, specs[name], cfg)
                    result.modules[name] = report
                    result.keep_masks[name] = keep
                del accs
        bar.set_postfix_str(f"{label} propagating")
        num = den = 0.0
        for b in range(len(inputs)):
            out = call_block(block, inputs.hidden[b], inputs.args[b], inputs.kwargs[b])
            if dense_out:
                num += float((out.float() - dense_out[b].float()).pow(2).sum())
                den += float(dense_out[b].float().pow(2).sum())
            inputs.hidden[b] = out
        del dense_out
        if device != home:
            block.to(home)
        seconds = time.perf_counter() - t0
        result.blocks.append(BlockReport(i, f"{prefix}.{i}", seconds, num / den if den else 0.0))
        log.debug("block %d: %.2fs, relative output error %.3e", i, seconds, result.blocks[-1].recon_error)
        bar.update(1)
    bar.close()
    return result
