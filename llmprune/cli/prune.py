"""``llmprune prune``: load, measure dense, prune, (recover), measure pruned, print the table, save.

Settings come from flags over ``--recipe`` over defaults (``llmprune.recipe``); the resolved recipe
is saved with the checkpoint, so ``llmprune prune --recipe OUT/recipe.yaml`` reproduces the run.

With ``--streaming`` the model is never loaded whole: blocks are read, pruned and written to
``--output_dir`` one at a time, so nothing is measured on it here (``llmprune eval`` does that after).
Under ``torchrun`` every process calibrates its share; rank 0 alone reads the data, evaluates,
recovers, saves and prints. ``--resume`` continues a killed run; its progress is removed at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import sys
import time
from typing import Any

from llmprune.cli.export import add_format_flags
from llmprune.cli.flags import (
    EVAL_LIMIT_HELP,
    add_calibration_flags,
    add_model_flags,
    add_pruning_flags,
    add_scale_flags,
    eval_limit,
)
from llmprune.cli.table import render_table
from llmprune.io.models import EMBEDDED_LICENSES
from llmprune.io.weights import check_format

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model and report perplexity before and after")
    p.add_argument("--recipe", help="YAML recipe (recipes/*.yaml); flags given here override it")
    add_model_flags(p)
    add_pruning_flags(p)
    add_calibration_flags(p)
    add_scale_flags(p)
    p.add_argument(
        "--structure",
        choices=["unstructured", "depth", "width", "heads", "auto"],
        help="remove whole blocks/channels/heads: a smaller, faster model (default unstructured)",
    )
    p.add_argument(
        "--bench", action="store_true", help="--structure: time prefill/decode against the dense model"
    )
    g = p.add_argument_group("recovery")
    g.add_argument(
        "--recover", choices=["perp", "lift", "full"], help="retrain after pruning (full: every weight)"
    )
    g.add_argument("--recover_steps", type=int, help="optimiser steps (default 100; reconstruct: per block)")
    g.add_argument("--recover_max_seconds", type=float, help="stop recovery after this long")
    g.add_argument("--lr", type=float, help="recovery learning rate (default: the method's)")
    g.add_argument(
        "--recover_mode",
        choices=["retrain", "reconstruct"],
        help="retrain (default) after pruning, or reconstruct each block right after pruning it",
    )
    g.add_argument("--distill", type=float, help="retrain: weight of KL to the dense model, 0..1 (default 1)")
    g.add_argument(
        "--recover_dataset",
        help="text recovery trains on (default: --dataset, else the built-in recovery text); text like "
        "what the model will read recovers most",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_dataset", help="held-out text for perplexity (default: built-in Austen novels)")
    g.add_argument("--eval_max_seq_length", type=int, help="perplexity window (default: --max_seq_length)")
    g.add_argument("--eval_limit", type=eval_limit, help=EVAL_LIMIT_HELP)
    g.add_argument("--eval_batch_size", type=int, help="windows per perplexity forward (default 2)")
    g.add_argument("--skip_eval", action="store_true", help="no perplexity")
    g.add_argument("--tasks", help="lm-eval tasks, comma-separated (e.g. llmprune_mc)")
    g.add_argument("--include_path", help="extra folder of lm-eval task YAMLs")
    g.add_argument("--num_fewshot", type=int, help="lm-eval few-shot examples (default 0)")
    g.add_argument("--limit", type=float, help="lm-eval documents per task")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", help="write the pruned checkpoint here (atomically)")
    add_format_flags(g, "save_format", "dense")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    g.add_argument(
        "--overwrite", action="store_true", help="replace --output_dir if an earlier llmprune run wrote it"
    )
    p.set_defaults(func=run)


def _peak_rss_mib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _scores(model, tok, recipe, skip_eval: bool) -> dict[str, Any]:
    from llmprune.evaluation.perplexity import perplexity

    out: dict[str, Any] = {}
    if not skip_eval:
        out["perplexity"] = perplexity(model, tok, **recipe.perplexity_kwargs())
    if recipe.eval.tasks:
        from llmprune.evaluation.harness import lm_eval_scores

        out["lm_eval"] = lm_eval_scores(model, tok, **recipe.lm_eval_kwargs())
    return out


def run(args: argparse.Namespace) -> int:
    import llmprune
    from llmprune.calibration.distributed import Comm, current_comm
    from llmprune.calibration.resume import discard_progress, resolve_checkpoint_dir
    from llmprune.preflight import after_loading, check_recipe
    from llmprune.recipe import resolve_recipe

    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    recipe = resolve_recipe(args, command="prune")  # a bad recipe or flag fails before loading anything
    check_recipe(recipe, overwrite=args.overwrite, evaluate=not args.skip_eval)
    _check_save_format(recipe)
    if recipe.prune.structure != "unstructured":  # a smaller model, not masks: llmprune.structured
        from llmprune.cli.prune_structured import run_structured

        return run_structured(args, recipe, measure=_scores, command=_command())
    if recipe.model.streaming:
        return _run_streaming(args, recipe)
    checkpoint_dir = resolve_checkpoint_dir(args.checkpoint_dir, recipe.output_dir, args.resume)
    comm = current_comm()  # before loading: under torchrun this picks each rank's GPU
    _check_world(recipe, comm.world)  # before loading and before rank 0 scores the dense model
    model, tok = llmprune.load_model(recipe.model.name, dtype=recipe.model.dtype, device=recipe.model.device)
    after_loading(model, recipe.selection())  # a selection that matches nothing fails before any scoring
    if comm.is_main:
        _announce(model, tok, recipe, args.skip_eval)
    if recipe.output_dir:  # e.g. GGUF of an architecture llama.cpp lacks: refuse before pruning
        check_format(recipe.save_format, recipe.gguf_type, model)
    dense = _scores(model, tok, recipe, args.skip_eval) if comm.is_main else {}
    fused = recipe.recover.method is not None and recipe.recover.mode == "reconstruct"  # inside the pass
    fused_kwargs = recipe.fused_recover_kwargs() if fused else {}
    keep_dense = recipe.recover.needs_dense_model and not fused and comm.is_main
    recover_ids, targets = None, None
    if recipe.recover.method and not fused and comm.is_main:  # before pruning: a bad window fails now
        from llmprune.recovery.windows import recovery_windows

        recover_ids = recovery_windows(tokenizer=tok, model=model, **recipe.recover_windows_kwargs())
    if keep_dense and recipe.recover.mode == "retrain":  # distillation: the dense model's targets, now
        from llmprune.recovery.api import dense_targets
        from llmprune.recovery.windows import NUM_WINDOWS

        targets = dense_targets(
            model,
            recover_ids,
            recipe.recover_kwargs(),
            max_seconds=recipe.teacher_seconds(),
            min_windows=NUM_WINDOWS,
        )
        recover_ids = recover_ids if targets is None else targets.input_ids  # a budget may use fewer
    teacher = copy.deepcopy(model) if keep_dense and targets is None else None  # live teacher, reconstruct
    t0 = time.perf_counter()
    result = llmprune.prune(
        model, tok, **recipe.prune_kwargs(), checkpoint_dir=checkpoint_dir, resume=args.resume, **fused_kwargs
    )
    prune_seconds = time.perf_counter() - t0
    if not comm.is_main:  # every rank holds the same pruned model: rank 0 finishes the run alone
        return 0
    recovery = result.recovery
    if recipe.recover.method and not fused:
        from llmprune.recovery import recover

        recovery = recover(
            model, input_ids=recover_ids, keep_masks=result.keep_masks, dense_model=teacher,
            teacher_targets=targets, **recipe.recover_kwargs(),
        )  # fmt: skip
        del teacher, targets
    pruned = _scores(model, tok, recipe, args.skip_eval)
    summary = _summary(recipe, result, prune_seconds, dense, pruned, recovery)
    if recipe.output_dir:
        from llmprune.io.save import save_pruned

        recipe = _resolved_sizes(recipe, result, recovery if recipe.recover.mode == "retrain" else None)
        metrics = {"perplexity": _ppl_metric(summary, recipe), "lm_eval": summary["lm_eval"]}
        save_pruned(
            model,
            tok,
            recipe.output_dir,
            result=result,
            recipe=recipe,
            run_info=summary,
            metrics=metrics,
            overwrite=args.overwrite,
            format=recipe.save_format,
            gguf_type=recipe.gguf_type,
        )
        summary["output_dir"] = recipe.output_dir
    discard_progress(checkpoint_dir, Comm())  # the run is complete; the other ranks have left already
    print(json.dumps(summary, indent=2, default=str) if args.json else format_table(summary))
    return 0


def _check_save_format(recipe) -> None:
    """--save_format other than dense needs --output_dir and a model in memory (not --streaming)."""
    from llmprune.errors import ConfigError

    if recipe.save_format == "dense":
        return
    if not recipe.output_dir:
        raise ConfigError(f"--save_format {recipe.save_format} needs --output_dir: where to write the model.")
    if recipe.model.streaming:
        raise ConfigError(
            "--streaming writes dense safetensors block by block. Fix: drop --save_format, then run "
            f"`llmprune export {recipe.output_dir} --format {recipe.save_format} --output_dir NEW_FOLDER`."
        )


def _run_streaming(args: argparse.Namespace, recipe) -> int:
    """Prune block by block from disk into ``output_dir``; the model is never whole in memory."""
    import llmprune
    from llmprune.calibration.distributed import current_comm
    from llmprune.errors import ConfigError

    if recipe.recover.method or recipe.eval.tasks:
        wanted = {"recovery": recipe.recover.method, "lm-eval tasks": recipe.eval.tasks}
        asked = [what for what, value in wanted.items() if value]
        raise ConfigError(
            f"--streaming never holds the whole model in memory, so it cannot run {' or '.join(asked)} on "
            "it. Fix: drop them from the flags and recipe (--tasks '' clears tasks), prune with --streaming "
            "--output_dir OUT, then run `llmprune recover --model OUT` or `llmprune eval --model OUT`."
        )
    if not args.skip_eval:
        log.info("--streaming: no perplexity is measured (run `llmprune eval --model OUTPUT_DIR` after)")
    recipe = _sizes_from_config(recipe)  # the saved recipe names the sizes the run uses
    kwargs = recipe.prune_kwargs(with_output_dir=True)
    run_info = {"command": _command(), "license": EMBEDDED_LICENSES.get(recipe.model.name)}
    t0 = time.perf_counter()
    result = llmprune.prune(
        recipe.model.name,
        **kwargs,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        recipe=recipe.to_dict(),
        run_info={k: v for k, v in run_info.items() if v is not None},
    )
    prune_seconds = time.perf_counter() - t0
    if not current_comm().is_main:
        return 0
    summary = _summary(recipe, result, prune_seconds, {}, {}, None)
    summary["output_dir"] = recipe.output_dir
    print(json.dumps(summary, indent=2, default=str) if args.json else format_table(summary))
    return 0


def _check_world(recipe, world: int) -> None:
    """More processes than calibration windows is the one split refused (the engine checks it again)."""
    from llmprune.calibration.settings import default_num_samples
    from llmprune.io.models import resolve_device
    from llmprune.preflight import check_world
    from llmprune.registry import get_solver

    if world > 1 and (get_solver(recipe.prune.method).needs or recipe.prune.true_sequential):
        count = recipe.calibration.num_calibration_samples
        check_world(count or default_num_samples(resolve_device(recipe.model.device)), world)


def _announce(model, tok, recipe, skip_eval: bool) -> None:
    """Say how long calibration and evaluation will take, before they start."""
    from llmprune.calibration.settings import calibration_size
    from llmprune.estimate import announce
    from llmprune.evaluation.perplexity import eval_windows, window_count
    from llmprune.preflight import window_length
    from llmprune.registry import get_solver

    c = recipe.calibration
    data_free = not get_solver(recipe.prune.method).needs and not recipe.prune.true_sequential
    calibration = None
    if not data_free:
        calibration = calibration_size(model, c.dataset, c.num_calibration_samples, c.max_seq_length)
    evaluation = None
    if not skip_eval:
        kwargs = recipe.perplexity_kwargs()
        length = window_length(kwargs["max_seq_length"], model.config, "--eval_max_seq_length")
        count = window_count(kwargs["limit"], length) or "all"
        evaluation = (len(eval_windows(tok, kwargs["dataset"], length, count)), length)
    announce(model, calibration=calibration, evaluation=evaluation)


def _sizes_from_config(recipe):
    """Calibration sizes left to the defaults, resolved from the model's config.json and the device."""
    from llmprune.calibration.settings import default_num_samples
    from llmprune.io.models import resolve_device
    from llmprune.preflight import model_config, window_length

    c, config = recipe.calibration, model_config(recipe.model.name)
    sizes = {}
    if c.max_seq_length is None and config is not None:
        sizes["calibration.max_seq_length"] = window_length(None, config)
    if c.num_calibration_samples is None:
        device = resolve_device(recipe.model.device)
        sizes["calibration.num_calibration_samples"] = default_num_samples(device)
    return recipe.with_overrides(sizes) if sizes else recipe


def _resolved_sizes(recipe, result, recovery=None):
    """The saved recipe names the calibration sizes the run used, not ``null`` (= sized at run time), and
    the recovery windows it trained on (a time budget picks their number at run time)."""
    sizes = {
        "calibration.num_calibration_samples": recipe.calibration.num_calibration_samples
        or result.num_calibration_samples
        or None,
        "calibration.max_seq_length": recipe.calibration.max_seq_length or result.max_seq_length or None,
    }
    if recovery is not None and recipe.recover.num_samples is None:
        sizes["recover.num_samples"] = recovery.options["windows"]
    return recipe.with_overrides(sizes)


def _command() -> str | None:
    return "llmprune " + " ".join(sys.argv[1:]) if "prune" in sys.argv else None


def _summary(recipe, result, prune_seconds: float, dense, pruned, recovery) -> dict[str, Any]:
    summary = {
        "model": recipe.model.name,
        "method": recipe.prune.method,
        "sparsity": str(recipe.prune.sparsity),
        "achieved_sparsity": result.overall_sparsity,
        "prune_seconds": prune_seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "perplexity": {"dense": dense.get("perplexity"), "pruned": pruned.get("perplexity")},
        "lm_eval": {"dense": dense.get("lm_eval"), "pruned": pruned.get("lm_eval")}
        if recipe.eval.tasks
        else None,
        "recovery": recovery.to_dict() if hasattr(recovery, "to_dict") else recovery,
        "calibration_hash": result.calibration_hash,
        "fallbacks": result.fallbacks,
        "command": _command(),
    }
    if recipe.model.name in EMBEDDED_LICENSES:
        summary["license"] = EMBEDDED_LICENSES[recipe.model.name]
    return summary


def _ppl_metric(summary: dict[str, Any], recipe) -> dict[str, Any] | None:
    dense, pruned = summary["perplexity"]["dense"], summary["perplexity"]["pruned"]
    if pruned is None:
        return None
    return {
        "dense": dense["ppl"],
        "pruned": pruned["ppl"],
        "bits_per_byte": {"dense": dense["bits_per_byte"], "pruned": pruned["bits_per_byte"]},
        "dataset": recipe.eval.eval_dataset
        or "llmprune built-in held-out text (Austen: Pride and Prejudice, Emma)",
        "seq_len": pruned["max_seq_length"],
        "windows": pruned["windows"],
    }


def format_table(summary: dict[str, Any]) -> str:
    dense, pruned = summary["perplexity"]["dense"], summary["perplexity"]["pruned"]
    after = "pruned+" + summary["recovery"]["method"] if summary.get("recovery") else "pruned"
    rows = [("", "dense", after)]
    if dense and pruned:
        rows.append(("perplexity", f"{dense['ppl']:.2f}", f"{pruned['ppl']:.2f}"))
        rows.append(("bits per byte", f"{dense['bits_per_byte']:.4f}", f"{pruned['bits_per_byte']:.4f}"))
        rows.append(("eval windows", f"{dense['windows']}×{dense['max_seq_length']}", ""))
    for task, (d, p) in _task_pairs(summary.get("lm_eval")):
        rows.append((task, d, p))
    rows.append(("sparsity (block Linears)", "0.00%", f"{100 * summary['achieved_sparsity']:.2f}%"))
    rows.append(("fallbacks (see sparsity.json)", "", _fallback_counts(summary.get("fallbacks") or {})))
    rows.append(("prune wall time", "", f"{summary['prune_seconds']:.1f} s"))
    rows.append(("peak RSS", "", f"{summary['peak_rss_mib']:.0f} MiB"))
    title = f"{summary['model']} · {summary['method']} · {summary['sparsity']}"
    return render_table(title, rows, summary.get("output_dir"))


def _fallback_counts(fallbacks: dict[str, list[str]]) -> str:
    """``"2 diagonal_hessian, 1 kept_original_weights"``: modules per fallback kind, or ``none``."""
    counts: dict[str, int] = {}
    for kinds in fallbacks.values():
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"


def _task_pairs(lm_eval: dict[str, Any] | None):
    """(task metric, (dense, pruned)) rows from lm_eval_scores results."""
    if not lm_eval or not lm_eval.get("pruned"):
        return []
    rows = []
    dense_tasks = (lm_eval.get("dense") or {}).get("tasks", {})
    for task, metrics in lm_eval["pruned"].get("tasks", {}).items():
        for name in ("acc", "acc_norm"):
            if name in metrics:
                d = dense_tasks.get(task, {}).get(name)
                rows.append(
                    (f"{task} {name}", (f"{d:.3f}" if isinstance(d, float) else ""), f"{metrics[name]:.3f}")
                )
    return rows
