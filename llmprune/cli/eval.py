"""``llmprune eval``: perplexity and lm-eval scores of a model, as a table, ``results.json`` and markdown.

Flags follow lm-eval's names (``--tasks --num_fewshot --limit --batch_size --output_path
--include_path``) and llmprune's (``--model --eval_dataset --max_seq_length --recipe``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from llmprune.cli.flags import EVAL_LIMIT_HELP, eval_limit
from llmprune.io.models import DEFAULT_MODEL

log = logging.getLogger(__name__)


def _limit(text: str) -> int | float:
    """lm-eval's ``--limit``: a count (``16``) or a fraction of each task (``0.25``)."""
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and lm-eval scores of a model")
    p.add_argument("--recipe", help="YAML recipe; its model and eval sections apply (flags override)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", help=f"Hub id, local folder (e.g. a pruned output), .gguf, or {DEFAULT_MODEL!r}"
    )
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)"
    )
    g = p.add_argument_group("lm-eval")
    g.add_argument(
        "--tasks", help="comma-separated lm-eval tasks (default llmprune_mc, shipped); 'none' to skip"
    )
    g.add_argument("--include_path", help="folder of extra lm-eval task YAMLs (needed offline)")
    g.add_argument("--num_fewshot", type=int, help="few-shot examples per prompt (default 0)")
    g.add_argument("--limit", type=_limit, help="documents per task, or a fraction below 1 (default: all)")
    g.add_argument("--seed", type=int, help="lm-eval's random, numpy, torch and few-shot seeds (default 0)")
    g = p.add_argument_group("perplexity")
    g.add_argument("--eval_dataset", help="held-out text (default: built-in Austen novels); 'none' to skip")
    g.add_argument("--max_seq_length", type=int, help="perplexity window (default 2048, at most the model's)")
    g.add_argument("--eval_limit", type=eval_limit, help=EVAL_LIMIT_HELP)
    g.add_argument("--batch_size", type=int, help="sequences per forward, both parts (default 8)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--output_path",
        help="folder for results.json, results.md and recipe.yaml (eval_recipe.yaml in a model folder); "
        "nothing is written without it",
    )
    p.set_defaults(func=run)


def evaluate(recipe, model, tokenizer, *, tasks: list[str], perplexity: bool = True) -> dict[str, Any]:
    """Measure what the recipe's ``eval`` section asks for on a loaded model."""
    from llmprune.evaluation.harness import lm_eval_scores
    from llmprune.evaluation.perplexity import perplexity as measure

    out: dict[str, Any] = {"perplexity": None, "lm_eval": None}
    if perplexity:
        out["perplexity"] = measure(model, tokenizer, **recipe.perplexity_kwargs())
    if tasks:
        out["lm_eval"] = lm_eval_scores(model, tokenizer, **{**recipe.lm_eval_kwargs(), "tasks": tasks})
    return out


def format_table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    ppl = results.get("perplexity")
    if ppl:
        rows.append(("perplexity", f"{ppl['ppl']:.3f}"))
        rows.append(("bits per byte", f"{ppl['bits_per_byte']:.4f}"))
        rows.append(("eval windows", f"{ppl['windows']}×{ppl['max_seq_length']}"))
    for task, scores in ((results.get("lm_eval") or {}).get("tasks") or {}).items():
        for metric, value in scores.items():
            if metric not in ("version", "num_samples", "num_fewshot") and value is not None:
                rows.append((f"{task} {metric}", f"{value:.4f}"))
    if not rows:
        return "nothing measured"
    width = max(len(a) for a, _ in rows)
    title = str(results.get("model", ""))
    return "\n".join([title, "-" * len(title)] + [f"{a:<{width}}  {b:>10}" for a, b in rows])


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmprune.evaluation.harness import DEFAULT_TASKS, task_manager
    from llmprune.io.models import load_model
    from llmprune.preflight import before_loading
    from llmprune.recipe import resolve_recipe
    from llmprune.reports import write_report

    flags = dict(vars(args))
    skip_ppl = isinstance(flags.get("eval_dataset"), str) and flags["eval_dataset"].lower() == "none"
    skip_tasks = isinstance(flags.get("tasks"), str) and flags["tasks"].strip().lower() == "none"
    flags.update({k: None for k, skip in (("eval_dataset", skip_ppl), ("tasks", skip_tasks)) if skip})
    recipe = resolve_recipe(flags, command="eval")
    tasks = [] if skip_tasks else list(recipe.eval.tasks or DEFAULT_TASKS)
    if tasks:
        task_manager(tasks, recipe.eval.include_path)  # unknown task names fail before the model loads
    before_loading(
        recipe.model.name,
        device=recipe.model.device,
        eval_dataset=None if skip_ppl else recipe.eval.eval_dataset,
        max_seq_length=None if skip_ppl else recipe.eval.max_seq_length,
    )
    model, tok = load_model(recipe.model.name, dtype=recipe.model.dtype, device=recipe.model.device)
    results = {
        "model": recipe.model.name,
        **evaluate(recipe, model, tok, tasks=tasks, perplexity=not skip_ppl),
    }
    results["recipe"] = recipe.to_dict()
    print(format_table(results))
    if args.output_path:  # only when told: a recipe's output_dir is the pruned model's folder, not ours
        out = Path(args.output_path)
        write_report(out, results, plots=False)
        # beside a model, keep the model's own recipe.yaml: it is what made the weights
        holds_model = (out / "config.json").is_file() or (out / "sparsity.json").is_file()
        recipe.save(out / ("eval_recipe.yaml" if holds_model else "recipe.yaml"))
        print(f"results written to {out / 'results.json'}")
    return 0
