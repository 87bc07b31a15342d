"""``llmprune sweep``: prune at several sparsities, measure perplexity, plot the curve.

Each point starts from a freshly loaded model, so points are independent and each one is exactly what
``llmprune prune --sparsity S`` with the same settings would give.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from llmprune.cli.flags import (
    EVAL_LIMIT_HELP,
    add_calibration_flags,
    add_model_flags,
    add_pruning_flags,
    eval_limit,
)

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="perplexity-vs-sparsity curve for one method")
    p.add_argument("--recipe", help="YAML recipe for every setting but the sparsity (flags override)")
    p.add_argument("--sparsities", required=True, help="comma-separated targets, e.g. 0.3,0.5,0.7 or 0.5,2:4")
    p.add_argument("--no_dense", action="store_true", help="do not measure the dense model")
    add_model_flags(p)
    add_pruning_flags(p, with_sparsity=False)
    add_calibration_flags(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_dataset", help="held-out text for perplexity (default: built-in Austen novels)")
    g.add_argument("--eval_max_seq_length", type=int, help="perplexity window (default: --max_seq_length)")
    g.add_argument("--eval_limit", type=eval_limit, help=EVAL_LIMIT_HELP)
    g = p.add_argument_group("output")
    g.add_argument(
        "--output_dir", help="folder for sweep.json, sweep.md and sweep.png (default sweep-<method>)"
    )
    p.set_defaults(func=run)


def _perplexity(recipe, model, tok) -> dict[str, Any]:
    from llmprune.cli.eval import evaluate

    return evaluate(recipe, model, tok, tasks=[])["perplexity"]


def sweep_markdown(title: str, dense: dict[str, Any] | None, points: list[dict[str, Any]], plot: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| target | achieved sparsity | perplexity | bits per byte | prune s |",
        "|---|---|---|---|---|",
    ]
    if dense:
        lines.append(f"| dense | 0.00 % | {dense['ppl']:.3f} | {dense['bits_per_byte']:.4f} | – |")
    lines += [
        f"| {p['sparsity']} | {100 * p['achieved_sparsity']:.2f} % | {p['ppl']:.3f} "
        f"| {p['bits_per_byte']:.4f} | {p['prune_seconds']:.1f} |"
        for p in points
    ]
    return "\n".join([*lines, "", f"![perplexity vs sparsity]({plot})", ""])


def run(args: argparse.Namespace) -> int:
    import llmprune
    from llmprune.errors import ConfigError
    from llmprune.preflight import check_recipe
    from llmprune.recipe import resolve_recipe
    from llmprune.reports import plot_sparsity_curve, write_json, write_text

    base = resolve_recipe({k: v for k, v in vars(args).items() if k != "sparsities"}, command="sweep")
    targets = [t.strip() for t in args.sparsities.split(",") if t.strip()]
    if not targets:
        raise ConfigError("--sparsities is empty: give targets such as 0.3,0.5,0.7.")
    if base.model.streaming:
        log.warning("the recipe's model.streaming is ignored by sweep: each point is measured in memory")
        base = base.with_overrides({"model.streaming": False})
    recipes = [base.with_overrides({"prune.sparsity": t}) for t in targets]  # validates every target first
    if base.recover.method:
        log.warning("the recipe's recover section is ignored by sweep: points are one-shot pruning only")
    name, method = base.model.name, base.prune.method
    out = Path(base.output_dir or f"sweep-{method}")
    check_recipe(base.with_overrides({"output_dir": None}))  # sweep writes reports, not a checkpoint

    dense, points = None, []
    for i, recipe in enumerate(recipes):
        model, tok = llmprune.load_model(name, dtype=recipe.model.dtype, device=recipe.model.device)
        if i == 0 and not args.no_dense:
            dense = _perplexity(recipe, model, tok)
            log.info("dense: perplexity %.3f", dense["ppl"])
        t0 = time.perf_counter()
        result = llmprune.prune(model, tok, **recipe.prune_kwargs())
        seconds = time.perf_counter() - t0
        ppl = _perplexity(recipe, model, tok)
        points.append(
            {
                "sparsity": recipe.prune.sparsity,
                "achieved_sparsity": result.overall_sparsity,
                "ppl": ppl["ppl"],
                "bits_per_byte": ppl["bits_per_byte"],
                "prune_seconds": seconds,
                "calibration_hash": result.calibration_hash,
                "perplexity": ppl,
            }
        )
        log.info(
            "%s %s: perplexity %.3f (%.1f%% sparse)",
            method,
            recipe.prune.sparsity,
            ppl["ppl"],
            100 * result.overall_sparsity,
        )
        del model

    title = f"{method} on {Path(name).name if Path(name).exists() else name}"
    plot = plot_sparsity_curve(
        points, out / "sweep.png", dense_ppl=dense["ppl"] if dense else None, title=title
    )
    write_json(
        out / "sweep.json",
        {
            "llmprune_version": llmprune.__version__,
            "recipe": base.to_dict(),
            "dense": dense,
            "points": points,
        },
    )
    write_text(out / "sweep.md", sweep_markdown(title, dense, points, plot.name))
    base.save(out / "recipe.yaml")
    print(sweep_markdown(title, dense, points, plot.name).split("\n\n![")[0])
    print(f"\nwritten to {out}")
    return 0
