"""Cheap identities of weights: enough to tell two checkpoints apart, in milliseconds, without reading
everything.

A resumed run must continue on the very weights it started from: two models with the same config and
embeddings but other block weights would otherwise be spliced together. Hashing every byte of a 70 B
model would take minutes; a fixed sample of each tensor (or of each file) catches any real difference
of models, which differ everywhere, not in one weight.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

SAMPLE = 4096  # elements per tensor
CHUNKS, CHUNK_BYTES = 16, 4096  # per file


def tensors_digest(named: Iterable[tuple[str, Tensor]], sample: int = SAMPLE) -> str:
    """sha256 over names, shapes, dtypes and ``sample`` evenly spaced elements of each tensor."""
    h = hashlib.sha256()
    for name, tensor in named:
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if flat.numel():
            index = torch.linspace(0, flat.numel() - 1, min(sample, flat.numel()), device=flat.device).long()
            h.update(flat[index].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over names, sizes and ``CHUNKS`` evenly spaced ``CHUNK_BYTES`` chunks of each file."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        size = path.stat().st_size
        h.update(f"{path.name}:{size};".encode())
        with path.open("rb") as fh:
            for k in range(CHUNKS):
                fh.seek(size * k // CHUNKS)
                h.update(fh.read(CHUNK_BYTES))
    return h.hexdigest()
