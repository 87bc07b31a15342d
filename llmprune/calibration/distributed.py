"""Calibration across processes (``torchrun`` / ``accelerate launch``): same masks, less wall time.

Each rank holds a contiguous share of the calibration *samples* (:meth:`Comm.sample_range`) and forms
its own batches inside it: the batches of one process, cut where a share ends. Samples, not batches,
because the statistics are summed per sample (``stats.py``), so any share of any size gives the same
bits. Shares are whole chunks of ``stats.CHUNK`` samples whenever there are at least as many chunks as
ranks (no rank then holds a chunk's tail apart, which costs memory); with fewer chunks, the samples are
split as evenly as possible. A rank needs at least one sample, so the only refusal is more ranks than
samples. Per block:

* statistics: every rank sums the tree nodes of its share (``stats.StatsAccumulator``); the partial
  sums are broadcast and every rank finishes the same fixed tree, so the statistics are bit-identical
  to one process, whatever the number of ranks (a plain ``all_reduce`` would add in an order that
  depends on the world size);
* solving: the block's Linears are dealt to the ranks by estimated cost; the owner solves (with a seed
  derived from the module name, not from how many modules this rank solved before) and broadcasts the
  keep-mask (8 per byte), the report and, if the solver changed kept weights, the new weight. Solving
  is where Hessian methods spend their time, so this is where the ranks save it; broadcasting the
  result (rather than trusting every rank to compute the same bits) also keeps ranks consistent on
  GPUs, whose kernels need not be deterministic;
* the block reconstruction error: per-sample values (fp64) are gathered and summed in sample order.

Only rank 0 writes (checkpoints, the output folder). Bit-identity with one process assumes that a
sample through a block gives the same bits whatever other samples share its batch, on every rank:
same device type, dtype and thread count (``torch.set_num_threads``). CPU kernels here compute each
sample's rows alike for any batch size (the tests check six architectures); with the default sizes
(a multiple of 8 samples, batches of 8) the shares fall on batch boundaries, so every batch is the
single process's batch anyway.

>>> # torchrun --nproc_per_node 2 -m llmprune prune --model ./llama --method sparsegpt  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import WeightView
from llmprune.calibration.stats import CHUNK, Node, StatsAccumulator, combine, part_spans
from llmprune.errors import ConfigError
from llmprune.io.masks import pack_bits, unpack_bits
from llmprune.solvers.types import LayerStats

log = logging.getLogger(__name__)


class Comm:
    """One process: every collective is the identity. Also the interface :class:`TorchComm` fills in."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sample_range(self, num_samples: int, rank: int | None = None) -> range:
        """The contiguous calibration samples ``rank`` (default: this one) calibrates on."""
        return share(num_samples, self.world, self.rank if rank is None else rank)

    def owners(self, costs: list[float]) -> list[int]:
        """Which rank solves each Linear of a group, given rough solve costs: largest first, each to the
        least loaded rank (LPT). Deterministic, and the busiest rank, which sets the wall time, carries
        as little as solving whole Linears allows (round-robin gave one rank 63% of a Wanda block)."""
        load = [0.0] * self.world
        owners = [0] * len(costs)
        for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owners[k] = rank
            load[rank] += costs[k]
        return owners

    def broadcast_tokens(self, input_ids: Tensor) -> Tensor:
        return input_ids

    def reduce_stats(self, accs: list[StatsAccumulator], num_samples: int) -> list[LayerStats]:
        """Statistics over all samples, one per accumulator (listed in the same order on every rank)."""
        return [acc.result() for acc in accs]

    def share_solution(
        self, owner: int, module: nn.Module, keep: Tensor | None, report: Any, updated: bool
    ) -> tuple[Tensor, Any]:
        """After ``owner`` solved (and wrote) ``module``: the same weight, keep-mask and report on every
        rank. ``updated``: the solver changed kept weights too (else zeros where ``~keep`` is all)."""
        return keep, report

    def sum_per_sample(self, values: list[list[float]], num_samples: int) -> list[float]:
        """Column sums of per-sample values (this rank's share, in order), added in sample order."""
        return _ordered_sums(values)

    def barrier(self) -> None:
        pass

    def check_same(self, what: str, value: str) -> None:
        """Raise if ``value`` differs between ranks (e.g. a model or settings fingerprint)."""


def share(num_samples: int, world: int, rank: int, chunk: int = CHUNK) -> range:
    """Rank ``rank``'s contiguous share of ``num_samples``: whole chunks if every rank can have one, else
    an even split. Empty only when ``world > num_samples``, which the engine refuses."""
    chunks = -(-num_samples // chunk)
    if chunks >= world:
        return range(
            min(num_samples, rank * chunks // world * chunk),
            min(num_samples, (rank + 1) * chunks // world * chunk),
        )
    return range(rank * num_samples // world, (rank + 1) * num_samples // world)


def _ordered_sums(rows: list[list[float]]) -> list[float]:
    totals = [0.0] * (len(rows[0]) if rows else 0)
    for row in rows:
        for j, v in enumerate(row):
            totals[j] += v
    return totals


class TorchComm(Comm):
    """``torch.distributed`` over an initialised process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _bcast(self, tensor: Tensor, src: int) -> Tensor:
        """Broadcast ``tensor`` from ``src`` in place (via the collective device if it lives elsewhere)."""
        if tensor.device == self.device:
            self.dist.broadcast(tensor, src=src)
            return tensor
        moved = tensor.to(self.device)
        self.dist.broadcast(moved, src=src)
        tensor.copy_(moved)
        return tensor

    def _all_sum_int(self, value: int, op: Any = None) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t, op=op or self.dist.ReduceOp.SUM)
        return int(t.item())

    def broadcast_tokens(self, input_ids: Tensor) -> Tensor:
        shape = torch.tensor(list(input_ids.shape) if self.is_main else [0, 0], dtype=torch.int64)
        self._bcast(shape, 0)
        ids = (
            input_ids.to(torch.int64).contiguous()
            if self.is_main
            else torch.empty(*shape.tolist(), dtype=torch.int64)
        )
        return self._bcast(ids, 0)

    def reduce_stats(self, accs: list[StatsAccumulator], num_samples: int) -> list[LayerStats]:
        out = []
        for acc in accs:
            local = acc.nodes()
            mine, own = [(n.lo, n.hi) for n in local], self.sample_range(num_samples)
            if mine != part_spans(own.start, own.stop, acc.chunk):
                raise RuntimeError(f"rank {self.rank}: partial sums {mine} do not match its samples")
            count = self._all_sum_int(acc.num_tokens)
            nodes: list[Node] = []
            for r in range(self.world):
                rr = self.sample_range(num_samples, r)
                for k, (lo, hi) in enumerate(part_spans(rr.start, rr.stop, acc.chunk)):
                    if r == self.rank:
                        node = local[k]
                    else:
                        node = acc.empty_stats()  # zero buffers of the right shapes, filled by the broadcast
                        node = Node(lo, hi, node.sq_norms, node.hessian)
                    for t in (node.sq_norms, node.hessian):
                        if t is not None:
                            self._bcast(t, r)
                    nodes.append(node)
            out.append(combine(nodes, count, acc.chunk))
        return out

    def share_solution(
        self, owner: int, module: nn.Module, keep: Tensor | None, report: Any, updated: bool
    ) -> tuple[Tensor, Any]:
        """The mask travels 8 per byte; the weight only if the solver changed kept weights. Otherwise
        every rank applies the mask to the weight it already holds: the same bits, 1/32 of the traffic."""
        box = [(report, updated) if self.rank == owner else None]
        self.dist.broadcast_object_list(
            box, src=owner, device=self.device if self.device.type != "cpu" else None
        )
        report, updated = box[0]
        view = WeightView(module)
        numel = view.shape[0] * view.shape[1]
        packed = pack_bits(keep) if self.rank == owner else torch.empty(-(-numel // 8), dtype=torch.uint8)
        keep = unpack_bits(self._bcast(packed.contiguous(), owner), view.shape)  # (out, in)
        if updated:
            self._bcast(module.weight.data, owner)
        elif self.rank != owner:
            view.write(keep)
        return keep, report

    def sum_per_sample(self, values: list[list[float]], num_samples: int) -> list[float]:
        width = self._all_sum_int(len(values[0]) if values else 0, self.dist.ReduceOp.MAX)
        full = torch.zeros(num_samples, width, dtype=torch.float64)
        own = self.sample_range(num_samples)
        if values:
            full[own.start : own.start + len(values)] = torch.tensor(values, dtype=torch.float64)
        full = full.to(self.device)
        # every entry has exactly one nonzero contributor, so this sum is exact in any order
        self.dist.all_reduce(full)
        return _ordered_sums(full.tolist())

    def barrier(self) -> None:
        self.dist.barrier()

    def check_same(self, what: str, value: str) -> None:
        values: list[Any] = [None] * self.world
        self.dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            raise ConfigError(
                f"ranks disagree on the {what}: every process must load the same model with the same "
                "settings."
            )


def current_comm() -> Comm:
    """The running process group (started from ``torchrun``'s variables if need be), else one process."""
    import torch.distributed as dist

    if not dist.is_available():
        return Comm()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Comm()
        init_from_env()
    return TorchComm() if dist.get_world_size() > 1 else Comm()


def init_from_env(backend: str | None = None) -> None:
    """Start the process group from the launcher's variables (RANK, WORLD_SIZE, MASTER_ADDR, …).

    NCCL when CUDA is available, gloo otherwise; each rank takes the GPU ``LOCAL_RANK``.
    """
    import torch.distributed as dist

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
