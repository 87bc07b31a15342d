"""iCBS against SparseGPT and Wanda on SmolLM2, and its quality-time curve; same tokens as bench_quality.py.

    python scripts/bench_icbs.py --workers 2

Runs go two at a time, one thread each, on the 2-core machine (``--workers``; several invocations
share the job list), so every run, SparseGPT's and iCBS's alike, shares the machine with one other
single-thread run and the wall-time multiple compares runs under the same load. The curve re-runs iCBS
at 50 % with ``--curve_steps`` (default 0, 5, 10; the main row has 20; step 0 = SparseGPT's mask
with re-fitted weights). Wanda's perplexities come from bench_out/quality.json (perplexity does not
depend on load). Results accumulate in bench_out/icbs.json (the run resumes); the table goes to the
``icbs`` section of docs/benchmarks.md and the curve to docs/icbs_quality_time.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_one, save_json, write_section  # noqa: E402

SPARSITIES = ["0.5", "2:4", "0.7", "0.6"]
PLOT = Path(__file__).resolve().parent.parent / "docs" / "icbs_quality_time.png"


def _key(method: str, sparsity: str, options: dict) -> str:
    return f"{method}|{sparsity}|{json.dumps(options, sort_keys=True)}"


def _child(a: argparse.Namespace, method: str, sparsity: str, options: dict) -> dict:
    args = ["--model", a.model, "--data", str(a.data), "--threads", str(a.threads)]
    args += ["--one", method, sparsity, json.dumps(options)]
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _jobs(curve_steps: list[int]) -> list[tuple[str, str, dict]]:
    jobs = []
    for sparsity in SPARSITIES:
        jobs += [("sparsegpt", sparsity, {}), ("icbs", sparsity, {})]
    return jobs + [("icbs", "0.5", {"steps": s}) for s in curve_steps if s != 20]


def _plot(results: dict, wanda: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for key, r in results.items():
        method, sparsity, options = key.split("|", 2)
        if method == "icbs" and sparsity == "0.5" and "error" not in r:
            points.append((json.loads(options).get("steps", 20), r["prune_s"], r["ppl"]))
    if not points:
        return
    points.sort()
    sparsegpt = results.get(_key("sparsegpt", "0.5", {}), {})
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label="iCBS (steps per layer)")
    for steps, seconds, ppl in points:
        ax.annotate(str(steps), (seconds, ppl), textcoords="offset points", xytext=(4, 4))
    if "ppl" in sparsegpt:
        ax.axhline(
            sparsegpt["ppl"], color="tab:red", ls="--", label=f"SparseGPT ({sparsegpt['prune_s']:.0f} s)"
        )
    if wanda:
        ax.axhline(wanda, color="tab:green", ls=":", label="Wanda")
    ax.set_xlabel("prune wall time, s (1 thread, 2 runs side by side)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M, 50 % unstructured: iCBS quality vs time")
    ax.legend()
    fig.tight_layout()
    tmp = PLOT.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(PLOT)


def report(results: dict, quality: dict) -> str:
    from llmprune.solvers.icbs import DEFAULT_RIDGE

    def wanda(sparsity: str) -> float | None:
        return quality.get(_key("wanda", sparsity, {}), {}).get("ppl")

    lines = [
        "`scripts/bench_icbs.py`: same calibration and held-out tokens as the quality table (dense "
        f"{quality.get('dense', {}).get('ppl', float('nan')):.2f}). iCBS defaults: start from SparseGPT's "
        "mask and weights, 20 block-coordinate-descent steps per layer (blocks of 32 weights per row, "
        f"8 pruned), kept weights re-fitted by CG least squares, ridge {DEFAULT_RIDGE[True]}. Every run "
        "(one thread) shared the 2-core machine with one other single-thread run, so `x SparseGPT time` "
        "compares equal load.",
        "",
        "| sparsity | Wanda ppl | SparseGPT ppl | iCBS ppl | iCBS vs SparseGPT | SparseGPT s | iCBS s "
        "| x SparseGPT time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sparsity in ["0.5", "0.6", "0.7", "2:4"]:
        sg = results.get(_key("sparsegpt", sparsity, {}), {})
        ic = results.get(_key("icbs", sparsity, {}), {})
        if "ppl" not in sg or "ppl" not in ic:
            continue
        w = wanda(sparsity)
        lines.append(
            f"| {sparsity} | {w:.2f} | {sg['ppl']:.2f} | **{ic['ppl']:.2f}** | "
            f"{100 * (ic['ppl'] / sg['ppl'] - 1):+.1f} % | {sg['prune_s']:.0f} | {ic['prune_s']:.0f} | "
            f"{ic['prune_s'] / sg['prune_s']:.2f} |"
            if w
            else f"| {sparsity} | – | {sg['ppl']:.2f} | {ic['ppl']:.2f} | | | | |"
        )
    curve = sorted(
        (json.loads(k.split("|", 2)[2]).get("steps", 20), r)
        for k, r in results.items()
        if k.startswith("icbs|0.5|") and "ppl" in r
    )
    if len(curve) > 1:
        lines += [
            "",
            "Quality-time curve at 50 % (steps per layer; 0 = SparseGPT's mask with CG-refitted weights), "
            "plotted in [icbs_quality_time.png](icbs_quality_time.png):",
            "",
            "| steps | ppl | prune wall s |",
            "|---|---|---|",
        ]
        lines += [f"| {steps} | {r['ppl']:.2f} | {r['prune_s']:.0f} |" for steps, r in curve]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=Path("bench_out/data"))
    p.add_argument("--out", type=Path, default=Path("bench_out/icbs.json"))
    p.add_argument("--work", type=Path, default=Path("bench_out/icbs"), help="one JSON per run")
    p.add_argument("--curve_only", action="store_true", help="only the extra curve runs")
    p.add_argument("--quality", type=Path, default=Path("bench_out/quality.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--curve_steps", default="0,5,10", help="extra iCBS 50 %% runs (20 is the main row)")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--one", nargs=3, metavar=("METHOD", "SPARSITY", "OPTIONS_JSON"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.model, a.data, a.one[0], a.one[1], json.loads(a.one[2]), a.threads)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        curve = [int(x) for x in a.curve_steps.split(",") if x]
        jobs = _jobs(curve) if not a.curve_only else _jobs(curve)[2 * len(SPARSITIES) :]

        def run(job: tuple[str, str, dict]) -> None:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", _key(*job)).strip("_")
            done = a.work / f"{name}.json"
            try:  # several invocations may share the work: the first to claim a job runs it
                os.close(os.open(done.with_suffix(".claim"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            print(f"running {_key(*job)} …", file=sys.stderr, flush=True)
            row = {"key": _key(*job), **_child(a, *job)}
            print(f"  {row}", file=sys.stderr, flush=True)
            save_json(done, row)
            if "error" in row:
                done.with_suffix(".claim").unlink()

        with ThreadPoolExecutor(a.workers) as pool:
            list(pool.map(run, jobs))
    results = {r["key"]: r for r in (json.loads(f.read_text()) for f in sorted(a.work.glob("*.json")))}
    save_json(a.out, results)
    quality = json.loads(a.quality.read_text()) if a.quality.exists() else {}
    _plot(results, quality.get(_key("wanda", "0.5", {}), {}).get("ppl"))
    body = report(results, quality)
    write_section("icbs", body)
    print(body)


if __name__ == "__main__":
    main()
