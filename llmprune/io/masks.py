"""Keep-masks on disk: bool ``(out, in)`` tensors (True = kept), 8 per byte, shapes in the header.

``masks.safetensors`` beside a pruned checkpoint holds one uint8 tensor per pruned matrix, the first
element in the high bit (``numpy.packbits`` order), and its shape in the metadata. A leaf module: it
imports nothing of llmprune above ``errors`` (and its sibling leaf ``io.safetensors``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llmprune.errors import ModelLoadError
from llmprune.io.safetensors import read_tensors, write_tensors

MASKS_FORMAT = "llmprune.keep_masks.v1"
MASKS_FILE = "masks.safetensors"


def pack_bits(keep: Tensor) -> Tensor:
    """bool, any shape -> uint8 (ceil(numel / 8),); first element in the high bit (``numpy.packbits``)."""
    return torch.from_numpy(np.packbits(keep.detach().reshape(-1).cpu().numpy().astype(np.bool_)))


def unpack_bits(packed: Tensor, shape: tuple[int, ...] | list[int]) -> Tensor:
    """Inverse of ``pack_bits``: uint8 (k,) -> bool ``shape``."""
    numel = math.prod(int(s) for s in shape)
    bits = np.unpackbits(packed.reshape(-1).cpu().numpy(), count=numel).view(np.bool_)
    return torch.from_numpy(bits).reshape(tuple(int(s) for s in shape))


def packed_size(shape: tuple[int, ...] | list[int]) -> int:
    return -(-math.prod(int(s) for s in shape) // 8)


def _metadata(shapes: Mapping[str, list[int]]) -> dict[str, str]:
    return {"format": MASKS_FORMAT, "bit_order": "big", "shapes": json.dumps(dict(shapes))}


def save_keep_masks(keep_masks: Mapping[str, Tensor], path: str | Path) -> None:
    """Write bool keep-masks (True = kept) bit-packed, with their shapes in the safetensors header."""
    shapes = {name: list(k.shape) for name, k in keep_masks.items()}
    packed = (pack_bits(k.detach().cpu().bool()) for k in keep_masks.values())
    write_packed_keep_masks(Path(path), shapes, packed)


def write_packed_keep_masks(path: Path, shapes: Mapping[str, list[int]], packed: Iterable[Tensor]) -> None:
    """The keep-mask file from already packed masks, in ``shapes``' order, one at a time (``packed``
    may be a generator: a model larger than memory has masks larger than memory too)."""
    layout = [(name, torch.uint8, [packed_size(shape)]) for name, shape in shapes.items()]
    write_tensors(path, layout, packed, _metadata(shapes))


def read_packed_keep_masks(path: Path, names: Iterable[str]) -> dict[str, Tensor]:
    """``{name: packed uint8}`` for ``names``, without unpacking (to copy them into another file)."""
    return read_tensors(path, {n: n for n in names})


def load_keep_masks(path: str | Path) -> dict[str, Tensor]:
    """Bool keep-masks (True = kept), keyed by module name, exactly as they were saved.

    >>> keep_masks = load_keep_masks("out/masks.safetensors")  # doctest: +SKIP
    >>> keep_masks["model.layers.0.mlp.down_proj"].shape  # doctest: +SKIP
    torch.Size([576, 1536])
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"no keep-masks at {path}: save with save_masks=True (the default) to write them."
        )
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("format") != MASKS_FORMAT:
            raise ModelLoadError(f"{path} is not an llmprune keep-mask file (format {meta.get('format')!r}).")
        shapes = json.loads(meta["shapes"])
        return {name: unpack_bits(handle.get_tensor(name), shapes[name]) for name in handle.keys()}  # noqa: SIM118
