"""What may be written where: the rules for an output folder, checked before any work starts.

llmprune deletes only what it wrote. An output folder is replaced whole (atomically), so it is accepted
only when nothing of the user's would go with it:

* a new path, or an empty folder: written;
* a folder that an earlier llmprune run wrote (``sparsity.json`` of llmprune's format) and that holds
  nothing else: replaced only with ``overwrite=True`` (``--overwrite``);
* anything else (a folder with foreign files or subfolders, another model, a file): refused.

A leaf module: it imports nothing of llmprune above ``errors``, so the writers and the checks that run
before loading share it.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable
from pathlib import Path

from llmprune.errors import ConfigError

SPARSITY_FORMAT = "llmprune.sparsity.v1"
#: file names an llmprune checkpoint or report consists of (weights, config, tokenizer, provenance)
WRITTEN_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.gguf",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
    "sparsity.json",
    "recipe.yaml",
    "eval_recipe.yaml",
    "run_info.json",
    "README.md",
    "results.json",
    "results.md",
    "*.png",
)


def is_llmprune_output(path: str | os.PathLike) -> bool:
    """True for a folder an llmprune run wrote: its ``sparsity.json`` is in llmprune's format."""
    try:
        doc = json.loads((Path(path) / "sparsity.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == SPARSITY_FORMAT


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """Names in ``path`` that no llmprune writer produces (subfolders always count)."""
    return sorted(
        p.name
        for p in Path(path).iterdir()
        if p.is_dir() or not any(fnmatch.fnmatch(p.name, pat) for pat in WRITTEN_PATTERNS)
    )


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    flag: str = "--output_dir",
) -> Path:
    """Refuse an output folder whose replacement would lose something, or that cannot be written.

    ``inputs`` are the folders (or files) the run reads: the output may be neither one of them, nor
    inside one, nor around one. Returns the resolved path.
    """
    given = Path(output_dir).expanduser()
    target = given.resolve()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {given} is a file: choose a folder path.")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise ConfigError(f"{flag} {given} lies under {existing}, which is a file: choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK) or (target.is_dir() and not os.access(target, os.W_OK)):
        where = target if target.is_dir() else existing
        raise ConfigError(f"{flag} {given}: {where} is not writable: choose a folder you can write to.")
    for source in inputs:
        if not source:
            continue
        src = Path(str(source)).expanduser()
        if not src.exists():
            continue  # a Hub id or a model built in memory
        src = src.resolve()
        if target == src or target in src.parents or src in target.parents:
            raise ConfigError(
                f"{flag} {given} overlaps the folder that holds the model being pruned ({source}): writing "
                "there would change the input model. Fix: choose a separate folder, e.g. --output_dir "
                "./pruned-model."
            )
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ConfigError(f"{flag} {given} is (or contains) the current directory: choose a subfolder.")
    if not target.is_dir() or not any(target.iterdir()):
        return target
    if not is_llmprune_output(target):
        raise ConfigError(
            f"{flag} {given} exists and was not written by llmprune, which replaces the whole folder. Fix: "
            "choose a new or empty folder."
        )
    foreign = foreign_entries(target)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise ConfigError(
            f"{flag} {given} holds an earlier llmprune output plus files llmprune did not write ({shown}), "
            "which replacing it would delete. Fix: move them out, or choose a new folder."
        )
    if not overwrite:
        raise ConfigError(
            f"{flag} {given} holds an earlier llmprune output. Fix: pass --overwrite (overwrite=True) to "
            "replace it, or choose a new folder."
        )
    return target
