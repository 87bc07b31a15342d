"""The quality frontier on the embedded model: Wanda, SparseGPT, iCBS and ALPS x uniform / OWL / error.

    nice -n 19 python scripts/bench_frontier.py --workers 2               # the whole grid, test part
    python scripts/bench_frontier.py --sparsities 0.7 --methods sparsegpt,alps
    python scripts/bench_frontier.py --table_only --peers bench_out/peers  # + the reference code's rows

Every setting is the code's default, chosen on the validation part beforehand
(``scripts/choose_defaults.py``); this script scores the *test* part (Pride and Prejudice) only. Each
run is a fresh process (own peak RSS) whose record keeps the allocation settings it used; results
accumulate in ``bench_out/frontier.json`` so an interrupted sweep resumes. Runs are ordered by what the
issue asks first: uniform at the first three sparsities given (70 %, 2:4, 50 %), then each allocation
there in the order given, then the other sparsities; methods in the order given.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402

#: the reference-code rows the done-when items compare against (labels of scripts/peers/run_reference.py)
REFERENCES = ("ALPS (reference)", "OWL Wanda (reference)", "OWL SparseGPT (reference)")


class Sweep:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.results = json.loads(a.out.read_text()) if a.out.exists() else {}
        self.common = ["--model", a.model, "--data", str(a.data), "--threads", str(a.threads)]
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def _synced(self):
        """The results, merged with what other sweeps on the same file wrote since (one writer at a time,
        so concurrent or relaunched sweeps share one file without clobbering each other's rows)."""
        with self.lock, open(self.a.out.with_suffix(".lock"), "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            if self.a.out.exists():
                self.results.update(json.loads(self.a.out.read_text()))
            yield self.results

    def _record(self, key: str, args: list[str]) -> dict:
        if self.a.table_only:
            return self.results.get(key, {"error": "not run yet"})
        with self._synced() as results:
            done = key in results and "error" not in results[key]
        if not done:
            print(f"running {key} …", file=sys.stderr, flush=True)
            record = bench.child(__file__, [*self.common, *args])
            print(f"  {key}: {record}", file=sys.stderr, flush=True)
            with self._synced() as results:
                if "error" not in record or "error" in results.get(key, {"error": ""}):
                    results[key] = record  # a failure never replaces a row another sweep finished
                bench.save_json(self.a.out, results)
        return self.results[key]

    def dense(self) -> dict:
        return self._record("dense", ["--dense"])

    def run(self, method: str, sparsity: str, options: dict) -> dict:
        key = bench.run_key(method, sparsity, options)
        return self._record(key, ["--one", method, sparsity, json.dumps(options)])


def _allocation_label(options: dict, record: dict) -> str:
    allocation = options.get("allocation", "uniform")
    used = record.get("allocation_options") or {}
    return allocation + (" " + ", ".join(f"{k} {v}" for k, v in used.items()) if used else "")


def table(sweep: Sweep, rows: list[tuple[str, str, dict]], peers: list[dict]) -> str:
    dense = sweep.results.get("dense", {})
    lines = [
        f"Embedded SmolLM2-135M-Instruct; calibration {dense.get('calib_shape')} tokens of the built-in "
        f"calibration text (seed 0); perplexity on {dense.get('eval_shape')} windows of the **test** part of "
        f"the built-in held-out text (Pride and Prejudice); torch threads {dense.get('threads')}, under "
        "`nice -n 19` on a shared 2-core machine. `x dense fwd` = prune CPU time / CPU time of one dense "
        "forward over the calibration tokens (one thread, so CPU time does not count waiting for a core; "
        "each run in its own process; the prune figure includes loading the model, under a second). Every "
        "setting is the code's default, chosen on the validation part (Emma) only, except in rows that name "
        "their settings (`--options`). Reference rows: "
        "`scripts/peers/` on the very same token tensors.",
        "",
        "| method | sparsity | allocation | test ppl | achieved sparsity | x dense fwd |",
        "|---|---|---|---|---|---|",
    ]
    if dense:
        fwd = dense.get("dense_fwd_cpu_s", dense["dense_fwd_s"])
        lines.append(f"| dense | – | – | {dense['ppl']:.2f} | 0 | (fwd {fwd:.1f} CPU s) |")
    entries = [(m, s, o, sweep.results.get(bench.run_key(m, s, o))) for m, s, o in rows]
    entries += [  # runs with settings other than the defaults (--options), named by their settings
        (_method_label(r), r["sparsity"], r["options"], r)
        for r in sweep.results.values()
        if isinstance(r.get("options"), dict) and _settings_label(r["options"])
    ]
    entries += [(p["label"], p["sparsity"], {"allocation": p["allocation"]}, p) for p in peers]
    order = {s: i for i, s in enumerate(("0.5", "0.6", "0.7", "0.8", "2:4"))}
    for method, sparsity, options, r in sorted(entries, key=lambda e: order.get(e[1], 9)):
        if r is None or "error" in r:
            note = "FAILED: " + r["error"][:60] if r else "not run (budget)"
            lines.append(f"| {method} | {sparsity} | {options.get('allocation', 'uniform')} | {note} | | |")
            continue
        if "dense_fwd_cpu_s" in r:  # a reference run: its own dense forward, same process
            ratio = f"{r['prune_cpu_s'] / r['dense_fwd_cpu_s']:.1f}"
        elif "prune_cpu_s" in r and dense.get("dense_fwd_cpu_s"):
            ratio = f"{r['prune_cpu_s'] / dense['dense_fwd_cpu_s']:.1f}"
        else:
            ratio = "–"
        cells = [method, sparsity, _allocation_label(options, r), f"{r['ppl']:.2f}"]
        lines.append("| " + " | ".join([*cells, f"{r['achieved_sparsity']:.4f}", ratio]) + " |")
    return "\n".join(lines)


def _settings_label(options: dict) -> str:
    """The options beyond the allocation, e.g. ``rho 0.5, max_iterations 300`` ('' for code defaults)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(options.items()) if k != "allocation")


def _method_label(run: dict) -> str:
    """``alps`` for a run with code defaults, ``alps (rho 0.5)`` for one with other settings."""
    settings = _settings_label(run["options"])
    return f"{run['method']} ({settings})" if settings else run["method"]


def _runs(results: dict, sparsity: str, allocated: bool | None = None) -> list[tuple[str, float]]:
    """(label, test ppl) of every finished sweep run at ``sparsity``, defaults or not (a setting other
    than the defaults is named in the label); ``allocated`` True keeps only owl/error/depth rows, False
    only uniform ones."""
    runs = []
    for key, r in results.items():
        if key == "dense" or "ppl" not in r or r.get("sparsity") != sparsity:
            continue
        allocation = r["options"].get("allocation", "uniform")
        if allocated is None or allocated == (allocation != "uniform"):
            runs.append((f"{_method_label(r)} + {allocation}", r["ppl"]))
    return runs


def _verdict(
    item: str, ours: tuple[str, float] | None, base: tuple[str, float] | None, at_most: float, strict: bool
) -> str:
    """One row of the done-when table: met when ours / base perplexity is at most ``at_most`` (below it
    when ``strict``): 0.9 = at least 10 % lower, 1.0 strict = lower, 1.0 = no worse."""
    if ours is None or base is None:
        missing = " and ".join(x for x, v in (("ours", ours), ("baseline", base)) if v is None)
        cells = [item, ours[0] if ours else "–", base[0] if base else "–", "–", f"not measured ({missing})"]
        return "| " + " | ".join(cells) + " |"
    ratio = ours[1] / base[1]
    met = ratio < at_most if strict else ratio <= at_most
    cells = [item, f"{ours[0]}: {ours[1]:.2f}", f"{base[0]}: {base[1]:.2f}", f"{(ratio - 1) * 100:+.1f} %"]
    return "| " + " | ".join([*cells, "**met**" if met else "not met"]) + " |"


def done_when(results: dict, peers: list[dict]) -> str:
    """Issue 19's done-when items, read off the results (best = lowest test ppl of any configuration)."""

    def best(sparsity: str, allocated: bool | None = None) -> tuple[str, float] | None:
        runs = _runs(results, sparsity, allocated)
        return min(runs, key=lambda r: r[1]) if runs else None

    def one(method: str, sparsity: str, allocation: str) -> tuple[str, float] | None:
        opts = {} if allocation == "uniform" else {"allocation": allocation}
        r = results.get(bench.run_key(method, sparsity, opts), {})
        return (f"{method} + {allocation}", r["ppl"]) if "ppl" in r else None

    lines = [
        "| done-when item | llmprune | against | change in ppl | verdict |",
        "|---|---|---|---|---|",
        _verdict(
            "70 %: best with an allocation ≥ 10 % below iCBS uniform",
            best("0.7", True),
            one("icbs", "0.7", "uniform"),
            0.9,
            False,
        ),
        _verdict(
            "2:4: best configuration ≥ 5 % below iCBS uniform",
            best("2:4"),
            one("icbs", "2:4", "uniform"),
            0.95,
            False,
        ),
    ]
    for method in ("wanda", "sparsegpt"):
        lines.append(
            _verdict(
                f"70 %: OWL lowers {method}",
                one(method, "0.7", "owl"),
                one(method, "0.7", "uniform"),
                1.0,
                True,
            )
        )
    for sparsity in ("0.7", "2:4", "0.5"):
        found = {p["label"]: p for p in peers if p["sparsity"] == sparsity}
        for label in dict.fromkeys([*REFERENCES, *found]):  # a reference not run is listed as such
            word = "no worse than" if sparsity == "0.5" else "below"
            name = {"0.7": "70 %", "0.5": "50 %"}.get(sparsity, sparsity)
            peer = found.get(label)
            lines.append(
                _verdict(
                    f"{name}: best llmprune {word} {label}",
                    best(sparsity),
                    (label, peer["ppl"]) if peer else None,
                    1.0,
                    sparsity != "0.5",
                )
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_run_args(p, out="bench_out/frontier.json", section="frontier")
    p.set_defaults(data=Path("bench_out/data16"), eval_windows=16)
    p.add_argument("--methods", default="wanda,sparsegpt,icbs,alps")
    p.add_argument("--sparsities", default="0.7,2:4,0.5,0.6,0.8")
    p.add_argument("--allocations", default="owl,error", help="besides uniform (unstructured targets only)")
    p.add_argument("--skip", default="", help="cells left out for the time budget: method@sparsity,...")
    p.add_argument(
        "--only",
        default="",
        help="run just these cells, in this order: method@sparsity@allocation,... (the table lists all)",
    )
    p.add_argument("--workers", type=int, default=1, help="runs at a time (each in its own process)")
    p.add_argument("--options", default="{}", help="JSON of solver options added to every cell of this sweep")
    p.add_argument("--table_only", action="store_true", help="write the table from the results so far")
    p.add_argument("--peers", type=Path, default=None, help="directory of reference-code results to list")
    a = p.parse_args()

    if a.one:
        options = json.loads(a.one[2])
        rec = bench.run_one(a.model, a.data, a.one[0], a.one[1], options, a.threads)
        print(json.dumps(rec))
        return
    if a.dense:
        print(json.dumps(bench.run_dense(a.model, a.data, a.threads)))
        return

    if not all((a.data / f"{part}.pt").exists() for part in ("calib", "test", "valid")):
        import llmprune  # the tokenizer, once (not a model per sweep: memory is shared with the children)

        _, tok = llmprune.load_model(a.model)
        bench.make_data(a.data, tok, a.num_calibration_samples, a.max_seq_length, a.eval_windows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(a)
    pool = ThreadPoolExecutor(a.workers)
    dense = None if a.table_only else pool.submit(sweep.dense)
    methods, sparsities = a.methods.split(","), a.sparsities.split(",")
    skip = {tuple(x.split("@")) for x in a.skip.split(",") if x}
    rows: list[tuple[str, str, dict]] = []
    for sparsity in sparsities:
        for method in methods:
            if (method, sparsity) in skip:
                continue
            rows.append((method, sparsity, {}))
            if ":" not in sparsity:  # allocations spread unstructured sparsity only
                rows += [(method, sparsity, {"allocation": x}) for x in a.allocations.split(",") if x]
    rank = {s: i for i, s in enumerate(sparsities)}
    kinds = ["uniform", *a.allocations.split(",")]
    jobs = sorted(
        rows, key=lambda r: (rank[r[1]] >= 3, kinds.index(r[2].get("allocation", "uniform")), rank[r[1]])
    )
    if a.only:  # cells named by hand, e.g. the ones that decide the done-when items first
        cells = [x.split("@") for x in a.only.split(",") if x]
        jobs = [(m, s, {} if x == "uniform" else {"allocation": x}) for m, s, x in cells]
    jobs = [(m, s, {**json.loads(a.options), **o}) for m, s, o in jobs]
    if not a.table_only:
        list(pool.map(lambda job: sweep.run(*job), jobs))
        dense.result()
    peers = [json.loads(f.read_text()) for f in sorted(a.peers.glob("*.json"))] if a.peers else []
    body = table(sweep, rows, peers) + "\n\nDone-when items of issue 19, read off these rows:\n\n"
    body += done_when(sweep.results, peers)
    bench.write_section(a.section, body)
    print(body)


if __name__ == "__main__":
    main()
