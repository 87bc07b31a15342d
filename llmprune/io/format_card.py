"""The model-card section that says what format the weights are in and how to load them.

A dense checkpoint loads with plain ``from_pretrained`` (``card.py`` says so). The other two formats
need a sentence each: the compressed one only loads through llmprune, and GGUF through llama.cpp or
``from_pretrained(..., gguf_file=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def format_tag(weights_format: Mapping[str, Any] | None) -> str | None:
    fmt = (weights_format or {}).get("format")
    return {"compressed": "llmprune-compressed", "gguf": "gguf"}.get(fmt or "")


def _folder_lines(repo: str) -> list[str]:
    """A Hub repository is downloaded first: llmprune reads compressed folders from disk."""
    if "/" in repo and not repo.startswith("path/"):
        return ["from huggingface_hub import snapshot_download", "", f'folder = snapshot_download("{repo}")']
    return [f'folder = "{repo}"']


def format_section(weights_format: Mapping[str, Any] | None, repo: str) -> list[str] | None:
    """Card lines for a compressed or GGUF folder (None for dense, which the card already covers)."""
    fmt = (weights_format or {}).get("format")
    if fmt == "compressed":
        return [
            "## Format: llmprune compressed (sparse safetensors)",
            "",
            f"The weights are in `{weights_format.get('file')}`, in llmprune's compressed sparse layout "
            "(version 1, specified in llmprune's `docs/format.md`): each pruned matrix is stored as a "
            "bit-packed keep-mask plus its kept values, or as N:M values plus their in-group positions; "
            "every other tensor as is. Decoding is lossless (bit-identical to the dense weights).",
            "",
            "Plain `transformers` cannot read this file and refuses the folder (it finds no "
            "`model.safetensors`). Load it with llmprune, or turn it back into a plain checkpoint:",
            "",
            "```python",
            "import llmprune",
            *_folder_lines(repo),
            "model, tok = llmprune.load_model(folder)",
            "```",
            "",
            "```bash",
            "llmprune export path/to/this/folder --format dense --output_dir ./dense",
            "```",
            "",
        ]
    if fmt == "gguf":
        name = weights_format.get("file", "model.gguf")
        return [
            f"## Format: GGUF ({weights_format.get('gguf_type')})",
            "",
            f"The weights, tokenizer and chat template are in `{name}`, for llama.cpp and the tools built "
            "on it (architecture `" + str(weights_format.get("architecture")) + "`). The pruned weights are "
            "zeros inside ordinary matrices, so the file is as large and as fast as a dense GGUF of the "
            "same type; a structurally shrunk model is smaller and faster.",
            "",
            "```bash",
            f"llama-cli -m {name} -p 'Hello'",
            "```",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", gguf_file="{name}")',
            f'tok = AutoTokenizer.from_pretrained("path/to/this/folder", gguf_file="{name}")',
            "```",
            "",
        ]
    return None
