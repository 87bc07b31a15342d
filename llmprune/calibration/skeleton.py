"""A model without its decoder blocks: everything else real, the blocks on the meta device.

What streaming needs before it can prune a checkpoint larger than memory. The model is built with
accelerate's ``init_empty_weights()``, which leaves *buffers* real: non-persistent buffers such as
rotary ``inv_freq`` are not in the checkpoint, and this way transformers computes them as usual
instead of us guessing how. Everything outside the blocks (embeddings, final norm, an untied
``lm_head``) is then read from the shards; tied weights are tied again by the model's own mapping.
Tensor names go through transformers' own renaming rules both ways (:func:`checkpoint_names` on read,
:func:`saved_names` on write), so a streamed model reads and writes what ``from_pretrained`` and
``save_pretrained`` would.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import find_blocks
from llmprune.errors import ModelLoadError
from llmprune.io.safetensors import ShardReader


def resolve_folder(model: str | os.PathLike) -> Path:
    """A local checkpoint folder for ``model``: a folder, the embedded default, or a Hub snapshot."""
    from llmprune.io.models import _EMBEDDED, embedded_model_path

    name = str(model)
    path = Path(name).expanduser()
    if name in _EMBEDDED:
        return embedded_model_path(name)
    if path.suffix == ".gguf":
        raise ModelLoadError(
            "a .gguf file cannot be streamed (it must be dequantized whole). Fix: load_model() it and "
            "save_pretrained() a safetensors folder once, then stream that folder."
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} holds no config.json: point model at a Hugging Face checkpoint folder."
            )
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as exc:
        raise ModelLoadError(f"could not find model {name!r} as a folder or on the Hub ({exc}).") from exc


def build_skeleton(
    folder: Path, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[nn.Module, ShardReader, dict[str, str]]:
    """The model with real non-block tensors (from the shards) and decoder blocks on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise ModelLoadError(
            f"{folder} is a quantized checkpoint: streaming prunes dense safetensors weights only."
        )
    reader = ShardReader(folder)
    with init_empty_weights(include_buffers=False):  # buffers real: rotary tables are computed, not loaded
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config._name_or_path = str(folder)
    prefix, _ = find_blocks(model)
    names = checkpoint_names(model, reader)
    state = model.state_dict(keep_vars=True)
    outside = [n for n in state if not n.startswith(prefix + ".")]
    found = {n: names[n] for n in outside if n in names}
    missing = [n for n in outside if n not in names]
    for name, tensor in reader.read(found).items():
        set_tensor(model, name, tensor.to(state[name].dtype))
    tied = (
        model.get_expanded_tied_weights_keys(all_submodels=True)
        if hasattr(model, "get_expanded_tied_weights_keys")
        else {}
    )
    for target, source in tied.items():  # the checkpoint holds one of each tied pair: share it
        if target in missing and source in found:
            set_tensor(model, target, model.get_parameter(source))
            missing.remove(target)
        elif source in missing and target in found:
            set_tensor(model, source, model.get_parameter(target))
            missing.remove(source)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    absent = [n for n in missing if n in params]
    if absent:
        raise missing_error(folder, model, absent)
    return model, reader, names


def _tied_targets(model: nn.Module) -> set[str]:
    if not hasattr(model, "get_expanded_tied_weights_keys"):
        return set()
    return set(model.get_expanded_tied_weights_keys(all_submodels=True))


def outside_tensors(model: nn.Module, prefix: str) -> dict[str, Tensor]:
    """Non-block tensors to save, each storage once: a tied ``lm_head`` is saved as the embeddings it is."""
    tied = _tied_targets(model)
    groups: dict[tuple, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        if not name.startswith(prefix + "."):
            groups.setdefault(
                (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []
            ).append(name)
    out = {}
    for names in groups.values():
        keep = [n for n in names if n not in tied] or names
        out[keep[0]] = state[keep[0]].detach().cpu().contiguous()
    return out


def set_tensor(root: nn.Module, name: str, tensor: Tensor) -> None:
    """Put ``tensor`` in place of parameter or buffer ``name`` (no copy; parameters stay frozen)."""
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = (
            tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
        )
    else:
        module._buffers[leaf] = tensor


def checkpoint_names(model: nn.Module, reader: ShardReader) -> dict[str, str]:
    """Model tensor name -> checkpoint key, through transformers' own renaming rules.

    transformers 5 renames some keys on load (GPT-NeoX's ``embed_out`` is ``lm_head``, legacy prefixes…);
    its rules are reused so a streamed model sees exactly what ``from_pretrained`` would. Layouts that
    transformers *converts* (several tensors fused into one, e.g. MoE experts) cannot be read one block
    at a time and are refused.
    """
    meta = model.state_dict()
    base = getattr(model, "base_model_prefix", None) or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # older transformers: names are stored as they are
        return {k: k for k in reader.weight_map if k in meta}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    names: dict[str, str] = {}
    for key in reader.weight_map:
        name, pattern = rename_source_key(key, renamings, converters, base, meta)
        if name not in meta and key in meta:
            name, pattern = rename_source_key(key, [], [], base, meta)
        if pattern is not None:
            raise ModelLoadError(
                f"{reader.folder} stores {key!r} in a layout transformers converts on load (e.g. fused "
                "experts); "
                "streaming reads blocks one at a time and cannot. Fix: prune in memory."
            )
        if name in meta:
            names[name] = key
    return names


def saved_names(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` under the names ``save_pretrained`` would write (transformers' renames, reversed)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    return revert_weight_conversion(model, tensors)


def missing_error(folder: Path, model: nn.Module, names: list[str]) -> ModelLoadError:
    return ModelLoadError(
        f"{folder}: the checkpoint has no tensor for {names[:3]}; its tensor names do not match "
        f"{type(model).__name__}'s. Fix: load the model in memory and save_pretrained() it once."
    )
