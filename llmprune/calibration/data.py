"""Calibration and evaluation text: many kinds of source, one interface, seeded sampling.

A *source* is any of: ``None`` (the built-in default), a built-in corpus name (``"calibration"``,
``"recovery"``, ``"evaluation"``, which is ``"validation"`` + ``"test"``), a list of strings, a
``datasets.Dataset`` (``text`` column), a tensor of token ids ``(N, L)``, a local ``.txt``/``.jsonl``/
``.json``/``.parquet``/``.csv`` file or a folder of them, a Hub dataset id (``"c4"`` and ``"wikitext2"``
are shorthands for the standard loaders), or ``"self"`` (data-free: text sampled from the model itself).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmprune.errors import DataError

log = logging.getLogger(__name__)

#: built-in public-domain corpora shipped in llmprune/data (see scripts/make_corpora.py)
BUILTIN = {
    "calibration": ("cfi_copyright_does_not_exist", "jargon_file"),
    # what recovery trains on by default: the calibration text plus two literary ones (llmprune/recovery/
    # windows.py says why); one document each, so each is drawn a quarter of the time
    "recovery": ("cfi_copyright_does_not_exist", "jargon_file", "melville_mobydick", "shakespeare_plays"),
    "evaluation": ("austen_prideprejudice", "austen_emma"),
    # the held-out text split once, by novel: defaults are chosen on "validation", tables report "test"
    "validation": ("austen_emma",),
    "test": ("austen_prideprejudice",),
}
_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _builtin_texts(name: str) -> list[str]:
    root = resources.files("llmprune") / "data"
    out = []
    for stem in BUILTIN[name]:
        with (root / f"{stem}.txt.gz").open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
            out.append(fh.read())
    return out


def _hub_texts(name: str, split: str) -> list[str]:
    """The standard research loaders (GPTQ/SparseGPT/Wanda), then any Hub dataset with a text column."""
    from datasets import load_dataset

    if name == "c4":
        files = {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        }
        ds = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
    elif name in ("wikitext2", "wikitext-2"):
        ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    else:
        ds = load_dataset(name, split=split)
    return _dataset_texts(ds)


def _dataset_texts(ds: Any) -> list[str]:
    column = "text" if "text" in ds.column_names else None
    if column is None:
        raise DataError(
            f"dataset has no 'text' column (columns: {ds.column_names}): rename the text column to 'text'."
        )
    return [t for t in ds[column] if t]


def _file_texts(path: Path) -> list[str]:
    from datasets import load_dataset

    files = sorted(p for p in path.rglob("*") if p.suffix in _FILE_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"folder {path} holds no .txt/.jsonl/.json/.parquet/.csv files.")
    kinds = {_FILE_BUILDERS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        raise DataError(f"cannot read {path}: use files of one kind among {', '.join(_FILE_BUILDERS)}.")
    builder = kinds.pop()
    if builder == "text":  # a text file is one document, not one document per line
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    try:
        ds = load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except Exception as exc:  # datasets wraps parse errors of any file in its own types
        raise DataError(
            f"cannot read {path} as {builder} ({type(exc).__name__}): check the file's format, e.g. one JSON "
            'object such as {"text": "..."} per line of a .jsonl file.'
        ) from None
    return _dataset_texts(ds)


def load_texts(source: Any = None, split: str = "train") -> list[str]:
    """Documents of a source as a list of strings (not for token tensors or ``"self"``)."""
    if source is None:
        source = "calibration" if split == "train" else "evaluation"
    if isinstance(source, str):
        if source in BUILTIN:
            texts = _builtin_texts(source)
        elif Path(source).expanduser().exists():
            texts = _file_texts(Path(source).expanduser())
        elif source.endswith(tuple(_FILE_BUILDERS)) or "/" in source and Path(source).suffix:
            raise DataError(f"data file {source} does not exist: check the path.")
        else:
            try:
                texts = _hub_texts(source, split)
            except Exception as exc:
                raise DataError(
                    f"could not load dataset {source!r} ({exc}). Fix: pass a local file or folder, a list of "
                    f"strings, or a built-in corpus ({', '.join(BUILTIN)})."
                ) from exc
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        texts = list(source)
    elif hasattr(source, "column_names"):
        texts = _dataset_texts(source)
    else:
        raise DataError(
            f"cannot use {type(source).__name__} as a text source: pass texts, a path or a dataset."
        )
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"data source {source!r} holds no text: give at least one non-empty document.")
    return texts


def sample_windows(texts: list[str], tokenizer, num_samples: int, seq_len: int, seed: int = 0) -> Tensor:
    """``(num_samples, seq_len)`` token windows the GPTQ way: random document, random offset, seeded.

    Documents shorter than a window are skipped; if none is long enough they are joined with blank
    lines into one stream first, so short-document corpora still work.
    """
    if num_samples < 1 or seq_len < 2:
        raise DataError(
            f"need num_calibration_samples >= 1 and max_seq_length >= 2, got {num_samples}, {seq_len}."
        )
    gen = torch.Generator().manual_seed(seed)
    cache: dict[int, Tensor] = {}

    def tokens(i: int) -> Tensor:
        if i not in cache:
            cache[i] = torch.tensor(
                tokenizer(texts[i], add_special_tokens=False)["input_ids"], dtype=torch.long
            )
        return cache[i]

    lengths = [len(t) for t in texts]  # characters bound tokens from above: skip hopeless documents
    candidates = [i for i, n in enumerate(lengths) if n > seq_len]
    long_docs = [i for i in candidates if len(tokens(i)) > seq_len] if len(candidates) <= 64 else candidates
    windows = []
    while len(windows) < num_samples:
        if not long_docs:  # no document holds a whole window: sample from all of them joined
            if len(texts) == 1 and 0 in cache and len(cache[0]) <= seq_len:
                raise DataError(
                    f"calibration text holds {len(cache[0])} tokens, fewer than one window of {seq_len}: "
                    "give more text or lower max_seq_length."
                )
            texts = ["\n\n".join(texts)]
            cache.clear()
            long_docs = [0]
        pick = int(torch.randint(len(long_docs), (1,), generator=gen))
        ids = tokens(long_docs[pick])
        if len(ids) <= seq_len:  # long in characters, short in tokens: never draw it again
            del long_docs[pick]
            continue
        start = int(torch.randint(len(ids) - seq_len, (1,), generator=gen))
        windows.append(ids[start : start + seq_len])
    return torch.stack(windows)


def self_generated_windows(model, tokenizer, num_samples: int, seq_len: int, seed: int = 0) -> Tensor:
    """Data-free calibration: sample text from the model itself, starting from a random vocabulary token."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = min(len(tokenizer), model.config.vocab_size)
    start = torch.randint(vocab, (num_samples, 1), generator=gen)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            start.to(device),
            attention_mask=torch.ones_like(start, device=device),
            do_sample=True,
            top_p=0.95,
            max_length=seq_len,
            min_length=seq_len,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[:, :seq_len].cpu()


def calibration_tokens(
    source: Any,
    tokenizer,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    model=None,
) -> Tensor:
    """Resolve any source to ``(num_samples, seq_len)`` token ids."""
    if isinstance(source, Tensor):
        if source.dim() != 2 or source.numel() == 0:
            raise DataError(
                f"token tensor must be (num_samples, seq_len) and non-empty, got {tuple(source.shape)}."
            )
        if source.is_floating_point() or source.dtype == torch.bool:
            raise DataError(f"token ids must be integers, got {source.dtype}: pass ids.long().")
        if source.shape[0] < num_samples or source.shape[1] < seq_len:
            log.warning(
                "the token tensor holds %d × %d tokens, fewer than the %d × %d asked for: using them all",
                *source.shape, num_samples, seq_len,
            )  # fmt: skip
        elif tuple(source.shape) != (num_samples, seq_len):
            log.info("using the first %d × %d of the %d × %d tokens", num_samples, seq_len, *source.shape)
        return source[:num_samples, :seq_len].long()
    if isinstance(source, str) and source == "self":
        if model is None:
            raise DataError("dataset='self' needs the model to sample from.")
        return self_generated_windows(model, tokenizer, num_samples, seq_len, seed)
    if tokenizer is None:
        raise DataError("text calibration data needs a tokenizer: pass tokenizer=… or token ids.")
    return sample_windows(load_texts(source, "train"), tokenizer, num_samples, seq_len, seed)


def tokens_hash(tokens: Tensor) -> str:
    """sha256 of the exact token ids used, recorded beside every result for reproducibility."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
