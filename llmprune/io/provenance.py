"""What llmprune writes beside the weights of a checkpoint, in one place for every checkpoint writer.

* ``sparsity.json``: achieved sparsity, shape, target and N:M validity of every pruned matrix,
  measured on the weights themselves;
* ``recipe.yaml``: the resolved settings; ``run_info.json``: versions, seed, calibration hash,
  timings, metrics; ``masks.safetensors``: the keep-masks (``io/masks.py``); ``README.md``: the card.

``io.save.save_pruned`` (a model in memory) and ``io.save.save_streamed`` (blocks already on disk)
both end with :func:`write_provenance`; they differ only in where the weights come from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from llmprune.calibration.modules import WeightView, find_blocks, is_prunable, prunable_linears
from llmprune.errors import ConfigError
from llmprune.io.inspect import CHECKED_PATTERNS, weight_stats
from llmprune.result import PruneResult
from llmprune.version import RECIPE_VERSION, __version__

# ---------------------------------------------------------------- what was pruned


def candidate_modules(model: nn.Module, result: PruneResult | None) -> dict[str, nn.Module]:
    """The reported matrices: every prunable Linear inside the decoder blocks, pruned or left dense by the
    selection (so ``overall_sparsity`` counts the ignored ones too, as ``PruneResult`` does)."""
    try:
        prefix, blocks = find_blocks(model)
    except ConfigError:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {n: m for n, m in model.named_modules() if is_prunable(m) and m is not head}
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in prunable_linears(b).items()}


@torch.no_grad()
def sparsity_report(model: nn.Module, result: PruneResult | None = None) -> dict[str, Any]:
    """Achieved sparsity measured on the weights themselves (the truth), with the run's targets beside it."""
    weights = ((name, WeightView(m).matrix()) for name, m in candidate_modules(model, result).items())
    return sparsity_document(weights, result)


def sparsity_document(weights: Iterable[tuple[str, Tensor]], result: PruneResult | None) -> dict[str, Any]:
    """``sparsity.json`` from ``(name, (out, in) weight)`` pairs, read one at a time (streaming reads
    them from the written shards)."""
    modules = {}
    for name, weight in weights:
        report = result.modules.get(name) if result is not None else None
        modules[name] = module_entry(weight, report)
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
        info["fallbacks"] = list(report.fallbacks)
    return info


def sparsity_summary(modules: dict[str, dict[str, Any]], result: PruneResult | None) -> dict[str, Any]:
    """The ``sparsity.json`` document around per-module entries."""
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
        "allocation": getattr(result, "allocation", None),
        "modules": modules,
    }


def keep_masks_from_weights(model: nn.Module, result: PruneResult | None) -> dict[str, Tensor]:
    """Keep-masks read off the weights (nonzero = kept), for runs that carry no solver masks."""
    masks = {}
    for name, module in candidate_modules(model, result).items():
        masks[name] = (WeightView(module).matrix() != 0).cpu()  # (out, in)
    return masks


# ---------------------------------------------------------------- provenance


def source_model(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def plain(value: Any) -> Any:
    """YAML/JSON-safe copy: tuples -> lists, paths and unknown objects -> str, tensors -> numbers."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
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
    """Versions of llmprune (with the git commit of a dev install) and of the libraries that matter."""
    import huggingface_hub
    import safetensors
    import transformers

    return {
        "llmprune": __version__,
        "llmprune_git_commit": _git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }


def default_recipe(result: PruneResult) -> dict[str, Any]:
    """What a PruneResult records, in the recipe's layout, for runs that did not pass their recipe."""
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
    return plain(info)


def resolved_recipe(recipe: Any, result: PruneResult | None) -> dict[str, Any] | None:
    """The recipe to save: the one given (a dict or a ``llmprune.recipe.Recipe``), else the result's."""
    if recipe is not None and hasattr(recipe, "to_dict"):  # a llmprune.recipe.Recipe
        recipe = recipe.to_dict()
    if recipe is not None:
        return plain(recipe)
    return default_recipe(result) if result is not None else None


def write_provenance(
    folder: Path,
    model: nn.Module,
    result: PruneResult | None,
    *,
    sparsity: dict[str, Any],
    recipe: dict[str, Any] | None,
    run_info: dict | None = None,
    metrics: dict | None = None,
    write_masks: Callable[[Path], None] | None = None,
    model_name: str | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Write sparsity.json, recipe.yaml, masks (``write_masks(path)``), run_info.json and the card into
    ``folder`` (a staging folder); return the run info. ``recipe`` is already resolved
    (:func:`resolved_recipe`); ``started`` (``time.perf_counter()``) adds the save time."""
    from llmprune.io.card import build_model_card, recipe_value

    if result is None and recipe:  # name what was done even without a PruneResult
        target = recipe_value(recipe, "sparsity")
        sparsity["method"] = recipe_value(recipe, "method")
        sparsity["target"] = None if target is None else str(target)
    write_json(folder / "sparsity.json", sparsity)
    if recipe is not None:
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    if write_masks is not None:
        write_masks(folder / "masks.safetensors")
    info = build_run_info(model, result, run_info, metrics)
    if started is not None:
        info["timings"] = {**info.get("timings", {}), "save_seconds": time.perf_counter() - started}
    write_json(folder / "run_info.json", info)
    card = build_model_card(
        sparsity=sparsity, recipe=recipe, run_info=info, metrics=metrics, model_name=model_name
    )
    card.save(folder / "README.md")
    return info


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", encoding="utf-8")
