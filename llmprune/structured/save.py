"""Writing a structurally pruned model: a plain checkpoint plus ``structure.json``, through the one writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune.io.provenance import default_recipe
from llmprune.io.save import save_pruned
from llmprune.structured.result import StructuredResult


def run_info_of(result: StructuredResult, run_info: dict | None) -> dict[str, Any]:
    info = {
        "seed": result.seed,
        "calibration_hash": result.calibration_hash,
        "num_calibration_samples": result.num_calibration_samples,
        "max_seq_length": result.max_seq_length,
        "timings": {"prune_seconds": result.seconds},
        "structure": {k: v for k, v in result.to_dict().items() if k not in ("removed", "block_scores")},
    }
    return {**(run_info or {}), **info}  # the caller's summary names the structure as a string


def recipe_of(result: StructuredResult) -> dict[str, Any]:
    """The recipe a run without one would have had (``default_recipe`` reads the same fields)."""
    recipe = default_recipe(result)  # type: ignore[arg-type]
    recipe["prune"]["structure"] = result.structure
    return recipe


def save_structured(
    result: StructuredResult,
    tokenizer,
    output_dir: str | Path,
    *,
    recipe: dict | Any | None = None,
    run_info: dict | None = None,
    metrics: dict | None = None,
    **kwargs: Any,
) -> Path:
    """Write ``result.model`` (atomically, like every llmprune checkpoint) with ``structure.json`` beside it.

    >>> save_structured(result, tok, "out/auto-30")  # doctest: +SKIP
    """
    return save_pruned(
        result.model,
        tokenizer,
        output_dir,
        recipe=recipe if recipe is not None else recipe_of(result),
        run_info=run_info_of(result, run_info),
        metrics=metrics,
        save_masks=False,  # nothing is masked: the removed weights are gone
        extra_files={"structure.json": result.to_dict()},
        **kwargs,
    )
