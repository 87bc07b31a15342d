"""The quality frontier on the embedded model: Wanda, SparseGPT and ALPS, uniform vs non-uniform sparsity.

    nice -n 10 python scripts/bench_frontier.py                 # choose on validation, report on test
    python scripts/bench_frontier.py --sparsities 0.7 --methods sparsegpt,alps

Phase 1 chooses, on the *validation* part of the built-in held-out text (Emma) only: OWL's λ per
method at 70 % (ALPS takes SparseGPT's, to save its solve time) and ALPS's comparison group
(``scope``). Phase 2 runs every method x sparsity x allocation with those choices, and the table
reports the *test* part (Pride and Prejudice) only. Every run is a fresh process (own peak RSS);
results accumulate in ``bench_out/frontier.json`` so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402


class Sweep:
    def __init__(self, a: argparse.Namespace, valid: bool) -> None:
        self.a = a
        self.results = json.loads(a.out.read_text()) if a.out.exists() else {}
        self.common = ["--model", a.model, "--data", str(a.data), "--threads", str(a.threads)]
        self.common += ["--valid"] if valid else []
        self.lock = threading.Lock()

    def _record(self, key: str, args: list[str]) -> dict:
        if self.a.table_only:
            return self.results.get(key, {"error": "not run yet"})
        if key not in self.results or "error" in self.results[key]:
            print(f"running {key} …", file=sys.stderr, flush=True)
            record = bench.child(__file__, [*self.common, *args])
            print(f"  {key}: {record}", file=sys.stderr, flush=True)
            with self.lock:
                self.results[key] = record
                bench.save_json(self.a.out, self.results)
        return self.results[key]

    def dense(self) -> dict:
        return self._record("dense", ["--dense"])

    def run(self, method: str, sparsity: str, options: dict) -> dict:
        key = bench.run_key(method, sparsity, options)
        return self._record(key, ["--one", method, sparsity, json.dumps(options)])

    def best(self, method: str, sparsity: str, candidates: list[dict]) -> dict:
        """The candidate with the lowest *validation* perplexity."""
        scored = [
            (self.run(method, sparsity, c).get("ppl_valid", float("inf")), i)
            for i, c in enumerate(candidates)
        ]
        return candidates[min(scored)[1]]


def table(sweep: Sweep, rows: list[tuple[str, str, dict]], choices: dict) -> str:
    dense = sweep.results.get("dense", {})
    lines = [
        f"Embedded SmolLM2-135M-Instruct; calibration {dense.get('calib_shape')} tokens of the built-in "
        f"calibration text (seed 0); perplexity on {dense.get('eval_shape')} windows of the **test** part of "
        f"the built-in held-out text (Pride and Prejudice); torch threads {dense.get('threads')}, under "
        "`nice` on a shared 2-core machine. `x dense fwd` = prune wall time / one dense forward over the "
        "calibration tokens (each in its own process). Choices made on the validation part (Emma) only: "
        + "; ".join(f"{k}: {v}" for k, v in choices.items())
        + ".",
        "",
        "| method | sparsity | allocation | test ppl | achieved sparsity | x dense fwd |",
        "|---|---|---|---|---|---|",
    ]
    if dense:
        lines.append(f"| dense | – | – | {dense['ppl']:.2f} | 0 | (fwd {dense['dense_fwd_s']:.1f} s) |")
    for method, sparsity, options in rows:
        r = sweep.results.get(bench.run_key(method, sparsity, options))
        allocation = options.get("allocation", "uniform")
        extra = {k: v for k, v in options.items() if k != "allocation"}
        label = allocation + (f" {json.dumps(extra)}" if extra else "")
        if r is None or "error" in r:
            lines.append(
                f"| {method} | {sparsity} | {label} | {'FAILED: ' + r['error'][:60] if r else '–'} | | |"
            )
            continue
        ratio = r["prune_s"] / dense["dense_fwd_s"] if dense else float("nan")
        cells = [method, sparsity, label, f"{r['ppl']:.2f}", f"{r['achieved_sparsity']:.4f}", f"{ratio:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_run_args(p, out="bench_out/frontier.json", section="frontier")
    p.add_argument("--methods", default="wanda,sparsegpt,alps")
    p.add_argument("--sparsities", default="0.5,0.7,2:4")
    p.add_argument("--alps_sparsities", default="0.7,2:4", help="ALPS is slow on a shared CPU: a subset")
    p.add_argument("--owl_lambdas", default="0.04,0.08,0.12", help="one value: no choice on validation")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (each in its own process)")
    p.add_argument("--valid", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--table_only", action="store_true", help="write the table from the results so far")
    p.add_argument("--allocations", default="error,depth", help="also run these at 70 %% (not ALPS)")
    p.add_argument("--choose_alps_scope", action="store_true", help="try scope=row on validation too")
    a = p.parse_args()

    if a.one:
        options = json.loads(a.one[2])
        rec = bench.run_one(a.model, a.data, a.one[0], a.one[1], options, a.threads, valid=a.valid)
        print(json.dumps(rec))
        return
    if a.dense:
        print(json.dumps(bench.run_dense(a.model, a.data, a.threads)))
        return

    import llmprune

    _, tok = llmprune.load_model(a.model)
    bench.make_data(a.data, tok, a.num_calibration_samples, a.max_seq_length, a.eval_windows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    lambdas = [float(x) for x in a.owl_lambdas.split(",")]
    sweep = Sweep(a, valid=len(lambdas) > 1 or a.choose_alps_scope)
    pool = ThreadPoolExecutor(a.workers)
    dense = None if a.table_only else pool.submit(sweep.dense)
    methods, sparsities = a.methods.split(","), a.sparsities.split(",")

    # phase 1: choices on the validation part
    choices: dict[str, str] = {}
    owl = {}
    candidates = [{"allocation": "owl", "owl_lambda": lam} for lam in lambdas]
    for method in [m for m in ("wanda", "sparsegpt") if m in methods]:
        owl[method] = sweep.best(method, "0.7", candidates) if len(lambdas) > 1 else candidates[0]
        choices[f"{method} owl_lambda"] = str(owl[method]["owl_lambda"]) + (
            "" if len(lambdas) > 1 else " (the paper's default, not chosen here)"
        )
    alps_base: dict = {}
    if "alps" in methods:
        owl["alps"] = owl.get("sparsegpt", {"allocation": "owl", "owl_lambda": 0.08})
        choices["alps owl_lambda"] = f"{owl['alps']['owl_lambda']} (SparseGPT's)"
        if a.choose_alps_scope:
            alps_base = sweep.best("alps", "0.7", [{}, {"scope": "row"}])
        choices["alps scope"] = alps_base.get("scope", "matrix") + (
            "" if a.choose_alps_scope else " (reference)"
        )

    # phase 2: the grid, reported on the test part
    rows: list[tuple[str, str, dict]] = []
    for sparsity in sparsities:
        for method in methods:
            if method == "alps" and sparsity not in a.alps_sparsities.split(","):
                continue
            base = alps_base if method == "alps" else {}
            rows.append((method, sparsity, dict(base)))
            if ":" not in sparsity:  # allocations spread unstructured sparsity only
                rows.append((method, sparsity, {**base, **owl[method]}))
            if sparsity == "0.7" and method != "alps":  # the other allocations, at their defaults
                rows += [(method, sparsity, {"allocation": x}) for x in a.allocations.split(",") if x]
    # the headline targets and the new solver first: a sweep cut short still answers them
    first, order = {"0.7": 0, "2:4": 1}, {"alps": 0, "sparsegpt": 1}
    jobs = sorted(rows, key=lambda r: (first.get(r[1], 2), "allocation" in r[2], order.get(r[0], 2)))
    if not a.table_only:
        list(pool.map(lambda job: sweep.run(*job), jobs))
        dense.result()
    body = table(sweep, rows, choices)
    bench.write_section(a.section, body)
    print(body)


if __name__ == "__main__":
    main()
