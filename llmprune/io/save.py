"""The checkpoint writers: ``save_pruned`` (a model in memory) and ``save_streamed`` (pruned blocks
already on disk, from ``prune(streaming=True)``), shared by ``--output_dir`` and the Python API.

The weights go out as a plain Hugging Face safetensors checkpoint with exact zeros and nothing about
sparsity in ``config.json``: vLLM and transformers now reject configs that carry sparsity metadata.
What llmprune knows about the run is written beside the weights by one provenance writer
(``io/provenance.py``: sparsity.json, recipe.yaml, run_info.json, masks.safetensors, README.md).

Everything is written into a temporary sibling folder first and swapped into place at the end
(``io/atomic.py``), so a failure leaves the previous contents of ``output_dir`` (and the input model)
untouched.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from torch import nn

from llmprune.calibration.modules import WeightView, find_blocks, prunable_linears
from llmprune.errors import ConfigError
from llmprune.io.atomic import atomic_folder, link_or_copy
from llmprune.io.masks import (  # noqa: F401 - re-exported: checkpoint readers import them from here
    MASKS_FORMAT,
    load_keep_masks,
    pack_bits,
    read_packed_keep_masks,
    save_keep_masks,
    unpack_bits,
    write_packed_keep_masks,
)
from llmprune.io.models import clear_quantization
from llmprune.io.output_dir import check_output_dir as check_folder
from llmprune.io.provenance import (  # noqa: F401 - sparsity_report re-exported for callers of io.save
    keep_masks_from_weights,
    plain,
    resolved_recipe,
    source_model,
    sparsity_document,
    sparsity_report,
    write_json,
    write_provenance,
)
from llmprune.io.safetensors import (
    INDEX_NAME,
    read_header,
    read_tensors,
    save_tensors,
    tensor_entries,
    write_index,
)
from llmprune.io.weights import check_format, write_weights
from llmprune.result import PruneResult

log = logging.getLogger(__name__)

#: config.json keys that make serving stacks treat the checkpoint as compressed or sparse
_FORBIDDEN_CONFIG_KEYS = ("quantization_config", "sparsity_config", "compression_config")
#: a streamed model has no tokenizer object: its files are copied from the source folder
_TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
)


# ---------------------------------------------------------------- the output folder


def check_output_dir(output_dir: Path, model: nn.Module | None = None, overwrite: bool = False) -> None:
    """Refuse targets whose replacement would destroy something (``llmprune.io.output_dir``'s rules)."""
    sources = {source_model(model), getattr(getattr(model, "config", None), "_name_or_path", None)}
    check_folder(output_dir, overwrite=overwrite, inputs=sources, flag="output_dir")


# ---------------------------------------------------------------- the writer


def _prepare_dense(model: nn.Module) -> None:
    """Make ``save_pretrained`` write one plain dense model: no adapters, no quantization leftovers."""
    if getattr(model, "_hf_peft_config_loaded", False) or hasattr(model, "merge_and_unload"):
        raise ConfigError(
            "the model carries PEFT adapters: merge them first (model = model.merge_and_unload()) so the "
            "checkpoint is one plain model whose zeros are the pruned weights."
        )
    qc = getattr(model.config, "quantization_config", None)
    if qc is None and getattr(model, "hf_quantizer", None) is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if any(not p.dtype.is_floating_point for p in model.parameters()):
        raise ConfigError(
            f"the model holds {method}-quantized weights; llmprune saves dense checkpoints. Fix: load "
            "the model "
            "unquantized (dtype float32 or bfloat16) before pruning."
        )
    log.info("dropping quantization_config (%s): the weights in memory are already dense", method)
    clear_quantization(model)


def _scrub_config(folder: Path) -> None:
    """Remove any compression/sparsity keys that survived into config.json (e.g. from the source)."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    dropped = [k for k in _FORBIDDEN_CONFIG_KEYS if k in config]
    for key in dropped:
        del config[key]
    if dropped:
        log.info("removed %s from config.json", ", ".join(dropped))
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_pruned(
    model,
    tokenizer,
    output_dir: str | Path,
    *,
    result: PruneResult | None = None,
    recipe: dict | Any | None = None,
    run_info: dict | None = None,
    metrics: dict | None = None,
    save_masks: bool = True,
    overwrite: bool = False,
    extra_files: dict[str, Any] | None = None,
    max_shard_size: str = "5GB",
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    private: bool = False,
    token: str | None = None,
    format: str = "dense",
    gguf_type: str = "f16",
) -> Path:
    """Write the pruned model, its provenance and its model card to ``output_dir``, atomically.

    ``format`` is ``dense`` (a plain checkpoint), ``compressed`` (llmprune's sparse safetensors layout,
    ``docs/format.md``; read back by ``llmprune.load_model``) or ``gguf`` (one llama.cpp file of
    ``gguf_type`` f16, bf16, q8_0 or f32).

    ``recipe`` is a dict or a ``llmprune.recipe.Recipe``. ``run_info`` entries are merged into
    ``run_info.json`` (e.g. ``command``, ``base_model``, ``license``); ``metrics`` is free-form, e.g.
    ``{"perplexity": {"dense": 12.1, "pruned": 14.3, "dataset": "wikitext2", "seq_len": 512}}``.
    An existing ``output_dir`` is replaced only if an earlier llmprune run wrote it and ``overwrite=True``;
    a folder holding anything else is refused (``llmprune.io.output_dir``).
    ``extra_files`` maps file names to JSON documents written beside the weights (``structure.json``).

    >>> save_pruned(model, tok, "out/wanda-50", result=result, metrics=metrics)  # doctest: +SKIP
    PosixPath('out/wanda-50')
    """
    out = Path(output_dir).expanduser()
    if push_to_hub and not hub_model_id:
        raise ConfigError(
            "push_to_hub=True needs hub_model_id, e.g. hub_model_id='your-name/model-wanda-50'."
        )
    check_output_dir(out, model, overwrite)
    check_format(format, gguf_type, model)
    _prepare_dense(model)
    start = time.perf_counter()
    recipe = resolved_recipe(recipe, result)
    sparsity = sparsity_report(model, result)
    write_masks = None
    if save_masks:
        solved = result is not None and result.keep_masks
        keep_masks = dict(result.keep_masks) if solved else keep_masks_from_weights(model, result)
        if keep_masks:
            write_masks = functools.partial(save_keep_masks, keep_masks)
    with atomic_folder(out.resolve()) as staging:  # through a symlink, replace what it points at
        weights_format = None
        if format == "dense":
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        else:
            weights_format = write_weights(model, tokenizer, staging, format=format, gguf_type=gguf_type)
        if format != "gguf":  # a GGUF file holds its config and tokenizer
            _scrub_config(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        write_provenance(
            staging,
            model,
            result,
            sparsity=sparsity,
            recipe=recipe,
            run_info={**(run_info or {}), **({"weights_format": weights_format} if weights_format else {})},
            metrics=metrics,
            write_masks=write_masks,
            model_name=hub_model_id,
            started=start,
        )
        for name, document in (extra_files or {}).items():  # e.g. structure.json
            write_json(staging / name, plain(document))
    log.info("saved pruned checkpoint to %s (%.1f%% sparse)", out, 100 * sparsity["overall_sparsity"])
    if push_to_hub:
        from llmprune.io.hub import push_to_hub as push

        push(out, hub_model_id, private=private, token=token)
    return out


def save_streamed(
    model: nn.Module,
    tokenizer,
    output_dir: str | Path,
    *,
    result: PruneResult,
    block_files: list[Path],
    keep_mask_files: list[Path],
    source_folder: Path,
    recipe: dict | Any | None = None,
    run_info: dict | None = None,
) -> Path:
    """Write a model whose pruned blocks are already on disk (``block_files[i]``: block ``i``'s tensors
    under their model names; ``keep_mask_files[i]``: its keep-masks) to ``output_dir``, atomically.

    ``model`` holds everything outside the blocks (its blocks may be on the meta device). The output is
    an ordinary sharded checkpoint, one shard per block plus one for the rest, with the provenance
    ``save_pruned`` writes. Block files are hard-linked (no copy) when the file system allows it.
    """
    from llmprune.calibration.skeleton import outside_tensors, saved_names

    out = Path(output_dir).expanduser()
    prefix, blocks = find_blocks(model)
    num = len(blocks)
    names = [f"model-{k:05d}-of-{num + 1:05d}.safetensors" for k in range(1, num + 2)]
    weight_map: dict[str, str] = {}
    total_size = 0
    with atomic_folder(out) as staging:
        rest = saved_names(model, outside_tensors(model, prefix))
        save_tensors(staging / names[0], rest)
        weight_map.update(dict.fromkeys(rest, names[0]))
        total_size += sum(t.numel() * t.element_size() for t in rest.values())
        shards = []
        for i in range(num):
            shard = staging / names[i + 1]
            link_or_copy(block_files[i], shard)
            shards.append(shard)
            for key, info in tensor_entries(read_header(shard)[1]).items():
                weight_map[key] = names[i + 1]
                total_size += info["data_offsets"][1] - info["data_offsets"][0]
        write_index(staging / INDEX_NAME, weight_map, total_size)
        model.config.save_pretrained(staging)
        _scrub_config(staging)
        if (source_folder / "generation_config.json").is_file():
            shutil.copyfile(source_folder / "generation_config.json", staging / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        else:
            for pattern in _TOKENIZER_FILES:
                for f in source_folder.glob(pattern):
                    shutil.copyfile(f, staging / f.name)
        per_block = [[n for n in result.modules if n.startswith(f"{prefix}.{i}.")] for i in range(num)]
        # every Linear of the blocks, the ones the selection left dense too: they count in overall_sparsity
        every = [[f"{prefix}.{i}.{n}" for n in prunable_linears(block)] for i, block in enumerate(blocks)]
        sparsity = sparsity_document(_written_weights(model, shards, every), result)
        write_masks = None
        if result.modules:
            shapes = {n: list(result.modules[n].shape) for names in per_block for n in names}
            packed = _packed_masks(keep_mask_files, per_block)
            write_masks = functools.partial(write_packed_keep_masks, shapes=shapes, packed=packed)
        write_provenance(
            staging,
            model,
            result,
            sparsity=sparsity,
            recipe=resolved_recipe(recipe, result),
            run_info={"streaming": True, **(run_info or {})},
            write_masks=write_masks,
        )
    return out


def _written_weights(model: nn.Module, shards: list[Path], per_block: list[list[str]]):
    """(name, (out, in) weight) of the named matrices, read back from the written shards one at a time."""
    for shard, names in zip(shards, per_block, strict=True):
        for name in names:
            weight = read_tensors(shard, {"w": f"{name}.weight"})["w"]
            yield name, (weight.t() if WeightView(model.get_submodule(name)).transposed else weight)


def _packed_masks(keep_mask_files: list[Path], per_block: list[list[str]]):
    """Packed keep-masks, block by block: a model larger than memory has masks larger than memory too."""
    for path, names in zip(keep_mask_files, per_block, strict=True):
        if names:
            block = read_packed_keep_masks(path, names)
            yield from (block[n] for n in names)
