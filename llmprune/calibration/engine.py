"""The block-sequential engine: calibrate, solve and propagate one decoder block at a time.

For each block: hook its selected Linears, run the calibration inputs through it accumulating only
the statistics the solver declared (Linears that read the same tensor, such as q/k/v or gate/up,
share one accumulator), solve each Linear, write exact zeros, then run the *pruned* block to make the
next block's inputs. Peak memory is one block plus the calibration activations.

With ``true_sequential`` the Linears are solved in groups in execution order (q,k,v → o → gate,up →
down for Llama), each group calibrated on inputs produced by the already-pruned earlier groups.

Scale (all off by default; the default path is the plain in-memory loop):

* ``BlockSource`` decides where a block's weights live between turns: in memory (default) or streamed
  from safetensors shards (``streaming.py``), so a model larger than memory can be pruned;
* ``max_memory`` spills the calibration activations to disk (``capture.DiskList``) above a budget;
* ``comm`` shares the calibration samples and the solves between processes (``distributed.py``); the
  statistics are summed per sample in an order fixed by the data (``stats.py``), so masks and weights
  are bit-identical to one process, for any number of processes;
* ``checkpoint_dir`` / ``resume`` record every finished block (``resume.py``) and continue after a kill,
  again bit-identically. Solvers draw randomness from a seed derived from ``seed`` and the module
  name, so neither the rank that solves a Linear nor a restart changes its result.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmprune.allocation import AllocationOptions
from llmprune.calibration.allocation_pass import allocate_sparsity
from llmprune.calibration.capture import (
    BlockInputs,
    DiskList,
    _StopForward,
    activation_list,
    call_block,
    capture_block_inputs,
    move_outside_blocks,
    spills,
)
from llmprune.calibration.data import tokens_hash
from llmprune.calibration.distributed import Comm, current_comm
from llmprune.calibration.modules import WeightView, find_blocks, prunable_linears
from llmprune.calibration.resume import Progress, run_fingerprint
from llmprune.calibration.rows import cut_call
from llmprune.calibration.stats import StatsAccumulator
from llmprune.errors import ConfigError
from llmprune.preflight import check_world
from llmprune.registry import SolverInfo, get_solver
from llmprune.result import BlockReport, ModuleReport, PruneResult
from llmprune.solvers import fallbacks
from llmprune.solvers.types import HESSIAN, LayerProblem, LayerStats, reconstruction_error
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
    progress: bool = True  # a tqdm bar (what records a run's state is a resume.Progress, `checkpoint`)
    seed: int = 0  # solvers' randomness derives from it, per module
    comm: Comm | None = (
        None  # None: the running torch.distributed group (or torchrun's variables), else one process
    )
    max_memory: int | str | None = None  # activation budget ("4GB"); above it activations spill to disk
    offload_dir: str | None = None  # where spilled activations go (default: a temporary folder)
    checkpoint_dir: str | None = None  # record progress after every block here
    resume: bool = False  # continue the run recorded in checkpoint_dir
    allocation: str = "uniform"  # per-layer sparsity pre-pass: uniform | owl | error | depth
    allocation_options: AllocationOptions = field(default_factory=AllocationOptions)
    # fused recovery (recovery/blockwise.BlockReconstructor): tap(block) before the dense forward,
    # recover(...) once the block is pruned; the next block is fed the recovered block's outputs
    block_recovery: Any = None


class BlockSource:
    """Where decoder blocks' weights live between turns. Default: in memory; each block visits the
    compute device for its turn and goes home after."""

    streaming = False

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        home = next(block.parameters()).device
        self._home[index] = home
        if home != device:
            block.to(device)

    def tidy(self) -> None:
        """Called after each Linear is solved: a chance to hand freed memory back."""

    def release(self, index: int, block: nn.Module) -> None:
        home = self._home.pop(index, None)
        if home is not None and next(block.parameters()).device != home:
            block.to(home)


def _selected(block: nn.Module, prefix: str, selection: ModuleSelection) -> dict[str, nn.Module]:
    return {
        f"{prefix}.{rel}": m
        for rel, m in prunable_linears(block).items()
        if selection.selects(f"{prefix}.{rel}")
    }


class _InputRecorder:
    """Forward hooks that record (module name, input tensor) in execution order during one call."""

    def __init__(self, modules: dict[str, nn.Module], stop_after: str | None = None) -> None:
        self.seen: list[tuple[str, Tensor]] = []
        self.handles = [
            m.register_forward_hook(self._hook(name, name == stop_after)) for name, m in modules.items()
        ]

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


def _per_sample(x: Tensor, batch: Tensor) -> Tensor | None:
    """A Linear's input as (samples, rows, in), when its rows can be told apart per sample: (B, L, …, in)
    as blocks give it, or (B·L, in) flattened sample-major (e.g. a router); None otherwise."""
    b, length = batch.shape[0], batch.shape[1] if batch.dim() > 2 else 1
    if x.dim() >= 3 and x.shape[0] == b:
        return x.reshape(b, -1, x.shape[-1])
    if x.dim() == 2 and x.shape[0] == b * length:
        return x.reshape(b, length, x.shape[-1])
    return None


@torch.no_grad()
def _calibrate(
    block: nn.Module,
    modules: dict[str, nn.Module],
    inputs: BlockInputs,
    needs: frozenset[str],
    stop_after: str | None,
    outputs: list | DiskList | None,
) -> dict[str, StatsAccumulator]:
    """One pass over the calibration batches, accumulating statistics of the given modules' inputs.

    Statistics are added per sample, by its global index, whatever batch it came in (``stats.py``):
    that is what makes them independent of the batch size and of the number of processes. Block
    outputs go to ``outputs`` when given (the dense block's outputs, for the block error).
    """
    device = next(block.parameters()).device
    accs: dict[str, StatsAccumulator] = {}
    rec = _InputRecorder(modules, stop_after)
    try:
        calls = zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True)
        for j, (hidden, args, kwargs) in enumerate(calls):
            first = inputs.starts[j]  # global index of the batch's first sample
            try:
                out = call_block(block, hidden, args, kwargs)
                if outputs is not None:
                    outputs.append(out)
            except _StopForward:
                pass
            seen: dict[str, list[Tensor]] = {}  # leader -> its inputs, one per call
            leaders: dict[int, str] = {}
            for name, x in rec.take():
                leader = leaders.setdefault(id(x), name)
                if name not in accs:
                    accs[name] = (
                        accs[leader] if leader != name else StatsAccumulator(x.shape[-1], needs, device)
                    )
                if leader == name:
                    seen.setdefault(name, []).append(x)
            for name, xs in seen.items():
                _add_per_sample(accs[name], name, xs, hidden, first)
    finally:
        rec.remove()
    return accs


def _add_per_sample(acc: StatsAccumulator, name: str, xs: list[Tensor], hidden: Tensor, first: int) -> None:
    """Add one batch's inputs of a Linear (one tensor per call) sample by sample, each sample's calls in
    order. Inputs whose rows cannot be told apart per sample (tokens routed to an MoE expert) go whole to
    the batch's first sample: still deterministic, but then the bits follow how samples were batched."""
    split = [_per_sample(x, hidden) for x in xs]
    if any(s is None for s in split):
        if not acc.per_batch:
            acc.per_batch = True
            log.warning(
                "%s: its inputs are not laid out per sample %s; its statistics are summed per batch, so "
                "they may differ in the last bits with another batch size or number of processes",
                name,
                tuple(xs[0].shape),
            )
        for x in xs:
            acc.add(x, first)
        for i in range(1, hidden.shape[0]):
            acc.skip(first + i)
        return
    for i in range(hidden.shape[0]):
        for s in split:
            acc.add(s[i], first + i)


def _call_batch(block: nn.Module, inputs: BlockInputs, b: int, rows: slice = slice(None)) -> Tensor:
    """The block's output on windows ``rows`` of calibration batch ``b`` (what block-wise recovery
    trains on, a micro-batch per step)."""
    return call_block(block, *cut_call(rows, inputs.hidden[b], inputs.args[b], inputs.kwargs[b]))


def _module_seed(seed: int, name: str) -> int:
    """A seed per (run seed, module): a Linear's result depends on neither who solves it nor when."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _solve_module(
    name: str,
    module: nn.Module,
    stats: LayerStats,
    spec: SparsitySpec,
    cfg: EngineConfig,
    reached: bool = True,
) -> tuple[ModuleReport, Tensor, bool]:
    """Solve one Linear and write the result: (report, keep-mask on CPU, whether weights were updated).

    A Linear no calibration token ``reached`` has all-zero statistics, on which a data-aware score ties
    everywhere and would prune columns by position: it is pruned by weight magnitude instead, on purpose,
    and its report says so (as it says every other fallback).
    """
    view = WeightView(module)
    weight = view.read()  # (out, in) fp32
    start = time.perf_counter()
    problem = LayerProblem(name=name, weight=weight, stats=stats, spec=spec)
    cuda = [weight.device] if weight.device.type == "cuda" else []
    solver, options = (cfg.solver, cfg.options) if reached else (get_solver("magnitude"), {})
    with torch.random.fork_rng(devices=cuda), fallbacks.collect() as notes:
        torch.manual_seed(_module_seed(cfg.seed, name))
        if not reached and cfg.solver.needs:
            fallbacks.note("no_calibration_tokens")
            log.warning("%s: no calibration token reached it; pruned by weight magnitude", name)
        result = solver(problem, **options)
    keep = result.keep.to(torch.bool)
    if result.weight is not None and not torch.isfinite(result.weight).all():
        log.warning(
            "%s: solver %s produced non-finite weights; keeping original values", name, cfg.solver.name
        )
        result.weight = None
        notes.append("kept_original_weights")
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
        fallbacks=notes,
    )
    return report, keep.cpu(), result.weight is not None


def _solve_cost(module: nn.Module, needs: frozenset[str]) -> float:
    """Rough solve time, to share Linears between processes: Hessian solvers factor an (in, in) matrix
    and sweep out x in^2; the others score out x in weights."""
    out, inp = WeightView(module).shape
    return float(inp * inp * (out + inp)) if HESSIAN in needs else float(out * inp)


def _specs(model_blocks, prefix: str, cfg: EngineConfig) -> dict[str, SparsitySpec]:
    """Resolve every selected module's spec, applying a solver's whole-model allocation if it has one.

    Widths are checked here, for every module, so a bad N:M fails before any work (and on every rank).
    """
    specs: dict[str, SparsitySpec] = {}
    for i, block in enumerate(model_blocks):
        for name, m in _selected(block, f"{prefix}.{i}", cfg.selection).items():
            specs[name] = cfg.selection.spec_for(name)
            specs[name].check_width(WeightView(m).shape[1], name)
    if cfg.solver.allocate is not None:
        default = cfg.selection.default
        weights = {}
        for i, block in enumerate(model_blocks):
            for name, m in _selected(block, f"{prefix}.{i}", cfg.selection).items():
                if specs[name] == default:
                    w = m.weight.detach()  # a view, not a copy: most allocations only look at a few options
                    weights[name] = w.t() if WeightView(m).transposed else w  # (out, in)
        try:
            allocation = cfg.solver.allocate(weights, default, **cfg.options) if weights else {}
        except (RuntimeError, NotImplementedError) as exc:
            if not any(w.device.type == "meta" for w in weights.values()):
                raise
            raise ConfigError(
                f"{cfg.solver.name} with these options allocates sparsity over the whole model, which needs "
                "every weight in memory at once: not possible while streaming blocks from disk. Prune in "
                "memory, or use a per-layer setting."
            ) from exc
        specs.update({name: SparsitySpec(sparsity=s) for name, s in allocation.items()})
    return specs


def _reduced(accs: dict[str, StatsAccumulator], comm: Comm, num_samples: int) -> dict[str, LayerStats]:
    """Each module's statistics over all samples (and ranks); modules sharing an accumulator share them."""
    unique = list({id(a): a for a in accs.values()}.values())  # q/k/v share one accumulator
    reduced = dict(zip(map(id, unique), comm.reduce_stats(unique, num_samples), strict=True))
    return {name: reduced[id(acc)] for name, acc in accs.items()}


def _allocate(blocks, prefix, inputs, specs, cfg, comm, num_samples, source, device, spill, result) -> None:
    """Replace the default spec of every module by its share of a non-uniform allocation (in place)."""
    default = cfg.selection.default
    modules = {
        n: m
        for i, block in enumerate(blocks)
        for n, m in _selected(block, f"{prefix}.{i}", cfg.selection).items()
        if specs[n] == default
    }
    if cfg.solver.allocate is not None and any(specs[n] != cfg.selection.spec_for(n) for n in specs):
        raise ConfigError(
            f"{cfg.solver.name} with these options already allocates sparsity across layers: use "
            f"allocation='uniform', or a per-layer setting of the solver."
        )

    def collect(block, group, block_inputs, needs, outputs):
        accs = _calibrate(block, group, block_inputs, needs, None, outputs)
        return _reduced(accs, comm, num_samples)

    sparsity, record = allocate_sparsity(
        blocks,
        prefix,
        inputs,
        modules,
        default,
        cfg.allocation,
        cfg.allocation_options,
        collect=collect,
        load=lambda i, block: source.load(i, block, device),
        release=source.release,
        new_list=lambda: activation_list(spill, cfg.offload_dir),
        progress=cfg.progress and comm.is_main,
    )
    specs.update({n: SparsitySpec(sparsity=s) for n, s in sparsity.items()})
    result.allocation = record


def _solve_group(
    group: list[str],
    modules: dict[str, nn.Module],
    accs: dict[str, StatsAccumulator],
    specs: dict[str, SparsitySpec],
    cfg: EngineConfig,
    comm: Comm,
    num_samples: int,
    result: PruneResult,
    source: BlockSource,
) -> None:
    """Reduce the group's statistics over all batches, solve each Linear on its owner rank, share."""
    reduced = _reduced(accs, comm, num_samples)
    device = next(iter(modules.values())).weight.device
    owners = comm.owners([_solve_cost(modules[n], cfg.solver.needs) for n in group])
    for name, owner in zip(group, owners, strict=True):
        keep = report = None
        updated = False
        if comm.rank == owner:
            if name in accs:
                stats = reduced[name]
            else:  # never reached by a calibration token
                stats = StatsAccumulator(
                    WeightView(modules[name]).shape[1], cfg.solver.needs, device
                ).empty_stats()
            reached = name in accs and stats.num_tokens > 0
            report, keep, updated = _solve_module(name, modules[name], stats, specs[name], cfg, reached)
            if name in accs and accs[name].per_batch:
                report.fallbacks.append("statistics_per_batch")
        keep, report = comm.share_solution(owner, modules[name], keep, report, updated)
        result.modules[name] = report
        result.keep_masks[name] = keep
        source.tidy()


@torch.no_grad()
def prune_blocks(
    model: nn.Module,
    input_ids: Tensor,
    cfg: EngineConfig,
    result: PruneResult,
    source: BlockSource | None = None,
    checkpoint: Progress | None = None,
) -> PruneResult:
    """Prune ``model`` in place with calibration tokens ``input_ids`` (N, L); fill ``result``.

    ``source`` streams blocks from disk (see ``streaming.py``); ``checkpoint`` is the
    ``resume.Progress`` that records finished blocks (opened here from ``cfg.checkpoint_dir`` when
    not given).
    """
    source = source or BlockSource()
    comm = cfg.comm or current_comm()
    if comm.world > 1:
        input_ids = comm.broadcast_tokens(input_ids)
        result.calibration_hash = tokens_hash(input_ids)
    prefix, blocks = find_blocks(model)
    home = next(blocks[0].parameters()).device
    device = cfg.device or (home if home.type != "meta" else torch.device("cpu"))
    move_outside_blocks(model, prefix, device)
    specs = _specs(blocks, prefix, cfg)
    needs = cfg.solver.needs
    num_samples = int(input_ids.shape[0])
    check_world(num_samples, comm.world)  # before any forward: every process needs a sample
    local = comm.sample_range(num_samples)
    if checkpoint is None and cfg.checkpoint_dir is not None:
        fingerprint = run_fingerprint(cfg, model, input_ids, len(blocks), device)
        checkpoint = Progress.open(cfg.checkpoint_dir, comm, fingerprint, resume=cfg.resume)
    start = checkpoint.next_block if checkpoint is not None else 0
    spill = spills(cfg.max_memory, model, input_ids, local)
    inputs = None
    if start < len(blocks):
        hidden = activation_list(spill, cfg.offload_dir)
        inputs = capture_block_inputs(
            model, blocks[0], input_ids, cfg.batch_size, samples=local, hidden=hidden, device=device
        )
        if cfg.allocation != "uniform":  # before restore: the statistics are the dense model's
            _allocate(blocks, prefix, inputs, specs, cfg, comm, num_samples, source, device, spill, result)
    if start > 0:
        checkpoint.restore(lambda j: f"{prefix}.{j}", blocks, inputs, result, in_memory=not source.streaming)
    bar = tqdm(
        total=len(blocks),
        initial=start,
        desc="pruning",
        unit="block",
        disable=not (cfg.progress and comm.is_main),
    )
    for i in range(start, len(blocks)):
        block = blocks[i]
        t0 = time.perf_counter()
        source.load(i, block, device)
        label = f"({i + 1}/{len(blocks)})"
        modules = {
            n: m for n, m in _selected(block, f"{prefix}.{i}", cfg.selection).items() if not specs[n].is_dense
        }
        dense_out = activation_list(spill, cfg.offload_dir) if modules else None
        taps = cfg.block_recovery.tap(block) if cfg.block_recovery is not None and modules else None
        if modules:
            groups = execution_groups(block, modules, inputs) if cfg.true_sequential else [list(modules)]
            for g, group in enumerate(groups):
                bar.set_postfix_str(f"{label} calibrating {g + 1}/{len(groups)}")
                group_modules = {n: modules[n] for n in group}
                with taps.record() if taps is not None and g == 0 else contextlib.nullcontext():
                    accs = _calibrate(
                        block,
                        group_modules,
                        inputs,
                        needs,
                        stop_after=None if g == 0 else group[-1],
                        outputs=dense_out if g == 0 else None,
                    )
                _solve_group(group, group_modules, accs, specs, cfg, comm, num_samples, result, source)
                del accs
        if taps is not None:  # dense targets were recorded by the forward above: no extra propagation
            bar.set_postfix_str(f"{label} reconstructing")
            try:
                cfg.block_recovery.recover(
                    i,
                    f"{prefix}.{i}",
                    block,
                    functools.partial(_call_batch, block, inputs),
                    len(inputs),
                    taps,
                    {n: result.keep_masks[n] for n in modules},
                )
            finally:
                taps.remove()
            del taps
        bar.set_postfix_str(f"{label} propagating")
        errors: list[list[float]] = []  # per sample: squared output error, squared dense output (fp64)
        for b in range(len(inputs)):
            out = call_block(block, inputs.hidden[b], inputs.args[b], inputs.kwargs[b])
            if dense_out is not None:
                dense = dense_out[b]
                for o, d in zip(out.double().unbind(0), dense.double().unbind(0), strict=True):
                    errors.append([float((o - d).pow(2).sum()), float(d.pow(2).sum())])
            inputs.hidden[b] = out
        if isinstance(dense_out, DiskList):
            dense_out.close()
        del dense_out
        num, den = comm.sum_per_sample(errors, num_samples) if modules else (0.0, 0.0)
        seconds = time.perf_counter() - t0
        result.blocks.append(BlockReport(i, f"{prefix}.{i}", seconds, num / den if den else 0.0))
        if checkpoint is not None:
            checkpoint.save_block(i, block, f"{prefix}.{i}", inputs, result, len(blocks))
            if source.streaming:  # on disk now: the masks of a model larger than memory are large too
                for name in modules:
                    result.keep_masks.pop(name, None)
        source.release(i, block)
        log.debug("block %d: %.2fs, relative output error %.3e", i, seconds, result.blocks[-1].recon_error)
        bar.update(1)
    bar.close()
    if inputs is not None and isinstance(inputs.hidden, DiskList):
        inputs.hidden.close()
    return result
