"""``llmprune prune --structure depth|width|heads|auto``: a smaller dense model, measured and saved.

Load, measure the dense model, shrink (``llmprune.structured``), recover with the dense model as the
teacher if asked (only its logits are used, so the shapes may differ), measure the result, time both
side by side with ``--bench``, and write a plain checkpoint with ``structure.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from llmprune.errors import ConfigError
from llmprune.io.models import EMBEDDED_LICENSES

log = logging.getLogger(__name__)

#: settings of masked pruning that have no meaning when whole structures are removed
_MASK_ONLY = ("targets", "ignore", "overrides", "true_sequential")


def check_structured_run(args: argparse.Namespace, recipe) -> None:
    """Refuse what a structured run cannot do, before loading anything."""
    if recipe.model.streaming:
        raise ConfigError(
            "--streaming prunes masks block by block from disk; --structure rebuilds the whole model in "
            "memory. Fix: drop --streaming (structured pruning of the embedded model needs < 2 GB)."
        )
    if getattr(args, "resume", False) or getattr(args, "checkpoint_dir", None):
        raise ConfigError(
            "--resume/--checkpoint_dir continue a masked prune block by block; a structured run decides from "
            "every block's statistics at once (the block ranking, auto's split), so it has no partial "
            "state to resume. Fix: drop them (a structured prune of the embedded model takes minutes)."
        )
    given = [k for k in _MASK_ONLY if getattr(recipe.prune, k)]
    if given:
        raise ConfigError(
            f"{', '.join(given)} select Linears to mask; --structure removes whole blocks, channels and "
            "heads everywhere. Fix: drop them, or chain: shrink first, then prune the output unstructured."
        )


def run_structured(
    args: argparse.Namespace, recipe, *, measure: Callable[..., dict[str, Any]], command: str | None
) -> int:
    import llmprune
    from llmprune.structured.save import save_structured

    check_structured_run(args, recipe)  # the output folder was checked with the rest (preflight)
    model, tok = llmprune.load_model(recipe.model.name, dtype=recipe.model.dtype, device=recipe.model.device)
    dense = measure(model, tok, recipe, args.skip_eval)
    kwargs = recipe.prune_kwargs()
    for key in (*_MASK_ONLY, "streaming", "max_memory", "offload_dir"):
        kwargs.pop(key, None)
    t0 = time.perf_counter()
    result = llmprune.prune(model, tok, structure=recipe.prune.structure, **kwargs)
    prune_seconds = time.perf_counter() - t0
    small = result.model
    recovery = None
    if recipe.recover.method:
        recovery = _recover(small, model, tok, recipe)
    pruned = measure(small, tok, recipe, args.skip_eval)
    speed = _bench(model, small) if getattr(args, "bench", False) else None
    if speed is not None:  # beside auto's predicted speed-up in structure.json
        result.speed["measured"] = speed["speedup"]
    summary = {
        "model": recipe.model.name,
        "structure": recipe.prune.structure,
        "method": result.method,
        "sparsity": result.sparsity,
        "block_params_removed": result.block_fraction_removed,
        "counts": result.counts,
        "config": result.config,
        "params": result.total_params,
        "prune_seconds": prune_seconds,
        "perplexity": {"dense": dense.get("perplexity"), "pruned": pruned.get("perplexity")},
        "lm_eval": {"dense": dense.get("lm_eval"), "pruned": pruned.get("lm_eval")}
        if recipe.eval.tasks
        else None,
        "recovery": recovery.to_dict() if recovery is not None else None,
        "speed": speed,
        "command": command,
    }
    if recipe.model.name in EMBEDDED_LICENSES:
        summary["license"] = EMBEDDED_LICENSES[recipe.model.name]
    if recipe.output_dir:
        metrics = {"perplexity": _ppl_metric(summary, recipe), "lm_eval": summary["lm_eval"]}
        save_structured(
            result, tok, recipe.output_dir, recipe=recipe, run_info=summary, metrics=metrics,
            overwrite=args.overwrite,
        )  # fmt: skip
        summary["output_dir"] = recipe.output_dir
    print(json.dumps(summary, indent=2, default=str) if args.json else format_structured(summary))
    return 0


def _recover(small, dense, tok, recipe):
    """Recovery of the smaller model; the dense model is the distillation teacher (logits only)."""
    from llmprune.recovery import recover
    from llmprune.recovery.windows import recovery_windows

    # 64 windows: the larger pool of a time budget was chosen for sparse recovery, not measured here
    ids = recovery_windows(tokenizer=tok, model=small, **recipe.recover_windows_kwargs(timed_teacher=False))
    teacher = dense if recipe.recover.needs_dense_model else None
    return recover(small, input_ids=ids, dense_model=teacher, **recipe.recover_kwargs())


def _bench(dense, small) -> dict[str, Any]:
    import torch

    from llmprune.evaluation.speed import compare_speed, speedups

    speeds = compare_speed({"baseline": dense, "model": small})
    return {
        "settings": {
            "prefill": "8x512",
            "decode": "batch 1, greedy, 128 new tokens",
            "repeats": 3,
            "threads": torch.get_num_threads(),
        },
        "speed": {k: v.to_dict() for k, v in speeds.items()},
        "speedup": speedups(speeds, "baseline")["model"],
    }


def _ppl_metric(summary: dict[str, Any], recipe) -> dict[str, Any] | None:
    dense, pruned = summary["perplexity"]["dense"], summary["perplexity"]["pruned"]
    if pruned is None:
        return None
    return {
        "dense": dense["ppl"] if dense else None,
        "pruned": pruned["ppl"],
        "dataset": recipe.eval.eval_dataset or "llmprune built-in held-out text (Austen)",
        "seq_len": pruned["max_seq_length"],
        "windows": pruned["windows"],
    }


def format_structured(summary: dict[str, Any]) -> str:
    """The dense-vs-pruned table printed at the end of a structured run."""
    ppl = summary["perplexity"]
    params = summary["params"]
    cells: dict[str, tuple[str, str]] = {}
    if ppl["dense"] and ppl["pruned"]:
        cells["perplexity"] = (f"{ppl['dense']['ppl']:.2f}", f"{ppl['pruned']['ppl']:.2f}")
    cells["parameters"] = (f"{params['dense']:,}", f"{params['pruned']:,}")
    cells["block parameters removed"] = ("", f"{100 * summary['block_params_removed']:.1f}%")
    cells.update({key: ("", str(value)) for key, value in summary["config"].items()})
    if summary.get("speed"):
        up = summary["speed"]["speedup"]
        cells.update({f"{k} speed-up": ("1.00x", f"{up[k]:.2f}x") for k in ("prefill", "decode")})
    cells["prune wall time"] = ("", f"{summary['prune_seconds']:.1f} s")
    label_width = max(map(len, cells))
    value_width = max(len(v) for pair in cells.values() for v in pair)
    title = f"{summary['model']} · {summary['structure']} ({summary['method']}) · {summary['sparsity']}"
    lines = [title, "-" * len(title), " " * label_width + "  " + "dense".rjust(value_width) + "  pruned"]
    lines += [k.ljust(label_width) + "  " + d.rjust(value_width) + "  " + p for k, (d, p) in cells.items()]
    if summary.get("output_dir"):
        lines.append(f"saved to {summary['output_dir']}")
    return "\n".join(lines)
