"""Pruning a model larger than memory: decoder blocks stream from the safetensors shards, one at a time.

``open_streamed`` builds the model without its blocks (``skeleton.py``); :class:`StreamingBlocks`
is the engine's ``BlockSource`` that reads each block for its turn (positional reads into owned
memory, see ``io/safetensors.py`` for why not ``safe_open``'s memory maps) and puts it back on the meta
device after it. Peak memory is one block, the calibration activations (spilled to disk past
``max_memory``) and the embeddings, whatever the model's size.

``api.prune(streaming=True)`` drives it: the pruned blocks are recorded as files by
``resume.Progress`` as they finish, and ``io.save.save_streamed`` assembles the output folder from
them (hard links, no copy), so ``resume=True`` continues a killed run without redoing finished blocks.

>>> llmprune.prune("./llama-70b", streaming=True, output_dir="./llama-70b-2of4", method="wanda",
...                sparsity="2:4", max_memory="16GB", resume=True)        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from llmprune.calibration.engine import BlockSource
from llmprune.calibration.modules import find_blocks
from llmprune.calibration.skeleton import build_skeleton, missing_error, resolve_folder, set_tensor
from llmprune.io.safetensors import ShardReader
from llmprune.libc import trim_heap

log = logging.getLogger(__name__)


class StreamingBlocks(BlockSource):
    """Blocks live in the shards: read for their turn, back to the meta device after it."""

    streaming = True

    def __init__(self, model: nn.Module, reader: ShardReader, names: dict[str, str]) -> None:
        super().__init__()
        self.reader = reader
        self.prefix, self.blocks = find_blocks(model)
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.keys: list[dict[str, str]] = []
        for i, block in enumerate(self.blocks):  # check every block's tensors exist before any work
            prefix = f"{self.prefix}.{i}."
            wanted = [prefix + k for k in block.state_dict(keep_vars=True)]
            absent = [n for n in wanted if n not in names and n in params]  # buffers may keep built values
            if absent:
                raise missing_error(reader.folder, model, absent)
            self.keys.append({n[len(prefix) :]: names[n] for n in wanted if n in names})

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        current = block.state_dict(keep_vars=True)
        for rel, tensor in self.reader.read(self.keys[index], device).items():
            set_tensor(block, rel, tensor.to(device=device, dtype=current[rel].dtype))

    def tidy(self) -> None:
        trim_heap()

    def release(self, index: int, block: nn.Module) -> None:
        for module in block.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    module._parameters[key] = nn.Parameter(
                        torch.empty_like(p, device="meta"), requires_grad=False
                    )
        trim_heap()


def open_streamed(
    model: str | os.PathLike, tokenizer, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[nn.Module, object, StreamingBlocks, Path]:
    """(skeleton model, tokenizer, block source, checkpoint folder) for the checkpoint ``model``.

    The tokenizer is the one given, else the folder's own if it has one (token-id datasets need none).
    """
    folder = resolve_folder(model)
    skeleton, reader, names = build_skeleton(folder, dtype, trust_remote_code)
    if tokenizer is None and any(folder.glob("tokenizer*")):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # token-id datasets need no tokenizer
            log.info("no tokenizer in %s (%s)", folder, exc)
    return skeleton, tokenizer, StreamingBlocks(skeleton, reader, names), folder
