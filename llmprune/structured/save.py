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


def record_speed(folder: str | Path, report: dict[str, Any]) -> None:
    """Add a measured speed report (``llmprune bench --write``) to a saved structured checkpoint:
    ``run_info.json["speed"]``, ``structure.json["speed"]["measured"]`` beside auto's prediction, and
    the model card's speed line, each file replaced atomically."""
    import json

    import yaml

    from llmprune.io.atomic import write_text
    from llmprune.io.card import build_model_card

    folder = Path(folder)

    def read(name: str) -> dict[str, Any]:
        path = folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    info = {**read("run_info.json"), "speed": report}
    write_text(folder / "run_info.json", json.dumps(info, indent=2) + "\n")
    structure = read("structure.json")
    if structure and "speedup" in report:
        structure["speed"] = {**structure.get("speed", {}), "measured": report["speedup"]}
        write_text(folder / "structure.json", json.dumps(structure, indent=2) + "\n")
    if (folder / "README.md").is_file() and (folder / "sparsity.json").is_file():
        recipe_path = folder / "recipe.yaml"
        recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else None
        card = build_model_card(
            sparsity=read("sparsity.json"), recipe=recipe, run_info=info, metrics=info.get("metrics")
        )
        write_text(folder / "README.md", str(card))
