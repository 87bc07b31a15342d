"""``llmprune recover``: load a pruned model, retrain it briefly (PERP or LIFT), measure, save.

Every pruned weight stays exactly zero; the saved checkpoint is plain dense safetensors with the zeros.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from llmprune.cli.flags import EVAL_LIMIT_HELP, eval_limit
from llmprune.cli.table import render_table
from llmprune.io.models import DEFAULT_MODEL
from llmprune.recipe import parse_options
from llmprune.recovery.windows import (
    NUM_WINDOWS,
    SEED_OFFSET,
    TEACHER_SHARE,
    recovery_windows,
    teacher_budget,
    window_count,
)

log = logging.getLogger(__name__)

#: defaults for every flag (the names are ``recover()``'s keywords and the recipe's ``recover:`` keys)
DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "method": "perp",
    "mode": "retrain",
    "dense_model": None,
    "distill": None,  # None: 1 with --dense_model (retrain), else 0
    "dataset": None,
    "num_calibration_samples": None,  # None: NUM_WINDOWS, or what a time-budgeted distillation buys
    "max_seq_length": None,  # None: 256, or the model's positions if fewer
    "seed": 0,
    "recover_steps": None,  # None: 100 (retrain), per block blockwise.DEFAULT_STEPS (reconstruct)
    "recover_max_seconds": None,
    "lr": None,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.1,
    "weight_decay": 0.0,
    "optim": "adamw",
    "eval_dataset": None,
    "eval_max_seq_length": None,
    "eval_limit": None,
    "eval_batch_size": 2,
    "skip_eval": False,
    "output_dir": None,
    "device": "auto",
    "dtype": "float32",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recover", help="retrain a pruned model (PERP or LIFT) without losing its zeros")
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"pruned checkpoint: folder, .gguf, Hub id (default {DEFAULT_MODEL!r})")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    g = p.add_argument_group("recovery")
    g.add_argument(
        "--method", choices=["perp", "lift", "full"], help="perp (default): LoRA+norms+biases; lift; full"
    )
    g.add_argument(
        "--mode",
        choices=["retrain", "reconstruct"],
        help="retrain (default), or reconstruct block by block towards --dense_model's blocks",
    )
    g.add_argument("--dense_model", help="dense checkpoint (reconstruct targets, distill teacher)")
    g.add_argument("--distill", type=float, help="weight of KL to --dense_model, 0..1 (default 1 with it)")
    g.add_argument("--recover_steps", type=int, help="optimiser steps (default 100; reconstruct: per block)")
    g.add_argument("--recover_max_seconds", type=float, help="time budget; the schedule decays to 0 by then")
    g.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    g.add_argument("--batch_size", type=int, help="windows per step (default 4)")
    g.add_argument("--gradient_accumulation_steps", type=int, help="micro-batches per step (default 1)")
    g.add_argument("--warmup_ratio", type=float, help="linear warmup fraction (default 0.1)")
    g.add_argument("--weight_decay", type=float, help="decoupled weight decay (default 0)")
    g.add_argument("--optim", choices=["adamw", "adamw_8bit"], help="adamw (default) or bitsandbytes 8-bit")
    g.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="method option (r, lora, rank…), or precision=float32|bfloat16, gradient_checkpointing=false, "
        "teacher_top_k=K",
    )
    g = p.add_argument_group("training data")
    g.add_argument(
        "--dataset", help="training text: file, folder, Hub dataset, c4 (default: built-in recovery text)"
    )
    g.add_argument(
        "--num_calibration_samples",
        type=int,
        help=f"training windows (default {NUM_WINDOWS}; with --recover_max_seconds and --dense_model (perp, "
        f"lift), as many as {TEACHER_SHARE:.0%} of the budget's teacher pass buys)",
    )
    g.add_argument("--max_seq_length", type=int, help="tokens per window (default 256, at most the model's)")
    g.add_argument(
        "--seed",
        type=int,
        help="training seed (default 0); windows are drawn with seed + 1, not the ones `llmprune prune "
        "--seed S` calibrated on",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_dataset", help="held-out text for perplexity (default: built-in Austen novels)")
    g.add_argument("--eval_max_seq_length", type=int, help="perplexity window (default 512)")
    g.add_argument("--eval_limit", type=eval_limit, help=EVAL_LIMIT_HELP)
    g.add_argument("--eval_batch_size", type=int, help="windows per perplexity forward (default 2)")
    g.add_argument("--skip_eval", action="store_true", default=None, help="no perplexity")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", help="write the recovered checkpoint here (atomically)")
    g.add_argument(
        "--overwrite", action="store_true", help="replace --output_dir if an earlier llmprune run wrote it"
    )
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(DEFAULTS)
    settings.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    return settings


def recover_kwargs(s: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Resolved settings → ``recover()`` keywords (shared with ``llmprune prune --recover``)."""
    return {
        "method": s["method"],
        "mode": s["mode"],
        "distill": s["distill"],
        "steps": s["recover_steps"],
        "max_seconds": s["recover_max_seconds"],
        "lr": s["lr"],
        "batch_size": s["batch_size"],
        "gradient_accumulation_steps": s["gradient_accumulation_steps"],
        "warmup_ratio": s["warmup_ratio"],
        "weight_decay": s["weight_decay"],
        "optim": s["optim"],
        "seed": s["seed"],
        **options,
    }


def _saved_keep_masks(model_path: str):
    """Keep masks saved beside a pruned checkpoint (``masks.safetensors``), else None (zeros are used)."""
    folder = Path(model_path).expanduser()
    if not (folder / "masks.safetensors").is_file():
        return None
    from llmprune.io.masks import load_keep_masks

    return load_keep_masks(folder)


def run(args: argparse.Namespace) -> int:
    from llmprune.errors import ConfigError
    from llmprune.evaluation.perplexity import perplexity
    from llmprune.io.models import load_model
    from llmprune.preflight import before_loading, check_teacher, check_typed, max_positions
    from llmprune.recovery import RUN_OPTIONS, method_options, recover
    from llmprune.recovery.api import dense_targets, distill_problem, distils_from_topk
    from llmprune.recovery.blockwise import micro_batch_problem

    s = resolve(args)
    options = parse_options(args.option or [])  # the recipes' YAML scalars: '2:4' stays text
    allowed = {**method_options(s["method"]), **RUN_OPTIONS}  # fail before loading anything
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ConfigError(f"unknown {s['method']} option {unknown[0]!r}: use one of {', '.join(allowed)}.")
    check_typed(allowed, options, f"recovery method {s['method']!r}", "--option")
    if s["mode"] == "reconstruct" and not s["dense_model"]:
        raise ConfigError("--mode reconstruct needs --dense_model PATH (the dense checkpoint to match).")
    problem = distill_problem(s["distill"], s["mode"])
    if problem:
        raise ConfigError(f"--distill {problem}")
    problem = micro_batch_problem(options.get("micro_batch"), s["mode"])
    if problem:
        raise ConfigError(f"--option micro_batch {problem}")
    if s["distill"] and not s["dense_model"]:
        raise ConfigError("--distill needs --dense_model PATH (the dense checkpoint, the teacher).")
    if options.get("hidden_distill") and not s["dense_model"]:
        raise ConfigError("--option hidden_distill needs --dense_model PATH (the block outputs it matches).")
    config = before_loading(
        s["model"],
        output_dir=s["output_dir"],
        overwrite=args.overwrite,
        dataset=s["dataset"],
        device=s["device"],
        max_seq_length=s["max_seq_length"],
        eval_dataset=None if s["skip_eval"] else s["eval_dataset"],
    )
    if s["dense_model"]:
        teacher_config = before_loading(s["dense_model"])
        check_teacher(config, teacher_config, s["dense_model"])
    model, tok = load_model(s["model"], dtype=s["dtype"], device=s["device"])
    dense = load_model(s["dense_model"], dtype=s["dtype"], device="cpu")[0] if s["dense_model"] else None
    if dense is not None:
        check_teacher(model.config, dense.config, s["dense_model"])
    eval_len = s["eval_max_seq_length"] or min(512, max_positions(model.config) or 512)
    s["max_seq_length"] = s["max_seq_length"] or min(256, max_positions(model.config) or 256)

    def measure() -> dict[str, float] | None:
        if s["skip_eval"]:
            return None
        return perplexity(
            model, tok, s["eval_dataset"], eval_len, limit=s["eval_limit"], batch_size=s["eval_batch_size"]
        )

    before = measure()
    kwargs, targets = recover_kwargs(s, options), None
    distils = dense is not None and distils_from_topk(kwargs)
    teacher_s = teacher_budget(s["method"], s["num_calibration_samples"], s["recover_max_seconds"], distils)
    count = window_count(s["num_calibration_samples"], teacher_s)
    ids = recovery_windows(s["dataset"], tok, model, count, s["max_seq_length"], s["seed"] + SEED_OFFSET)
    if dense is not None and s["mode"] == "retrain":
        targets = dense_targets(dense, ids, kwargs, max_seconds=teacher_s, min_windows=NUM_WINDOWS)
        dense = dense if targets is None else None  # the targets replace the teacher: freed before training
        ids = ids if targets is None else targets.input_ids  # a budget may use fewer
    result = recover(
        model,
        input_ids=ids,
        keep_masks=_saved_keep_masks(s["model"]),
        dense_model=dense,
        teacher_targets=targets,
        **kwargs,
    )
    after = measure()
    summary = {
        "model": s["model"],
        "method": s["method"],
        "mode": s["mode"],
        "perplexity": {"before": before, "after": after},
        "recovery": {k: v for k, v in result.to_dict().items() if k not in ("losses", "details")},
        "command": "llmprune " + " ".join(sys.argv[1:]) if sys.argv and "recover" in sys.argv else None,
    }
    if s["output_dir"]:
        from llmprune.io.save import save_pruned

        s["num_calibration_samples"] = result.options["windows"]  # resolved: reruns train on as many
        recipe = _recipe(s, options, distill=result.options["distill"], steps=result.options["steps"])
        metrics = None
        if after is not None:
            metrics = {
                "perplexity": {
                    "pruned": after["ppl"],  # this checkpoint's perplexity (the card's headline)
                    "before_recovery": before["ppl"],
                    "dataset": s["eval_dataset"] or "llmprune built-in held-out text (Austen)",
                    "seq_len": eval_len,
                    "windows": after["windows"],
                }
            }
        save_pruned(
            model, tok, s["output_dir"], recipe=recipe, run_info=summary, metrics=metrics,
            overwrite=args.overwrite,
        )  # fmt: skip
        summary["output_dir"] = s["output_dir"]
    print(json.dumps(summary, indent=2, default=str) if args.json else format_table(summary))
    return 0


def _recipe(s: dict[str, Any], options: dict[str, Any], distill: float, steps: int) -> dict[str, Any]:
    """The pruning recipe saved beside the input checkpoint (if any), with this run's ``recover`` section."""
    import yaml

    from llmprune.recovery import DEFAULT_LR

    source = Path(s["model"]).expanduser() / "recipe.yaml"
    recipe = yaml.safe_load(source.read_text(encoding="utf-8")) if source.is_file() else {"version": 1}
    recipe = recipe if isinstance(recipe, dict) else {"version": 1}
    recipe["recover"] = {
        "method": s["method"],
        "recover_steps": steps,  # resolved, like lr
        "recover_max_seconds": s["recover_max_seconds"],
        "lr": s["lr"] if s["lr"] is not None else DEFAULT_LR[s["method"]],  # resolved: reruns match
        "mode": s["mode"],
        "distill": distill,  # resolved, like lr
        "batch_size": s["batch_size"],
        "dataset": s["dataset"],
        "num_samples": s["num_calibration_samples"],
        "max_seq_length": s["max_seq_length"],
        "seed": s["seed"],
        "options": {
            **options,
            **{k: s[k] for k in ("gradient_accumulation_steps", "warmup_ratio", "weight_decay", "optim")},
        },
    }
    return recipe


def format_table(summary: dict[str, Any]) -> str:
    before, after = summary["perplexity"]["before"], summary["perplexity"]["after"]
    r = summary["recovery"]
    rows = [("", "pruned", "recovered")]
    if before and after:
        rows.append(("perplexity", f"{before['ppl']:.2f}", f"{after['ppl']:.2f}"))
        rows.append(("bits per byte", f"{before['bits_per_byte']:.4f}", f"{after['bits_per_byte']:.4f}"))
        rows.append(("eval windows", f"{before['windows']}×{before['max_seq_length']}", ""))
    rows.append(("sparsity (pruned Linears)", f"{100 * r['sparsity']:.2f}%", f"{100 * r['sparsity']:.2f}%"))
    rows.append(
        ("trained parameters", "", f"{r['trainable_params']:,} ({100 * r['trainable_fraction']:.3f}%)")
    )
    rows.append(("steps", "", f"{r['steps_done']} in {r['seconds']:.0f} s"))
    if r["first_loss"] is not None:
        rows.append(("training loss", f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}"))
    title = f"{summary['model']} · recover {summary['method']} ({summary['mode']})"
    return render_table(title, rows, summary.get("output_dir"))
