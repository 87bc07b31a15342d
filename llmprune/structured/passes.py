"""Block-sequential passes that gather what structured pruning needs, one block in memory at a time.

The calibration inputs of the first block are captured once (all call arguments, as the unstructured
engine does); then each block is visited in turn: hooks accumulate the statistics of the inputs of its
MLP output projection and attention output projection (``[x; 1][x; 1]ᵀ`` sums, so the Hessian, the mean
and the squared norms come from one fp32 accumulator), the block's own input/output similarity is
measured, and the visitor may edit the block before its outputs become the next block's inputs.

Edits during a pass are *function-equivalent* masks: a removed MLP channel is a zero column of the
output projection, a removed key-value group is zero columns of ``o_proj`` for its query heads, a removed
block is skipped. The smaller model is built once at the end (``surgery.rebuild``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmprune.calibration.capture import BlockInputs, call_block, capture_block_inputs
from llmprune.calibration.modules import WeightView, find_blocks
from llmprune.calibration.stats import StatsAccumulator
from llmprune.solvers.types import HESSIAN
from llmprune.structured.scores import token_cosines

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    """Statistics of one Linear's input over the calibration tokens (all means)."""

    hessian: Tensor  # (in, in) mean x xᵀ
    mean: Tensor  # (in,)
    sq_norms: Tensor  # (in,) mean x_j²
    num_tokens: int


@dataclass
class BlockStats:
    """What one visit measured on a block (before any edit of this visit)."""

    index: int
    inputs: dict[str, InputStats] = field(default_factory=dict)  # by module name relative to the block
    cos_sum: float = 0.0  # Σ_tokens cos(h_in, h_out)
    delta_sq: float = 0.0  # Σ_tokens ‖h_out - h_in‖²
    out_sq: float = 0.0  # Σ_tokens ‖h_out‖²
    num_tokens: int = 0

    @property
    def residual_error(self) -> float:
        """Removing the block: ‖h_out - h_in‖² relative to ‖h_out‖² (the residual-stream unit of auto)."""
        return self.delta_sq / max(self.out_sq, 1e-30)

    @property
    def out_scale(self) -> float:
        """Mean ‖h_out‖² per token: divides a sub-layer's output error into the same relative unit."""
        return self.out_sq / max(self.num_tokens, 1)


class _Tap:
    """Forward pre-hooks accumulating ``[x; 1]`` statistics of chosen Linears' inputs."""

    def __init__(self, block: nn.Module, names: list[str]) -> None:
        self.accs: dict[str, StatsAccumulator] = {}
        self.handles = []
        for name in names:
            module = block.get_submodule(name)
            n = WeightView(module).shape[1] + 1
            self.accs[name] = StatsAccumulator(n, frozenset({HESSIAN}), torch.device("cpu"))
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        self.batch = 0

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().to(torch.float32)
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)  # (..., in + 1)
            self.accs[name].add(x, self.batch)

        return hook

    def remove(self) -> dict[str, InputStats]:
        for h in self.handles:
            h.remove()
        out = {}
        for name, acc in self.accs.items():
            s = acc.result()
            H = s.hessian  # (in + 1, in + 1)
            out[name] = InputStats(H[:-1, :-1], H[:-1, -1].clone(), H.diagonal()[:-1].clone(), s.num_tokens)
        return out


@torch.no_grad()
def measure_block(
    block: nn.Module, index: int, inputs: BlockInputs, tap: list[str]
) -> tuple[BlockStats, list]:
    """Run the block on every calibration batch: input statistics of ``tap`` modules and in/out similarity.

    Returns the stats and the block's outputs (one tensor per batch).
    """
    stats = BlockStats(index)
    t = _Tap(block, tap) if tap else None
    outputs = []
    try:
        for b in range(len(inputs)):
            if t is not None:
                t.batch = b
            h_in = inputs.hidden[b]
            h_out = call_block(block, h_in, inputs.args[b], inputs.kwargs[b])
            stats.cos_sum += float(token_cosines(h_in, h_out).sum())
            stats.delta_sq += float((h_out - h_in).double().pow(2).sum())
            stats.out_sq += float(h_out.double().pow(2).sum())
            stats.num_tokens += h_in.numel() // h_in.shape[-1]
            outputs.append(h_out)
    finally:
        if t is not None:
            stats.inputs = t.remove()
    return stats, outputs


#: visit(index, block, inputs) -> the block's outputs per batch (``inputs.hidden`` itself if removed)
Visitor = Callable[[int, nn.Module, BlockInputs], list]


@torch.no_grad()
def block_pass(
    model: nn.Module,
    input_ids: Tensor,
    visit: Visitor,
    *,
    batch_size: int = 8,
    desc: str = "structured",
    progress: bool = True,
) -> None:
    """Capture the first block's inputs, then for each block let ``visit`` measure (and maybe edit) it
    and return its outputs, which become the next block's inputs. A removed block returns its inputs.
    """
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], input_ids, batch_size)
    for i, block in enumerate(tqdm(blocks, desc=desc, leave=False, disable=not progress)):
        inputs.hidden = visit(i, block, inputs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
    """The block's outputs on every calibration batch (after any edit)."""
    return [call_block(block, inputs.hidden[b], inputs.args[b], inputs.kwargs[b]) for b in range(len(inputs))]
