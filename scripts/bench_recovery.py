"""Perplexity recovered by PERP and LIFT on pruned SmolLM2, same tokens as bench_quality.py.

    python scripts/bench_recovery.py --pairs magnitude:0.5 --recover perp,lift --max_seconds 300

For each (method, sparsity) x recovery: load, prune with ``bench_out/data/calib.pt``, score on
``eval.pt``, recover for a fixed wall-clock budget on windows of the built-in calibration text, score
again, check that the keep-mask is unchanged. Writes bench_out/recovery.json and the ``recovery``
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import load_data, peak_rss_mib, save_json, window_perplexity, write_section  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", default="magnitude:0.5")
    p.add_argument("--recover", default="perp,lift")
    p.add_argument("--max_seconds", type=float, default=300)
    p.add_argument("--data", type=Path, default=Path("bench_out/data"))
    p.add_argument("--out", type=Path, default=Path("bench_out/recovery.json"))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import llmprune
    from llmprune.calibration.data import calibration_tokens
    from llmprune.recovery import recover

    torch.set_num_threads(a.threads)
    calib, ev = load_data(a.data)
    dense_ppl = json.loads(Path("bench_out/quality.json").read_text())["dense"]["ppl"]
    rows = []
    for pair in a.pairs.split(","):
        method, sparsity = pair.split(":", 1)
        for rec in a.recover.split(","):
            model, tok = llmprune.load_model(a.model)
            result = llmprune.prune(
                model,
                tok,
                method=method,
                sparsity=sparsity,
                dataset=calib,
                progress=False,
                num_calibration_samples=calib.shape[0],
                max_seq_length=calib.shape[1],
            )
            before = window_perplexity(model, ev)
            train = calibration_tokens(None, tok, 256, 256, seed=1)
            start = time.perf_counter()
            info = recover(
                model,
                method=rec,
                input_ids=train,
                keep_masks=result.keep_masks,
                steps=10_000,
                max_seconds=a.max_seconds,
            )
            seconds = time.perf_counter() - start
            after = window_perplexity(model, ev)
            same_mask = all(
                torch.equal(model.get_submodule(n).weight != 0, k) for n, k in result.keep_masks.items()
            )
            rows.append(
                {
                    "method": method,
                    "sparsity": sparsity,
                    "recover": rec,
                    "ppl_before": before,
                    "ppl_after": after,
                    "gap_closed": (before - after) / (before - dense_ppl),
                    "trainable_fraction": info.trainable_fraction,
                    "steps": info.steps_done,
                    "seconds": seconds,
                    "mask_unchanged": same_mask,
                    "peak_rss_mib": peak_rss_mib(),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
            save_json(a.out, rows)
    lines = [
        "`scripts/bench_recovery.py`: SmolLM2-135M pruned with the quality benchmark's calibration "
        f"tokens, then recovered for {a.max_seconds:.0f} s (1 thread) on 256×256 windows of the built-in "
        f"calibration text; perplexity on the same held-out windows (dense {dense_ppl:.2f}).",
        "",
        "| pruned | recovery | ppl before | ppl after | gap closed | trained params | steps "
        "| mask unchanged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} {r['sparsity']} | {r['recover']} | {r['ppl_before']:.2f} | "
            f"{r['ppl_after']:.2f} | {100 * r['gap_closed']:.0f} % | {100 * r['trainable_fraction']:.2f} % "
            f"| {r['steps']} | {'yes' if r['mask_unchanged'] else 'NO'} |"
        )
    write_section("recovery", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
