"""Quality and speed of every registered method on the embedded model, side by side with llm-compressor.

    python scripts/bench_quality.py                       # all methods x 0.5, 0.6, 0.7, 2:4
    python scripts/bench_quality.py --methods wanda,sparsegpt --sparsities 0.5,2:4
    python scripts/bench_quality.py --peer /tmp/peer/results/llmcompressor   # add the peer's rows

Each run is a fresh process (own peak RSS; a crash loses one row, not the sweep); results accumulate in
``bench_out/quality.json`` so an interrupted sweep resumes. Writes the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    add_run_args,
    child,
    make_data,
    run_dense,
    run_key,
    run_one,
    save_json,
    write_section,
)

PEER_RUNS = {
    "sparsegpt50": ("sparsegpt", "0.5"),
    "sparsegpt24": ("sparsegpt", "2:4"),
    "wanda50": ("wanda", "0.5"),
    "wanda24": ("wanda", "2:4"),
    "magnitude50_oneshot": ("magnitude", "0.5"),
}


def _peer_rows(peer: Path) -> list[str]:
    dense = json.loads((peer / "dense.json").read_text()) if (peer / "dense.json").exists() else {}
    rows = []
    for name, (method, sparsity) in PEER_RUNS.items():
        f = peer / f"{name}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        ratio = r["prune_s"] / dense["dense_fwd_full_s"] if dense.get("dense_fwd_full_s") else float("nan")
        rows.append(
            f"| llm-compressor {method} | {sparsity} | {r['ppl']:.2f} | {r['linear_sparsity']:.4f} | "
            f"{r['prune_s']:.0f} | {ratio:.2f} | {r.get('rss_peak_after_prune_mib', 0):.0f} |"
        )
    if dense:
        rows.insert(
            0,
            f"| llm-compressor dense | – | {dense['ppl']:.2f} | 0 | – | "
            f"(fwd {dense['dense_fwd_full_s']:.0f} s) | – |",
        )
    return rows


def table(results: dict, peer: Path | None) -> str:
    dense = results.get("dense", {})
    lines = [
        f"Embedded SmolLM2-135M-Instruct; calibration {dense.get('calib_shape')} tokens sampled from the "
        f"built-in calibration text (seed 0); held-out {dense.get('eval_shape')} windows of the built-in "
        "evaluation text; "
        f"torch threads {dense.get('threads')}. `x dense fwd` = prune wall time / one dense forward over the "
        "calibration tokens, measured by each tool in its own process (the peer's rows use its own dense "
        "forward).",
        "",
        "| method | sparsity | ppl | achieved sparsity | prune wall s | x dense fwd | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    if dense:
        lines.append(f"| dense | – | {dense['ppl']:.2f} | 0 | – | (fwd {dense['dense_fwd_s']:.0f} s) | – |")
    for key, r in results.items():
        if key == "dense":
            continue
        method, sparsity, options = key.split("|", 2)
        label = method + ("" if options == "{}" else f" {options}")
        if "error" in r:
            lines.append(f"| {label} | {sparsity} | FAILED: {r['error'][:80]} | | | | |")
            continue
        ratio = r["prune_s"] / dense["dense_fwd_s"] if dense else float("nan")
        lines.append(
            f"| {label} | {sparsity} | {r['ppl']:.2f} | {r['achieved_sparsity']:.4f} | {r['prune_s']:.0f} | "
            f"{ratio:.2f} | {r['rss_peak_after_prune_mib']:.0f} |"
        )
    if peer and peer.exists():
        lines += _peer_rows(peer)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, out="bench_out/quality.json", section="quality")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,icbs")
    p.add_argument("--sparsities", default="0.5,0.6,0.7,2:4")
    p.add_argument("--option", action="append", default=[], help="METHOD:KEY=VALUE solver option")
    p.add_argument("--peer", type=Path, default=None, help="llm-compressor results folder to include")
    a = p.parse_args()

    if a.one:
        print(json.dumps(run_one(a.model, a.data, a.one[0], a.one[1], json.loads(a.one[2]), a.threads)))
        return
    if a.dense:
        print(json.dumps(run_dense(a.model, a.data, a.threads)))
        return

    import yaml

    import llmprune

    _, tok = llmprune.load_model(a.model)
    make_data(a.data, tok, a.num_calibration_samples, a.max_seq_length, a.eval_windows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    common = ["--model", a.model, "--data", str(a.data), "--threads", str(a.threads)]
    if "dense" not in results:
        results["dense"] = child(__file__, [*common, "--dense"])
        save_json(a.out, results)
    options: dict[str, dict] = {}
    for opt in a.option:
        method, _, kv = opt.partition(":")
        key, _, value = kv.partition("=")
        options.setdefault(method, {})[key] = yaml.safe_load(value)
    for method in a.methods.split(","):
        for sparsity in a.sparsities.split(","):
            key = run_key(method, sparsity, options.get(method, {}))
            if key in results and "error" not in results[key]:
                continue
            print(f"running {key} …", file=sys.stderr, flush=True)
            results[key] = child(
                __file__, [*common, "--one", method, sparsity, json.dumps(options.get(method, {}))]
            )
            print(f"  {results[key]}", file=sys.stderr, flush=True)
            save_json(a.out, results)
    body = table(results, a.peer)
    write_section(a.section, body)
    print(body)


if __name__ == "__main__":
    main()
