"""One writer for pruned checkpoints, shared by ``--output_dir`` and the Python API.

The weights go out as a plain Hugging Face safetensors checkpoint with exact zeros and nothing about
sparsity in ``config.json``: vLLM and transformers now reject configs that carry sparsity metadata.
What llmprune knows about the run is written beside the weights, in its own files:

* ``sparsity.json``: achieved sparsity, shape, target and N:M validity of every pruned matrix;
* ``recipe.yaml``: the resolved settings; ``run_info.json``: versions, seed, calibration hash, timings,
  metrics; ``masks.safetensors``: the keep-masks, 8 per byte; ``README.md``: the model card.

Everything is written into a hidden sibling folder first and swapped into place at the end, so a
failure leaves the previous contents of ``output_dir`` (and the input model) untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from llmprune.errors import ConfigError, ModelLoadError
from llmprune.io.inspect import CHECKED_PATTERNS, weight_stats
from llmprune.io.models import clear_quantization
from llmprune.result import PruneResult

log = logging.getLogger(__name__)

MASKS_FORMAT = "llmprune.keep_masks.v1"
#: config.json keys that make serving stacks treat the checkpoint as compressed or sparse
_FORBIDDEN_CONFIG_KEYS = ("quantization_config", "sparsity_config", "compression_config")
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # first element = high bit


# ---------------------------------------------------------------- keep-masks, 8 per byte


def pack_bits(mask: Tensor) -> Tensor:
    """bool, any shape -> uint8 (ceil(numel / 8),); first element in the high bit, as numpy.packbits."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...] | list[int]) -> Tensor:
    """Inverse of ``pack_bits``: uint8 (k,) -> bool ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS).ne(0).reshape(-1)  # (8k,)
    return bits[:numel].reshape(tuple(int(s) for s in shape))


def save_keep_masks(masks: dict[str, Tensor], path: str | Path) -> None:
    """Write bool keep-masks (True = kept) bit-packed, with their shapes in the safetensors header."""
    from safetensors.torch import save_file

    packed = {name: pack_bits(m.detach().cpu().bool()).contiguous() for name, m in masks.items()}
    shapes = {name: list(m.shape) for name, m in masks.items()}
    save_file(
        packed, str(path), metadata={"format": MASKS_FORMAT, "bit_order": "big", "shapes": json.dumps(shapes)}
    )


def load_keep_masks(path: str | Path) -> dict[str, Tensor]:
    """Bool keep-masks (True = kept), keyed by module name, exactly as they were saved.

    >>> masks = load_keep_masks("out/masks.safetensors")  # doctest: +SKIP
    >>> masks["model.layers.0.mlp.down_proj"].shape  # doctest: +SKIP
    torch.Size([576, 1536])
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "masks.safetensors"
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


# ---------------------------------------------------------------- what was pruned


def _candidate_modules(model: nn.Module, result: PruneResult | None) -> dict[str, nn.Module]:
    """The reported matrices: the run's modules, else every prunable Linear inside the decoder blocks."""
    from llmprune.calibration.modules import find_blocks, is_prunable, prunable_linears

    if result is not None and result.modules:
        return {name: model.get_submodule(name) for name in result.modules}
    try:
        prefix, blocks = find_blocks(model)
    except ConfigError:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {n: m for n, m in model.named_modules() if is_prunable(m) and m is not head}
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in prunable_linears(b).items()}


@torch.no_grad()
def sparsity_report(model: nn.Module, result: PruneResult | None = None) -> dict[str, Any]:
    """Achieved sparsity measured on the weights themselves (the truth), with the run's targets beside it."""
    from llmprune.calibration.modules import WeightView

    modules: dict[str, dict[str, Any]] = {}
    for name, module in _candidate_modules(model, result).items():
        weight = module.weight.detach()
        report = result.modules.get(name) if result is not None else None
        modules[name] = module_entry(weight.t() if WeightView(module).transposed else weight, report)
    return sparsity_summary(modules, result)


def module_entry(weight: Tensor, report=None) -> dict[str, Any]:
    """One ``sparsity.json`` module entry from an (out, in) weight and the run's report (if any)."""

    info = weight_stats(weight)
    target = report.target if report is not None else None
    info["target"] = target
    info["nm_valid"] = target in info["nm_patterns"] if target and ":" in target else None
    if report is not None:
        info["layer_error"] = report.layer_error
        info["seconds"] = report.seconds
    return info


def sparsity_summary(modules: dict[str, dict[str, Any]], result: PruneResult | None) -> dict[str, Any]:
    """The ``sparsity.json`` document around per-module entries (shared with the streaming writer)."""

    total = sum(v["shape"][0] * v["shape"][1] for v in modules.values())
    common = [
        str(p)
        for p in CHECKED_PATTERNS
        if modules and all(str(p) in v["nm_patterns"] for v in modules.values())
    ]
    return {
        "format": "llmprune.sparsity.v1",
        "method": result.method if result is not None else None,
        "target": result.sparsity if result is not None else None,
        "overall_sparsity": sum(v["zeros"] for v in modules.values()) / total if total else 0.0,
        "num_modules": len(modules),
        "nm_patterns": common,
        "modules": modules,
    }


def _nonzero_masks(model: nn.Module, result: PruneResult | None) -> dict[str, Tensor]:
    """Keep-masks read off the weights (nonzero = kept), for runs that carry no solver masks."""
    from llmprune.calibration.modules import WeightView

    masks = {}
    for name, module in _candidate_modules(model, result).items():
        weight = module.weight.detach()
        keep = weight != 0
        masks[name] = (keep.t() if WeightView(module).transposed else keep).cpu()  # (out, in)
    return masks


# ---------------------------------------------------------------- provenance


def _plain(value: Any) -> Any:
    """YAML/JSON-safe copy: tuples -> lists, paths and unknown objects -> str, tensors -> numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return str(value)


def _git_commit() -> str | None:
    """HEAD of the source tree for a dev install (``pip install -e``), else None."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:  # e.g. a repository without commits
        return None
    return proc.stdout.strip() or None


def versions() -> dict[str, str | None]:
    import huggingface_hub
    import safetensors
    import transformers

    import llmprune

    return {
        "llmprune": getattr(llmprune, "__version__", None),
        "llmprune_git_commit": _git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }


def default_recipe(result: PruneResult) -> dict[str, Any]:
    """What a PruneResult records, in the recipe's layout, for runs that did not pass their recipe."""
    from llmprune.recipe import RECIPE_VERSION

    return {
        "version": RECIPE_VERSION,
        "calibration": {
            "num_calibration_samples": result.num_calibration_samples,
            "max_seq_length": result.max_seq_length,
            "seed": result.seed,
        },
        "prune": {"method": result.method, "sparsity": result.sparsity, "options": dict(result.options)},
    }


def build_run_info(
    model: nn.Module, result: PruneResult | None, run_info: dict | None, metrics: dict | None
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "source_model": source_model(model),
    }
    if result is not None:
        info.update(
            seed=result.seed,
            calibration_hash=result.calibration_hash,
            num_calibration_samples=result.num_calibration_samples,
            max_seq_length=result.max_seq_length,
            timings={"prune_seconds": result.seconds, "blocks": [vars(b) for b in result.blocks]},
        )
    info.update(run_info or {})
    if metrics is not None:
        info["metrics"] = metrics
    return _plain(info)


# ---------------------------------------------------------------- atomic folder


def source_model(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _is_checkpoint_dir(path: Path) -> bool:
    return any((path / n).exists() for n in ("config.json", "sparsity.json")) or any(
        path.glob("*.safetensors")
    )


def check_output_dir(output_dir: Path, model: nn.Module | None = None) -> None:
    """Refuse targets whose replacement would destroy something: the input model, the cwd, other files."""
    target = output_dir.resolve()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file: choose a folder path.")
    sources = {source_model(model), getattr(getattr(model, "config", None), "_name_or_path", None)}
    for source in sources - {None, ""}:  # a model built from a config has no source
        src = Path(str(source)).expanduser()
        if src.exists() and (target == src.resolve() or target in src.resolve().parents):
            raise ConfigError(
                f"output_dir {output_dir} holds the model being pruned ({source}); writing there would "
                "replace "
                "the input model. Fix: choose a new folder, e.g. --output_dir ./pruned-model."
            )
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ConfigError(
            f"output_dir {output_dir} is (or contains) the current directory: choose a subfolder."
        )
    if target.is_dir() and any(target.iterdir()) and not _is_checkpoint_dir(target):
        raise ConfigError(
            f"output_dir {output_dir} exists and holds files that are not a checkpoint; llmprune "
            "replaces the "
            "whole folder. Fix: choose a new or empty folder."
        )


def _fsync_tree(root: Path) -> None:
    """Flush every written file and folder to disk before the swap makes them visible."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; on success swap it in for ``target``, on failure delete it.

    The old folder is renamed aside before the new one is renamed in, and renamed back if that fails,
    so ``target`` always holds either the complete old contents or the complete new ones.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not mkdtemp: that would leave the final folder with mode 0700
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(old, target)
                raise
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
        _fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


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
    extra_files: dict[str, Any] | None = None,
    max_shard_size: str = "5GB",
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    private: bool = False,
    token: str | None = None,
) -> Path:
    """Write the pruned model, its provenance and its model card to ``output_dir``, atomically.

    ``recipe`` is a dict or a ``llmprune.recipe.Recipe``. ``run_info`` entries are merged into
    ``run_info.json`` (e.g. ``command``, ``base_model``, ``license``); ``metrics`` is free-form, e.g.
    ``{"perplexity": {"dense": 12.1, "pruned": 14.3, "dataset": "wikitext2", "seq_len": 512}}``.
    ``extra_files`` maps file names to JSON documents written beside the weights (``structure.json``).

    >>> save_pruned(model, tok, "out/wanda-50", result=result, metrics=metrics)  # doctest: +SKIP
    PosixPath('out/wanda-50')
    """
    from llmprune.io.card import build_model_card, recipe_value

    out = Path(output_dir).expanduser()
    if push_to_hub and not hub_model_id:
        raise ConfigError(
            "push_to_hub=True needs hub_model_id, e.g. hub_model_id='your-name/model-wanda-50'."
        )
    check_output_dir(out, model)
    _prepare_dense(model)
    start = time.perf_counter()
    if recipe is not None and hasattr(recipe, "to_dict"):  # a llmprune.recipe.Recipe
        recipe = recipe.to_dict()
    resolved_recipe = _plain(recipe) if recipe is not None else default_recipe(result) if result else None
    sparsity = sparsity_report(model, result)
    if result is None and resolved_recipe:  # name what was done even without a PruneResult
        target = recipe_value(resolved_recipe, "sparsity")
        sparsity["method"] = recipe_value(resolved_recipe, "method")
        sparsity["target"] = None if target is None else str(target)
    info = build_run_info(model, result, run_info, metrics)
    masks = None
    if save_masks:
        masks = (
            dict(result.keep_masks)
            if result is not None and result.keep_masks
            else _nonzero_masks(model, result)
        )
    with atomic_folder(out.resolve()) as staging:  # through a symlink, replace what it points at
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        _scrub_config(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _write_json(staging / "sparsity.json", sparsity)
        for name, document in (extra_files or {}).items():  # e.g. structure.json
            _write_json(staging / name, _plain(document))
        if resolved_recipe is not None:
            (staging / "recipe.yaml").write_text(
                yaml.safe_dump(resolved_recipe, sort_keys=False), encoding="utf-8"
            )
        if save_masks and masks:
            save_keep_masks(masks, staging / "masks.safetensors")
        info["timings"] = {**info.get("timings", {}), "save_seconds": time.perf_counter() - start}
        _write_json(staging / "run_info.json", info)
        card = build_model_card(
            sparsity=sparsity, recipe=resolved_recipe, run_info=info, metrics=metrics, model_name=hub_model_id
        )
        card.save(staging / "README.md")
    log.info("saved pruned checkpoint to %s (%.1f%% sparse)", out, 100 * sparsity["overall_sparsity"])
    if push_to_hub:
        from llmprune.io.hub import push_to_hub as push

        push(out, hub_model_id, private=private, token=token)
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", encoding="utf-8")
