"""SparseGPT's prune time as a ratio to one dense forward, at 1 and 2 torch threads, with and without
its one-thread pinning of the column sweep (``solvers/sparsegpt.py``).

    flock /work/wt/timed.lock nice -n 0 python scripts/bench_sparsegpt_threads.py

Wall-clock is the result, so it runs under the shared lock at normal priority. Calibration 32x512
tokens of the built-in calibration text (``bench_out/data``, as every frontier table); each ratio is
measured within one process (dense forward, then the prune, same thread count). "unpinned" replaces the
``intra_op_threads(1)`` context of the solver by a no-op, so the sweep's many small ops run on every
thread. Writes the ``sparsegpt-threads`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402


def one(model_name: str, data: Path, threads: int, pinned: bool) -> dict:
    import llmprune.solvers.sparsegpt as sparsegpt_module

    torch.set_num_threads(threads)
    if not pinned:
        sparsegpt_module.intra_op_threads = lambda _n: contextlib.nullcontext()
    import llmprune

    calib, _ = bench.load_data(data)
    model, _ = llmprune.load_model(model_name)
    fwd = bench.dense_forward_seconds(model, calib)
    _, result, seconds = bench.prune_fixed(model_name, data, "sparsegpt", "0.5", {})
    solve = sum(m.seconds for m in result.modules.values())
    return {"threads": threads, "pinned": pinned, "dense_fwd_s": fwd, "prune_s": seconds, "solve_s": solve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=Path("bench_out/data"))
    p.add_argument("--out", type=Path, default=Path("bench_out/sparsegpt_threads.json"))
    p.add_argument("--one", nargs=2, metavar=("THREADS", "PINNED"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.data, int(a.one[0]), a.one[1] == "1")))
        return
    import llmprune

    _, tok = llmprune.load_model(a.model)
    bench.make_data(a.data, tok, 32, 512, 32)
    runs = [
        bench.child(__file__, ["--data", str(a.data), "--one", t, pin])
        for t, pin in (("1", "1"), ("2", "1"), ("2", "0"))
    ]
    bench.save_json(a.out, runs)
    lines = [
        "`flock /work/wt/timed.lock nice -n 0 python scripts/bench_sparsegpt_threads.py`: SmolLM2, sparsity "
        f"0.5, calibration {list(bench.load_data(a.data)[0].shape)} tokens, each row one process (dense "
        f"forward then prune); measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| torch threads | sweep pinned to 1 thread | dense fwd s | prune s | solve s | prune / dense fwd |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| ? | ? | FAILED: {r['error'][:80]} | | | |")
            continue
        lines.append(
            f"| {r['threads']} | {'yes' if r['pinned'] else 'no'} | {r['dense_fwd_s']:.1f} | "
            f"{r['prune_s']:.1f} | {r['solve_s']:.1f} | {r['prune_s'] / r['dense_fwd_s']:.2f} |"
        )
    body = "\n".join(lines)
    bench.write_section("sparsegpt-threads", body)
    print(body)


if __name__ == "__main__":
    main()
