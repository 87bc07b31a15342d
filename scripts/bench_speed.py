"""Prune speed of each method as a multiple of one dense forward, medians of repeats in one process.

    python scripts/bench_speed.py --methods magnitude,wanda,sparsegpt --repeats 3

Each repeat reloads the model (pruning is in place), prunes with the same calibration tokens and
times it; the dense forward over those tokens is timed between repeats in the same process, so each
ratio compares like with like under whatever load the machine has. Writes bench_out/speed.json and
the ``speed`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import dense_forward_seconds, peak_rss_mib, save_json, write_section  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--num_calibration_samples", type=int, default=8)
    p.add_argument("--max_seq_length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench_out/speed.json"))
    a = p.parse_args()

    import llmprune
    from llmprune.calibration.data import calibration_tokens

    torch.set_num_threads(a.threads)
    model, tok = llmprune.load_model(a.model)
    calib = calibration_tokens(None, tok, a.num_calibration_samples, a.max_seq_length, seed=0)
    rows = {}
    for method in a.methods.split(","):
        ratios, seconds, dense = [], [], []
        for _ in range(a.repeats):
            model, _ = llmprune.load_model(a.model)
            dense.append(dense_forward_seconds(model, calib))
            start = time.perf_counter()
            llmprune.prune(
                model,
                tok,
                method=method,
                sparsity=a.sparsity,
                dataset=calib,
                progress=False,
                num_calibration_samples=calib.shape[0],
                max_seq_length=calib.shape[1],
            )
            seconds.append(time.perf_counter() - start)
            ratios.append(seconds[-1] / dense[-1])
        rows[method] = {
            "median_ratio": statistics.median(ratios),
            "ratios": ratios,
            "prune_s": seconds,
            "dense_fwd_s": dense,
        }
        print(method, rows[method], file=sys.stderr, flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_json(
        a.out, {"settings": vars(a) | {"out": str(a.out)}, "rows": rows, "peak_rss_mib": peak_rss_mib()}
    )
    lines = [
        f"`scripts/bench_speed.py`: SmolLM2-135M, sparsity {a.sparsity}, calibration "
        f"{a.num_calibration_samples}×{a.max_seq_length} tokens, {a.repeats} repeats, torch threads "
        f"{a.threads}. Ratio = prune wall time / one dense forward over the same tokens, timed just before "
        "in the same process.",
        "",
        "| method | median × dense forward | all repeats |",
        "|---|---|---|",
    ]
    for method, r in rows.items():
        lines.append(f"| {method} | {r['median_ratio']:.2f} | {', '.join(f'{x:.2f}' for x in r['ratios'])} |")
    write_section("speed", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
