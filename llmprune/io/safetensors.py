"""The safetensors format, read and written tensor by tensor: one dtype table, one reader, one writer.

Why not the ``safetensors`` package for everything: ``save_file`` serialises every tensor to a
``bytes`` copy first (for a block, or a model's masks, that doubles the memory streaming exists to
save), and ``safe_open`` maps the *whole shard* for every tensor it hands out (one block of nine
tensors cost ~340 MB of address space for 51 MB of data). Here tensors are written straight from their
memory and read with positional reads into memory this process owns.

Layout: 8-byte little-endian header length, a JSON header (``{name: {dtype, shape, data_offsets}}``
plus ``__metadata__``), then the data. A leaf module: it imports nothing of llmprune above ``errors``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmprune.errors import ModelLoadError

#: safetensors dtype name -> torch dtype
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

#: the index of a sharded checkpoint, as transformers names it
INDEX_NAME = "model.safetensors.index.json"


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header) of a safetensors file."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return 8 + size, json.loads(fh.read(size))


def tensor_entries(header: dict[str, Any]) -> dict[str, Any]:
    """The header without its ``__metadata__``: ``{key: {dtype, shape, data_offsets}}``."""
    return {k: v for k, v in header.items() if k != "__metadata__"}


def read_tensors(
    path: Path, keys: Mapping[str, str], device: torch.device | None = None
) -> dict[str, Tensor]:
    """``{name: key in file}`` → ``{name: tensor}``: positional reads into fresh tensors, in file order."""
    start, header = read_header(path)
    out = {}
    with open(path, "rb", buffering=0) as fh:
        for name in sorted(keys, key=lambda n: header[keys[n]]["data_offsets"][0]):
            info = header[keys[name]]
            begin, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            if t.numel():
                fh.seek(start + begin)
                if fh.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                    raise ModelLoadError(f"{path} is truncated at tensor {keys[name]!r}.")
            out[name] = t if device is None or device.type == "cpu" else t.to(device)
    return out


def write_tensors(
    path: Path,
    layout: list[tuple[str, torch.dtype, list[int]]],
    tensors: Iterable[Tensor],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file tensor by tensor: ``layout`` first (the header needs every shape), then
    ``tensors`` in the same order, each straight from its memory (so ``tensors`` may be a generator)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for (name, dtype, shape), t in zip(layout, tensors, strict=True):
            if t.dtype != dtype or list(t.shape) != list(shape):
                raise ValueError(f"{name}: got {t.dtype} {list(t.shape)}, header says {dtype} {shape}")
            flat = t.detach().cpu().contiguous().reshape(-1)
            fh.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")


def save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """``{name: tensor}`` to one file (``format: pt`` metadata, as transformers expects)."""
    layout = [(k, t.dtype, list(t.shape)) for k, t in tensors.items()]
    write_tensors(path, layout, tensors.values(), {"format": "pt", **(metadata or {})})


class ShardReader:
    """Tensors by name from a safetensors checkpoint folder (one file or an index of shards)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if (folder / INDEX_NAME).is_file():
            index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
            self.weight_map: dict[str, str] = index["weight_map"]
        elif (folder / "model.safetensors").is_file():
            _, header = read_header(folder / "model.safetensors")
            self.weight_map = dict.fromkeys(tensor_entries(header), "model.safetensors")
        else:
            raise ModelLoadError(
                f"{folder} holds no safetensors weights (model.safetensors or {INDEX_NAME}); streaming "
                "reads only safetensors. Fix: load the model once and save_pretrained() it, or prune in "
                "memory."
            )

    def read(self, keys: Mapping[str, str], device: torch.device | None = None) -> dict[str, Tensor]:
        """``{model name: checkpoint key}`` → ``{model name: tensor}``, read shard by shard."""
        by_file: dict[str, dict[str, str]] = {}
        for name, key in keys.items():
            by_file.setdefault(self.weight_map[key], {})[name] = key
        out = {}
        for file, names in by_file.items():
            out.update(read_tensors(self.folder / file, names, device))
        return out


def write_index(path: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    """A sharded checkpoint's index: which shard holds each tensor."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
