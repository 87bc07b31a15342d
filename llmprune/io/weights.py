"""The weights of a saved model in one of three formats, and the way back from the compressed one.

``dense`` is ``save_pretrained``; ``compressed`` is llmprune's sparse safetensors layout
(``llmprune.io.compressed``, spec in ``docs/format.md``); ``gguf`` is one llama.cpp file
(``llmprune.io.gguf_export``). The file formats live in those leaf modules; this module only hands
them a model's tensors and builds a model back from a compressed folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.errors import ConfigError, ModelLoadError
from llmprune.io.compressed import WEIGHTS_NAME, iter_compressed, write_compressed
from llmprune.io.gguf_export import GGUF_TYPES, architecture_of, write_gguf

log = logging.getLogger(__name__)

FORMATS = ("dense", "compressed", "gguf")


def check_format(format: str, gguf_type: str = "f16", model: nn.Module | None = None) -> None:
    """Refuse an unknown format or GGUF type, or an architecture GGUF cannot hold, before any work."""
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}.")
    if format == "gguf":
        if gguf_type not in GGUF_TYPES:
            raise ConfigError(f"unknown gguf_type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}.")
        if model is not None:
            architecture_of(model.config)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied copies (the first name of each shared storage is kept)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (
            tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
            tuple(tensor.shape),
        )
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def gguf_file_name(model: nn.Module, gguf_type: str) -> str:
    source = getattr(model.config, "_name_or_path", "") or model.config.model_type
    stem = Path(str(source).rstrip("/")).name or "model"
    return f"{stem}-{gguf_type}.gguf"


def write_weights(
    model: nn.Module, tokenizer: Any, folder: Path, *, format: str, gguf_type: str = "f16"
) -> dict[str, Any]:
    """Write the weights of ``model`` into ``folder`` as ``compressed`` or ``gguf`` (``dense`` is
    ``save_pretrained``, left to the caller); return a description for ``run_info.json``."""
    if format == "compressed":
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
        index = write_compressed(unique_state_dict(model), folder / WEIGHTS_NAME)
        counts: dict[str, int] = {}
        for entry in index.values():
            counts[entry["encoding"]] = counts.get(entry["encoding"], 0) + 1
        return {"format": "compressed", "file": WEIGHTS_NAME, "encodings": counts}
    if format == "gguf":
        name = gguf_file_name(model, gguf_type)
        written = write_gguf(
            folder / name, model.config, unique_state_dict(model), tokenizer, gguf_type=gguf_type
        )
        return {"format": "gguf", "file": name, **written}
    raise ConfigError(f"write_weights writes compressed or gguf, not {format!r}.")


@torch.no_grad()
def load_compressed_model(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Build the model from ``config.json`` without initialising it, then fill it tensor by tensor.

    Peak memory is the dense model plus one decoded tensor.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    targets = model.state_dict()
    loaded = set()
    for name, tensor in iter_compressed(folder / WEIGHTS_NAME):
        if name not in targets:
            raise ModelLoadError(f"{folder}: tensor {name!r} is not a parameter of {type(model).__name__}.")
        if tuple(targets[name].shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{folder}: tensor {name!r} has shape {list(tensor.shape)}, the model expects "
                f"{list(targets[name].shape)}: config.json and the weights do not belong together."
            )
        targets[name].copy_(tensor)
        loaded.add(name)
    model.tie_weights()
    shared = unique_state_dict(model)
    missing = [n for n in shared if n not in loaded]
    if missing:
        raise ModelLoadError(
            f"{folder}: {len(missing)} tensors are missing from {WEIGHTS_NAME} (first: {missing[0]}); "
            "re-export the checkpoint."
        )
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.config._name_or_path = str(folder)
    model.name_or_path = str(folder)
    return model.eval()
