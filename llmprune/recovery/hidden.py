"""Intermediate distillation: the pruned model's block outputs matched to the dense model's.

Why: with a KL on the next-token distribution alone, one scalar per position has to steer the trained
parameters of every block through all the blocks above it. Matching the residual stream after some of
the blocks as well gives each stretch of blocks a target of its own (Kurtic et al. 2023, "Sparse
Fine-tuning for Inference Acceleration of LLMs", SquareHead). The error is taken **per token** and
relative to the dense token's norm, ``‖h − h_dense‖² / ‖h_dense‖²``, averaged over tokens and tapped
blocks: a residual stream holds a few tokens (the first one above all) whose norms are hundreds of times
the others', and a per-layer normalisation would let them decide the whole term.

The dense outputs are recorded once by the teacher pass (``teacher.topk_targets``), so no dense copy is
in memory while training; the pruned model's are read by the same forward hooks during its forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import first_output
from llmprune.errors import ConfigError
from llmprune.recovery.masking import decoder_blocks


def tapped_blocks(num_blocks: int, stride: int) -> tuple[int, ...]:
    """Every ``stride``-th block counted down from the last: 30 blocks, stride 3 → 2, 5, …, 29."""
    if stride < 1:
        raise ConfigError(f"hidden_stride must be >= 1 (1 = every block), got {stride}.")
    return tuple(range(num_blocks - 1, -1, -stride))[::-1]


class BlockOutputs:
    """Forward hooks on the decoder blocks numbered ``indices``; inside ``recording()`` every forward of
    the model leaves their outputs (with their graph) in ``outputs``, in block order."""

    def __init__(self, model: nn.Module, indices: Sequence[int]) -> None:
        blocks = [block for _, block in decoder_blocks(model)] if indices else []
        bad = [i for i in indices if not 0 <= i < len(blocks)]
        if bad:
            raise ConfigError(f"block {bad[0]} does not exist: the model has {len(blocks)} decoder blocks.")
        self.blocks = [blocks[i] for i in indices]
        self.outputs: list[Tensor] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.outputs = []

        def hook(_module, _inputs, output):
            self.outputs.append(first_output(output))

        handles = [block.register_forward_hook(hook) for block in self.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def stacked(self) -> Tensor:
        """``(B, T, L, H)``: the recorded outputs of the last forward, one per tapped block."""
        if len(self.outputs) != len(self.blocks):
            raise RuntimeError(
                f"recorded {len(self.outputs)} block outputs for {len(self.blocks)} tapped blocks: a block "
                "ran more or less than once in the forward."
            )
        return torch.stack(self.outputs, dim=1)


def hidden_error(outputs: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Mean over tapped blocks and tokens of ``‖h − t‖² / ‖t‖²`` (fp32); ``targets`` is ``(B, T, L, H)``,
    ``outputs`` the T tensors ``(B, L, H)`` of the same blocks."""
    if not outputs:
        return torch.zeros((), dtype=torch.float32, device=targets.device)
    errors = []
    for i, h in enumerate(outputs):
        t = targets[:, i].to(device=h.device, dtype=torch.float32)
        errors.append(((h.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(errors).mean()
