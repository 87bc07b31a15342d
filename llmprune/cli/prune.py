"""``llmprune prune``: load, measure dense, prune, measure pruned, print the table, save."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from typing import Any

from llmprune.io.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

#: defaults for every flag, applied after the recipe: CLI > recipe > these
DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "method": "wanda",
    "sparsity": "0.5",
    "dataset": None,
    "num_calibration_samples": 128,
    "max_seq_length": 2048,
    "seed": 0,
    "batch_size": 8,
    "targets": None,
    "ignore": None,
    "true_sequential": False,
    "eval_dataset": None,
    "eval_max_seq_length": None,
    "eval_limit": None,
    "skip_eval": False,
    "output_dir": None,
    "device": "auto",
    "dtype": "float32",
}


def _options(pairs: list[str] | None) -> dict[str, Any]:
    """``--option block_size=64 --option update=true`` → typed solver options (YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"llmprune: error: --option expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model and report perplexity before and after")
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"Hub id, local folder, .gguf file, or {DEFAULT_MODEL!r} (default)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", help="registered solver: magnitude, wanda, sparsegpt, icbs (default wanda)")
    g.add_argument("--sparsity", help="fraction such as 0.5, or N:M such as 2:4 (keep 2 of every 4)")
    g.add_argument("--targets", nargs="*", help="module names, suffixes or re:patterns to prune (default: all)")
    g.add_argument("--ignore", nargs="*", help="module names, suffixes or re:patterns to leave dense")
    g.add_argument("--true_sequential", action="store_true", default=None, help="calibrate q,k,v → o → mlp in turn")
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="solver option, repeatable")
    g = p.add_argument_group("calibration")
    g.add_argument("--dataset", help="calibration text: file, folder, Hub dataset, c4, wikitext2, self")
    g.add_argument("--num_calibration_samples", type=int, help="windows of text (default 128)")
    g.add_argument("--max_seq_length", type=int, help="tokens per window (default 2048)")
    g.add_argument("--seed", type=int, help="sampling seed (default 0)")
    g.add_argument("--batch_size", type=int, help="windows per forward (default 8)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_dataset", help="held-out text for perplexity (default: built-in Austen novels)")
    g.add_argument("--eval_max_seq_length", type=int, help="perplexity window (default: --max_seq_length)")
    g.add_argument("--eval_limit", type=int, help="evaluate this many evenly spaced windows (default: all)")
    g.add_argument("--skip_eval", action="store_true", default=None, help="no perplexity")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", help="write the pruned checkpoint here (atomically)")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit flags over defaults."""
    settings = dict(DEFAULTS)
    settings.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    return settings


def _peak_rss_mib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run(args: argparse.Namespace) -> int:
    import llmprune
    from llmprune.evaluation.perplexity import perplexity

    s = resolve(args)
    options = _options(args.option)
    llmprune.get_solver(s["method"]).check_options(options)  # fail before loading anything
    llmprune.SparsitySpec.parse(s["sparsity"])
    model, tok = llmprune.load_model(s["model"], dtype=s["dtype"], device=s["device"])
    eval_len = s["eval_max_seq_length"] or min(s["max_seq_length"], 2048)

    def measure() -> dict[str, float] | None:
        if s["skip_eval"]:
            return None
        return perplexity(model, tok, s["eval_dataset"], eval_len, limit=s["eval_limit"], batch_size=s["batch_size"])

    dense = measure()
    t0 = time.perf_counter()
    result = llmprune.prune(
        model,
        tok,
        method=s["method"],
        sparsity=s["sparsity"],
        dataset=s["dataset"],
        num_calibration_samples=s["num_calibration_samples"],
        max_seq_length=s["max_seq_length"],
        seed=s["seed"],
        targets=s["targets"],
        ignore=s["ignore"],
        true_sequential=s["true_sequential"],
        batch_size=s["batch_size"],
        **options,
    )
    prune_seconds = time.perf_counter() - t0
    pruned = measure()
    summary = {
        "model": s["model"],
        "method": s["method"],
        "sparsity": s["sparsity"],
        "achieved_sparsity": result.overall_sparsity,
        "prune_seconds": prune_seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "perplexity": {"dense": dense, "pruned": pruned},
        "calibration_hash": result.calibration_hash,
    }
    if s["output_dir"]:
        from llmprune.io.save import save_pruned

        recipe = {k: v for k, v in s.items() if k not in ("skip_eval",)} | {"options": options}
        save_pruned(model, tok, s["output_dir"], result=result, recipe=recipe, run_info=summary,
                    metrics={"perplexity": _metric(dense, pruned, s, eval_len)})
        summary["output_dir"] = s["output_dir"]
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


def _metric(dense, pruned, s, eval_len) -> dict[str, Any] | None:
    if pruned is None:
        return None
    return {
        "dense": dense["ppl"],
        "pruned": pruned["ppl"],
        "dataset": s["eval_dataset"] or "llmprune built-in held-out text (Austen: Pride and Prejudice, Emma)",
        "seq_len": eval_len,
        "windows": pruned["windows"],
    }


def format_table(summary: dict[str, Any]) -> str:
    dense, pruned = summary["perplexity"]["dense"], summary["perplexity"]["pruned"]
    rows = [("", "dense", "pruned")]
    if dense and pruned:
        rows.append(("perplexity", f"{dense['ppl']:.2f}", f"{pruned['ppl']:.2f}"))
        rows.append(("bits per byte", f"{dense['bits_per_byte']:.4f}", f"{pruned['bits_per_byte']:.4f}"))
        rows.append(("eval windows", f"{dense['windows']}×{dense['max_seq_length']}", ""))
    rows.append(("sparsity (block Linears)", "0.00%", f"{100 * summary['achieved_sparsity']:.2f}%"))
    rows.append(("prune wall time", "", f"{summary['prune_seconds']:.1f} s"))
    rows.append(("peak RSS", "", f"{summary['peak_rss_mib']:.0f} MiB"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    title = f"{summary['model']} · {summary['method']} · {summary['sparsity']}"
    lines = [title, "-" * len(title)]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    if summary.get("output_dir"):
        lines.append(f"saved to {summary['output_dir']}")
    return "\n".join(lines)
