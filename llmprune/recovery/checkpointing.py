"""Gradient checkpointing per decoder block, in eval mode and for any architecture the engine knows.

Why: the backward of a whole model keeps every block's activations alive at once (about 10 k floats per
token per block: 1.2 GB for 4 × 256 tokens on SmolLM2's 30 blocks). With each block's forward run under
``torch.utils.checkpoint`` only the block inputs are kept and one block's activations are rebuilt at a
time during backward, for about one more forward of compute. transformers' own switch only acts in
training mode, and recovery trains in eval mode (no dropout), so the blocks are wrapped here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmprune.recovery.masking import decoder_blocks


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False  # a cache written in the forward would be written again in the replay
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every decoder block's forward is checkpointed; the original forwards come back."""
    blocks = [block for _, block in decoder_blocks(model)] if enabled else []
    saved = [block.__dict__.get("forward") for block in blocks]  # an instance forward set by someone else
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield
    finally:
        for block, own in zip(blocks, saved, strict=True):
            if own is None:
                del block.forward  # the class's forward shows again
            else:
                block.forward = own
