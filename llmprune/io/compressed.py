"""llmprune's compressed sparse checkpoint: pruned matrices stored without their zeros, in safetensors.

A half-empty matrix stored densely weighs as much as a full one. Here every 2-D floating tensor is
stored in whichever of three encodings is smallest (ties go to the first):

* ``dense``   - the tensor as is, under its own name;
* ``bitmask`` - ``NAME:keep`` (one bit per element, row-major, first element in the high bit of
  byte 0) and ``NAME:values`` (the stored elements in row-major order);
* ``nm``      - N:M along the last dimension: ``NAME:values`` (exactly N per group of M, in order) and
  ``NAME:nm_subsets`` (which N of the M positions, as the rank of that subset among all C(M, N)
  subsets in lexicographic order, each rank in the fewest bits that hold C(M, N) - 1, big-endian
  bit stream).

An element is *stored* when its bits are not all zero, so ``-0.0`` and NaN survive and a decoded
tensor is bit-identical to the one written. The safetensors header carries the format name, the
version, an index of every logical tensor (encoding, shape) and a SHA-256 of every stored tensor
and of the index itself, so a truncated or edited file fails with one line instead of loading
wrong weights. The full byte layout is in ``docs/format.md``.

The file is called ``llmprune-compressed.safetensors``, never ``model.safetensors``: plain
``from_pretrained`` finds no weights in the folder and refuses it instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from functools import cache
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmprune.errors import ModelLoadError
from llmprune.io.masks import pack_bits, unpack_bits

FORMAT = "llmprune.compressed"
VERSION = 1
WEIGHTS_NAME = "llmprune-compressed.safetensors"
#: group sizes M tried for the ``nm`` encoding (groups run along the last dimension)
NM_GROUP_SIZES = (4, 8)
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_REEXPORT = "re-export it with `llmprune export SOURCE --format compressed`"


class CompressedFormatError(ModelLoadError):
    """A compressed checkpoint is truncated, modified, or of a version this llmprune cannot read."""


# ---------------------------------------------------------------- bits


def pack_codes(codes: Tensor, width: int) -> Tensor:
    """Unsigned integers (k,) -> a big-endian stream of ``width``-bit fields, packed 8 bits a byte."""
    shifts = torch.arange(width - 1, -1, -1, dtype=torch.int64)  # most significant bit first
    bits = (codes.reshape(-1, 1).to(torch.int64) >> shifts) & 1  # (k, width)
    return pack_bits(bits.bool())


def unpack_codes(packed: Tensor, count: int, width: int) -> Tensor:
    """Inverse of ``pack_codes``: ``count`` fields of ``width`` bits as int64 (count,)."""
    bits = unpack_bits(packed, (count * width,)).reshape(count, width).to(torch.int64)
    return (bits << torch.arange(width - 1, -1, -1, dtype=torch.int64)).sum(-1)


def stored(tensor: Tensor) -> Tensor:
    """True where an element's bits are not all zero (so -0.0 and NaN count as stored)."""
    return tensor.contiguous().view(_SAME_WIDTH_INT[tensor.element_size()]) != 0


# ---------------------------------------------------------------- N:M subsets


def subset_width(n: int, m: int) -> int:
    """Bits per group: the fewest that hold every rank 0 .. C(m, n) - 1 (at least 1)."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


@cache
def nm_subsets(n: int, m: int) -> tuple[Tensor, Tensor]:
    """(C(m, n), n) positions of every subset in lexicographic order, and a 2**m lookup mask -> rank."""
    table = torch.tensor(list(combinations(range(m), n)), dtype=torch.int64)  # (C, n)
    rank_of = torch.full((1 << m,), -1, dtype=torch.int64)
    keys = (torch.ones_like(table) << (m - 1 - table)).sum(-1)  # position 0 = high bit of the key
    rank_of[keys] = torch.arange(len(table))
    return table, rank_of


def encode_nm(tensor: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """(values (G*n,), packed subset ranks) of a tensor whose every group of ``m`` holds <= n stored."""
    groups = tensor.reshape(-1, m)  # (G, m)
    keep = stored(groups)
    if int(keep.sum(-1).max()) > n:
        raise ValueError(f"a group of {m} holds more than {n} stored elements")
    position = torch.arange(m)
    priority = keep.to(torch.int64) * (2 * m) + (m - position)  # stored first, then the lowest zeros
    chosen = priority.topk(n, dim=-1).indices.sort(dim=-1).values  # (G, n), ascending
    values = groups.gather(-1, chosen).reshape(-1)
    _, rank_of = nm_subsets(n, m)
    ranks = rank_of[(torch.ones_like(chosen) << (m - 1 - chosen)).sum(-1)]  # (G,)
    return values, pack_codes(ranks, subset_width(n, m))


def decode_nm(values: Tensor, packed: Tensor, shape: list[int], n: int, m: int) -> Tensor:
    numel = math.prod(shape)
    num_groups = numel // m
    ranks = unpack_codes(packed, num_groups, subset_width(n, m))
    table, _ = nm_subsets(n, m)
    if num_groups and int(ranks.max()) >= len(table):
        raise ValueError(f"a subset rank exceeds C({m}, {n}) - 1")
    out = torch.zeros(num_groups, m, dtype=values.dtype)
    out.scatter_(-1, table[ranks], values.reshape(num_groups, n))  # (G, m)
    return out.reshape(shape)


# ---------------------------------------------------------------- one tensor


def _encoded_bytes(tensor: Tensor) -> list[tuple[int, str, dict[str, int]]]:
    """(bytes, encoding, parameters) of every encoding that applies, dense first."""
    size = tensor.element_size()
    numel = tensor.numel()
    options = [(numel * size, "dense", {})]
    if tensor.dim() != 2 or not tensor.is_floating_point() or numel == 0:
        return options
    keep = stored(tensor)
    options.append((math.ceil(numel / 8) + int(keep.sum()) * size, "bitmask", {}))
    for m in NM_GROUP_SIZES:
        if tensor.shape[-1] % m:
            continue
        n = max(1, int(keep.reshape(-1, m).sum(-1).max()))
        if n < m:
            groups = numel // m
            options.append(
                (groups * n * size + math.ceil(groups * subset_width(n, m) / 8), "nm", {"n": n, "m": m})
            )
    return options


def encode(name: str, tensor: Tensor) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(index entry, stored tensors) of one tensor in its smallest encoding."""
    tensor = tensor.detach().cpu().contiguous()
    _, encoding, params = min(_encoded_bytes(tensor), key=lambda option: option[0])  # first of equals
    entry = {"encoding": encoding, "shape": list(tensor.shape), **params}
    if encoding == "dense":
        return entry, {name: tensor}
    if encoding == "bitmask":
        keep = stored(tensor)
        return entry, {f"{name}:keep": pack_bits(keep), f"{name}:values": tensor[keep].contiguous()}
    values, ranks = encode_nm(tensor, params["n"], params["m"])
    return entry, {f"{name}:values": values, f"{name}:nm_subsets": ranks}


def decode(name: str, entry: Mapping[str, Any], parts: Mapping[str, Tensor]) -> Tensor:
    """Inverse of ``encode``; raises ValueError when the parts do not fit the entry."""
    shape = [int(s) for s in entry["shape"]]
    numel = math.prod(shape)
    encoding = entry["encoding"]
    if encoding == "dense":
        tensor = parts[name]
        if list(tensor.shape) != shape:
            raise ValueError(f"shape {list(tensor.shape)} differs from the index {shape}")
        return tensor
    values = parts[f"{name}:values"]
    if encoding == "bitmask":
        packed = parts[f"{name}:keep"]
        if packed.numel() != math.ceil(numel / 8):
            raise ValueError("the keep-mask has the wrong length")
        keep = unpack_bits(packed, (numel,)).numpy()
        if np.count_nonzero(keep) != values.numel():
            raise ValueError("the keep-mask and the values disagree in count")
        out = torch.zeros(numel, dtype=_SAME_WIDTH_INT[values.element_size()])  # bit patterns: any dtype
        out.numpy()[keep] = values.view(out.dtype).numpy()  # the True slots, in order
        return out.view(values.dtype).reshape(shape)
    if encoding == "nm":
        n, m = int(entry["n"]), int(entry["m"])
        if not 1 <= n < m or shape[-1] % m or values.numel() != numel // m * n:
            raise ValueError(f"{n}:{m} does not fit shape {shape} and {values.numel()} values")
        packed = parts[f"{name}:nm_subsets"]
        if packed.numel() != math.ceil(numel // m * subset_width(n, m) / 8):
            raise ValueError("the subset ranks have the wrong length")
        return decode_nm(values, packed, shape, n, m)
    raise ValueError(f"unknown encoding {encoding!r}")


# ---------------------------------------------------------------- the file


def _sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _index_digest(index: str, digests: str) -> str:
    return hashlib.sha256(f"{index}\n{digests}".encode()).hexdigest()


def write_compressed(tensors: Mapping[str, Tensor], path: str | Path) -> dict[str, Any]:
    """Write ``tensors`` (name -> tensor, e.g. a state dict without tied copies) to ``path``.

    Returns the index (name -> encoding entry). Memory: the compressed copy of every tensor.

    >>> write_compressed(model.state_dict(), "out/llmprune-compressed.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    index: dict[str, Any] = {}
    stored_tensors: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if ":" in name:
            raise ValueError(f"tensor name {name!r} contains ':', which the compressed format reserves")
        index[name], parts = encode(name, tensor)
        stored_tensors.update(parts)
    index_json = json.dumps(index, sort_keys=True, separators=(",", ":"))
    digests_json = json.dumps(
        {k: _sha256(v) for k, v in stored_tensors.items()}, sort_keys=True, separators=(",", ":")
    )
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "index": index_json,
        "sha256": digests_json,
        "index_sha256": _index_digest(index_json, digests_json),
    }
    save_file(stored_tensors, str(path), metadata=metadata)
    return index


def is_compressed(folder: str | Path) -> bool:
    return (Path(folder) / WEIGHTS_NAME).is_file()


def _fail(path: Path, what: str) -> CompressedFormatError:
    return CompressedFormatError(f"{path}: {what}; {_REEXPORT}.")


def read_index(handle: Any, path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(index, stored-tensor digests) from an open safetensors handle, after checking both."""
    meta = handle.metadata() or {}
    if meta.get("format") != FORMAT:
        raise _fail(path, f"not an llmprune compressed checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CompressedFormatError(
            f"{path}: compressed format version {meta.get('version')!r}, but this llmprune reads version "
            f"{VERSION}: upgrade llmprune (pip install -U llmprune)."
        )
    index_json, digests_json = meta.get("index", ""), meta.get("sha256", "")
    if meta.get("index_sha256") != _index_digest(index_json, digests_json):
        raise _fail(path, "the header's index fails its checksum (the file was modified)")
    index, digests = json.loads(index_json), json.loads(digests_json)
    expected = {
        f"{name}{suffix}"
        for name, entry in index.items()
        for suffix in {"dense": ("",), "bitmask": (":keep", ":values"), "nm": (":values", ":nm_subsets")}.get(
            entry["encoding"], ("",)
        )
    }
    if expected != set(handle.keys()) or expected != set(digests):
        raise _fail(path, "the stored tensors do not match the header's index")
    return index, digests


def _torch_dtype(name: str) -> torch.dtype:
    """safetensors' dtype names (F32, BF16, U8, BOOL, ...) -> torch dtypes."""
    special = {"BOOL": torch.bool, "BF16": torch.bfloat16}
    if name in special:
        return special[name]
    kind = {"F": "float", "I": "int", "U": "uint"}.get(name[:1])
    dtype = getattr(torch, f"{kind}{name[1:]}", None) if kind else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown safetensors dtype {name!r}")
    return dtype


class _PlainReader:
    """A safetensors file read with ordinary file I/O, one tensor at a time.

    ``safe_open`` maps the file, and every page a tensor was read from stays resident until the file is
    closed: loading would need the dense model plus the whole compressed file. Reading into a fresh
    buffer per tensor keeps the peak at the dense model plus one tensor.
    """

    def __init__(self, file: Any) -> None:
        self.file = file
        size = os.fstat(file.fileno()).st_size
        head = file.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        length = struct.unpack("<Q", head)[0]
        if 8 + length > size:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(file.read(length))
        self.meta = header.pop("__metadata__", None) or {}
        self.entries, self.start = header, 8 + length
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        if self.start + end != size:
            raise ValueError(f"{size - self.start} data bytes where the header describes {end}")

    def metadata(self) -> dict[str, str]:
        return self.meta

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, key: str) -> Tensor:
        entry = self.entries[key]
        begin, end = (int(x) for x in entry["data_offsets"])
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self.file.seek(self.start + begin)
        if self.file.readinto(buffer.numpy()) != end - begin:
            raise ValueError(f"tensor {key!r} is cut short")
        return buffer.view(_torch_dtype(entry["dtype"])).reshape(entry["shape"])


def iter_compressed(path: str | Path) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, decoded tensor) one at a time, each checked against its SHA-256 first.

    Peak memory is one stored tensor and its decoded copy, so loading needs the dense model plus one
    tensor. A truncated or edited file raises ``CompressedFormatError`` (one line) before any tensor
    that fails its check is yielded.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CompressedFormatError(f"{path} does not exist: check the path.")
    with open(path, "rb") as file:
        try:
            handle = _PlainReader(file)
            index, digests = read_index(handle, path)
        except (ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:  # incl. JSON errors
            raise _fail(path, f"unreadable safetensors file, probably truncated ({exc})") from None
        for name, entry in index.items():
            parts = {}
            for key in (k for k in digests if k == name or k.startswith(f"{name}:")):
                try:
                    parts[key] = handle.get_tensor(key)
                except (ValueError, KeyError, RuntimeError) as exc:
                    raise _fail(path, f"tensor {key!r} is unreadable ({exc})") from None
                if _sha256(parts[key]) != digests[key]:
                    raise _fail(
                        path, f"tensor {key!r} fails its checksum (the file is corrupt or was modified)"
                    )
            try:
                tensor = decode(name, entry, parts)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise _fail(path, f"tensor {name!r} cannot be decoded ({exc})") from None
            yield name, tensor


def read_compressed(path: str | Path) -> dict[str, Tensor]:
    """Every tensor decoded, as a dict (needs the memory of the whole dense state dict)."""
    return dict(iter_compressed(path))


def index_of(path: str | Path) -> dict[str, Any]:
    """The checked index (name -> encoding entry) without decoding any tensor."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return read_index(handle, path)[0]
    except SafetensorError as exc:
        raise _fail(path, f"unreadable safetensors file, probably truncated ({exc})") from None
