"""Pruning a model larger than memory: decoder blocks stream from the safetensors shards, one at a time.

The model is built on the meta device with accelerate's ``init_empty_weights()``, which leaves
*buffers* real: non-persistent buffers such as rotary ``inv_freq`` are not in the checkpoint, and this
way transformers computes them as usual instead of us guessing how. Everything outside the blocks
(embeddings, final norm, an untied ``lm_head``) is then read from the shards; tied weights are tied
again by the model's own mapping. Each block in turn is read (positional reads into owned memory,
see :class:`ShardReader` for why not ``safe_open``'s memory maps), pruned, written as its own shard
and put back on the meta device. Peak memory is one block, the calibration activations
(spilled to disk past ``max_memory``) and the embeddings, whatever the model's size.

The output is an ordinary sharded checkpoint (one shard per block plus one for the rest, with
``model.safetensors.index.json``) beside the same provenance files ``io.save.save_pruned`` writes.
Block shards are written into the progress folder as blocks finish and hard-linked into the output at
the end, so ``resume=True`` continues a killed run without redoing finished blocks.

>>> llmprune.prune("./llama-70b", streaming=True, output_dir="./llama-70b-2of4", method="wanda",
...                sparsity="2:4", max_memory="16GB", resume=True)        # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import shutil
import struct
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.data import tokens_hash
from llmprune.calibration.distributed import current_comm
from llmprune.calibration.engine import BlockSource, EngineConfig, prune_blocks
from llmprune.calibration.modules import WeightView, find_blocks, prunable_linears
from llmprune.calibration.resume import Progress, run_fingerprint, save_tensors, write_safetensors
from llmprune.calibration.settings import calibration_ids
from llmprune.errors import ModelLoadError
from llmprune.io.fingerprint import files_digest
from llmprune.result import PruneResult

log = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
)


_DTYPES = {
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


class ShardReader:
    """Tensors by name from a safetensors checkpoint folder (one file or an index of shards).

    Tensors are read with positional reads into memory this process owns, not memory-mapped:
    ``safe_open`` maps the *whole shard* for every tensor it hands out (one block of nine tensors cost
    ~340 MB of address space for 51 MB of data), which defeats address-space limits and hides what a
    block really costs. Pruning writes every Linear weight anyway, so a private copy costs no extra RSS.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if (folder / _INDEX).is_file():
            self.weight_map: dict[str, str] = json.loads((folder / _INDEX).read_text(encoding="utf-8"))[
                "weight_map"
            ]
        elif (folder / "model.safetensors").is_file():
            _, header = safetensors_header(folder / "model.safetensors")
            self.weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
        else:
            raise ModelLoadError(
                f"{folder} holds no safetensors weights (model.safetensors or {_INDEX}); streaming reads "
                "only safetensors. Fix: load the model once and save_pretrained() it, or prune in memory."
            )

    def read(self, keys: Mapping[str, str], device: torch.device | None = None) -> dict[str, Tensor]:
        """``{model name: checkpoint key}`` → ``{model name: tensor}``, read shard by shard."""
        by_file: dict[str, dict[str, str]] = {}
        for name, key in keys.items():
            by_file.setdefault(self.weight_map[key], {})[name] = key
        out = {}
        for file, names in by_file.items():
            out.update(read_safetensors(self.folder / file, names, device))
        return out


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header) of a safetensors file: 8-byte little-endian length, then JSON."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return 8 + size, json.loads(fh.read(size))


def read_safetensors(
    path: Path, keys: Mapping[str, str], device: torch.device | None = None
) -> dict[str, Tensor]:
    """``{name: key in file}`` → ``{name: tensor}``: positional reads into fresh tensors, in file order."""
    start, header = safetensors_header(path)
    out = {}
    with open(path, "rb", buffering=0) as fh:
        for name in sorted(keys, key=lambda n: header[keys[n]]["data_offsets"][0]):
            info = header[keys[name]]
            begin, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            if t.numel():
                fh.seek(start + begin)
                if fh.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                    raise ModelLoadError(f"{path} is truncated at tensor {keys[name]!r}.")
            out[name] = t if device is None or device.type == "cpu" else t.to(device)
    return out


def _set_tensor(root: nn.Module, name: str, tensor: Tensor) -> None:
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


def _missing_error(folder: Path, model: nn.Module, names: list[str]) -> ModelLoadError:
    return ModelLoadError(
        f"{folder}: the checkpoint has no tensor for {names[:3]}; its tensor names do not match "
        f"{type(model).__name__}'s. Fix: load the model in memory and save_pretrained() it once."
    )


class StreamingBlocks(BlockSource):
    """Blocks live in the shards: read for their turn, back to the meta device after it."""

    streaming = True

    def __init__(self, model: nn.Module, reader: ShardReader, names: dict[str, str]) -> None:
        super().__init__()
        self.reader = reader
        self.prefix, self.blocks = find_blocks(model)
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.keys: list[dict[str, str]] = []
        for i, block in enumerate(self.blocks):  # check every block's tensors exist before any work
            prefix = f"{self.prefix}.{i}."
            wanted = [prefix + k for k in block.state_dict(keep_vars=True)]
            absent = [n for n in wanted if n not in names and n in params]  # buffers may keep built values
            if absent:
                raise _missing_error(reader.folder, model, absent)
            self.keys.append({n[len(prefix) :]: names[n] for n in wanted if n in names})

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        current = block.state_dict(keep_vars=True)
        for rel, tensor in self.reader.read(self.keys[index], device).items():
            _set_tensor(block, rel, tensor.to(device=device, dtype=current[rel].dtype))

    def tidy(self) -> None:
        _trim_heap()

    def release(self, index: int, block: nn.Module) -> None:
        for module in block.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    module._parameters[key] = nn.Parameter(
                        torch.empty_like(p, device="meta"), requires_grad=False
                    )
        _trim_heap()


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        return lib
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS.

    glibc raises its mmap threshold after big frees, so later block-sized buffers come from the heap and
    stay resident once freed: without this, resident memory creeps up by about a block per block.
    """
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


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
        _set_tensor(model, name, tensor.to(state[name].dtype))
    tied = (
        model.get_expanded_tied_weights_keys(all_submodels=True)
        if hasattr(model, "get_expanded_tied_weights_keys")
        else {}
    )
    for target, source in tied.items():  # the checkpoint holds one of each tied pair: share it
        if target in missing and source in found:
            _set_tensor(model, target, model.get_parameter(source))
            missing.remove(target)
        elif source in missing and target in found:
            _set_tensor(model, source, model.get_parameter(target))
            missing.remove(source)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    absent = [n for n in missing if n in params]
    if absent:
        raise _missing_error(folder, model, absent)
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


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no copy, and the progress folder keeps its file until the output is safe), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _sparsity_report(model: nn.Module, prefix: str, files: list[Path], result: PruneResult) -> dict[str, Any]:
    """``sparsity.json`` as ``io.save.sparsity_report`` writes it, measured on the written shards: every
    Linear of the blocks, the ones the selection left dense too (they count in ``overall_sparsity``)."""
    from llmprune.io.save import module_entry, sparsity_summary

    modules: dict[str, dict[str, Any]] = {}
    for i, path in enumerate(files):
        names = [f"{prefix}.{i}.{n}" for n in prunable_linears(model.get_submodule(f"{prefix}.{i}"))]
        for name in names:  # one matrix in memory at a time
            weight = read_safetensors(path, {"w": f"{name}.weight"})["w"]
            transposed = WeightView(model.get_submodule(name)).transposed
            modules[name] = module_entry(weight.t() if transposed else weight, result.modules.get(name))
    return sparsity_summary(modules, result)


def write_streamed(
    out: Path,
    model: nn.Module,
    source: StreamingBlocks,
    prog: Progress,
    result: PruneResult,
    tokenizer,
    folder: Path,
    *,
    recipe: dict | None = None,
    run_info: dict | None = None,
) -> Path:
    """Assemble the output folder atomically: block shards from the progress folder, the rest from memory."""
    import yaml

    from llmprune.io.card import build_model_card
    from llmprune.io.save import _FORBIDDEN_CONFIG_KEYS, _plain, atomic_folder, build_run_info, default_recipe

    num = len(source.blocks)
    names = [f"model-{k:05d}-of-{num + 1:05d}.safetensors" for k in range(1, num + 2)]
    weight_map: dict[str, str] = {}
    total_size = 0
    with atomic_folder(out) as staging:
        rest = saved_names(model, outside_tensors(model, source.prefix))
        save_tensors(staging / names[0], rest)
        weight_map.update(dict.fromkeys(rest, names[0]))
        total_size += sum(t.numel() * t.element_size() for t in rest.values())
        shards = []
        for i in range(num):
            shard = staging / names[i + 1]
            _link_or_copy(prog.block_file(i), shard)
            shards.append(shard)
            _, header = safetensors_header(shard)
            for key, info in header.items():
                if key != "__metadata__":
                    weight_map[key] = names[i + 1]
                    total_size += info["data_offsets"][1] - info["data_offsets"][0]
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / _INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        model.config.save_pretrained(staging)
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        for key in _FORBIDDEN_CONFIG_KEYS:
            config.pop(key, None)
        (staging / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if (folder / "generation_config.json").is_file():
            shutil.copyfile(folder / "generation_config.json", staging / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        else:
            for pattern in _TOKENIZER_FILES:
                for f in folder.glob(pattern):
                    shutil.copyfile(f, staging / f.name)
        sparsity = _sparsity_report(model, source.prefix, shards, result)
        (staging / "sparsity.json").write_text(json.dumps(sparsity, indent=2) + "\n", encoding="utf-8")
        if result.modules:
            _write_masks(staging / "masks.safetensors", source.prefix, num, prog, result)
        resolved = _plain(recipe) if recipe is not None else default_recipe(result)
        (staging / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        info = build_run_info(model, result, {"streaming": True, **(run_info or {})}, None)
        (staging / "run_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        build_model_card(sparsity=sparsity, recipe=resolved, run_info=info).save(staging / "README.md")
    return out


def _write_masks(path: Path, prefix: str, num_blocks: int, prog: Progress, result: PruneResult) -> None:
    """One ``masks.safetensors`` (``io.save``'s format) from the per-block files, a block at a time."""
    from llmprune.io.save import MASKS_FORMAT

    per_block = [[n for n in result.modules if n.startswith(f"{prefix}.{i}.")] for i in range(num_blocks)]
    shapes = {n: list(result.modules[n].shape) for names in per_block for n in names}
    layout = [(n, torch.uint8, [-(-_numel(shapes[n]) // 8)]) for names in per_block for n in names]

    def blocks():
        for i, names in enumerate(per_block):
            if names:
                packed = read_safetensors(prog.masks_file(i), {n: n for n in names})
                yield from (packed[n] for n in names)

    metadata = {"format": MASKS_FORMAT, "bit_order": "big", "shapes": json.dumps(shapes)}
    write_safetensors(path, layout, blocks(), metadata)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def prune_streaming(
    model: str | os.PathLike, tokenizer=None, *, output_dir: str | os.PathLike, **kwargs: Any
) -> PruneResult:
    """Prune the checkpoint folder ``model`` block by block from disk and write it to ``output_dir``.

    ``llmprune.prune(model, tokenizer, streaming=True, output_dir=..., **kwargs)``: the same keywords
    and checks. Progress for ``resume`` defaults to ``.<output_dir name>.llmprune-progress`` beside
    ``output_dir``.
    """
    from llmprune.api import prune  # the one entry point; api imports this module lazily

    return prune(model, tokenizer, streaming=True, output_dir=output_dir, **kwargs)


def stream_blocks(
    model: str | os.PathLike,
    tokenizer,
    cfg: EngineConfig,
    *,
    output_dir: str | os.PathLike,
    dataset: Any,
    num_calibration_samples: int,
    max_seq_length: int,
    device: str | None,
    dtype: str | None,
    recipe: dict | None = None,
    run_info: dict | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> PruneResult:
    """``prune_streaming`` once its keywords are checked (``settings.engine_config`` made ``cfg``)."""
    from llmprune.io.models import resolve_device, resolve_dtype
    from llmprune.io.save import check_output_dir
    from llmprune.preflight import after_loading, prunable_names

    folder = resolve_folder(model)
    compute = resolve_device(device)
    skeleton, reader, names = build_skeleton(folder, resolve_dtype(dtype, compute), trust_remote_code)
    after_loading(skeleton, cfg.selection)  # module names only: a selection matching nothing fails now
    if tokenizer is None and any(folder.glob("tokenizer*")):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # token-id datasets need no tokenizer
            log.info("no tokenizer in %s (%s)", folder, exc)
    out = Path(output_dir).expanduser()
    comm = current_comm()
    if comm.is_main:
        check_output_dir(out, skeleton, overwrite)
    source = StreamingBlocks(skeleton, reader, names)

    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    input_ids = calibration_ids(
        skeleton, dataset, tokenizer, num_calibration_samples, max_seq_length, cfg.seed, comm
    )
    result = PruneResult(
        method=cfg.solver.name,
        sparsity=str(cfg.selection.default),
        options=dict(cfg.options),
        calibration_hash=tokens_hash(input_ids),
        num_calibration_samples=int(input_ids.shape[0]),
        max_seq_length=int(input_ids.shape[1]),
        seed=cfg.seed,
    )
    cfg.device, cfg.comm = compute, comm
    ckpt_dir = None if cfg.checkpoint_dir is None else Path(cfg.checkpoint_dir)
    work = ckpt_dir or out.parent / f".{out.name}.llmprune-work-{uuid.uuid4().hex[:8]}"
    weights = [files_digest(sorted(folder.glob("*.safetensors")))]
    fingerprint = run_fingerprint(cfg, skeleton, input_ids, len(source.blocks), compute, weights)
    prog = Progress.open(work, comm, fingerprint, resume=cfg.resume, resumable=ckpt_dir is not None)
    try:
        prune_blocks(skeleton, input_ids, cfg, result, source=source, progress=prog)
        result.seconds = time.perf_counter() - start
        left_dense = set(prunable_names(skeleton)) - set(result.modules)  # ignored or not targeted
        result.dense_weights = sum(int(skeleton.get_submodule(n).weight.numel()) for n in left_dense)
        if comm.is_main:
            write_streamed(
                out, skeleton, source, prog, result, tokenizer, folder, recipe=recipe, run_info=run_info
            )
        prog.discard()
    except BaseException:
        if ckpt_dir is None and comm.is_main:  # nothing to resume from: do not leave half a model behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    if comm.is_main:
        log.info(
            "%s %s: %.2f%% pruned in %.1fs, written to %s",
            result.method,
            result.sparsity,
            100 * result.overall_sparsity,
            result.seconds,
            out,
        )
    return result
