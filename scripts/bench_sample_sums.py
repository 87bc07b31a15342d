"""What summing statistics per sample (so that torchrun's result does not depend on the process count)
costs against the per-batch sums it replaced, on the embedded model's real Linear inputs.

    flock /work/wt/timed.lock nice -n 0 python scripts/bench_sample_sums.py --blocks 3

The first ``--blocks`` decoder blocks of SmolLM2 are run densely over ``--samples`` windows in batches
of 8; every Linear's inputs are recorded once, then added to fresh statistics accumulators both ways in
the same process: per batch (one ``x^T x`` per batch, summed over a tree of batches: the old order)
and per sample (one ``x^T x`` per sample, folded in chunks of 8, the chunks summed over a tree: what
the engine does now). Reported: both times, as a ratio and against the block forwards that produced
the inputs (what calibration costs anyway), and the largest number of full-size partial sums alive.
Writes the section "Statistics per sample" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402

import llmprune  # noqa: E402
from llmprune.calibration import engine  # noqa: E402
from llmprune.calibration.capture import call_block, capture_block_inputs  # noqa: E402
from llmprune.calibration.modules import find_blocks, prunable_linears  # noqa: E402
from llmprune.calibration.stats import StatsAccumulator  # noqa: E402
from llmprune.solvers.types import HESSIAN, SQ_NORMS  # noqa: E402

NEEDS = frozenset({HESSIAN, SQ_NORMS})


class _Peak(StatsAccumulator):
    """Counts the full-size partial sums alive after each add (finished nodes, open fold, open term)."""

    peak = 0

    def add(self, x, unit=None):
        super().add(x, unit)
        alive = len(self._done) + (self._fold is not None) + (self._term is not None)
        self.peak = max(self.peak, alive)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = llmprune.load_model(args.model)
    ids = torch.randint(
        0, model.config.vocab_size, (args.samples, args.seq), generator=torch.Generator().manual_seed(0)
    )
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], ids, 8)
    recorded = []  # (block, batch) -> [(leader, [inputs per call])]
    forward = 0.0
    for block in blocks[: args.blocks]:
        modules = prunable_linears(block)
        rec = engine._InputRecorder(modules)
        for j, hidden in enumerate(inputs.hidden):
            t0 = time.perf_counter()
            out = call_block(block, hidden, inputs.args[j], inputs.kwargs[j])
            forward += time.perf_counter() - t0
            leaders: dict[int, str] = {}
            calls: dict[str, list] = {}
            for name, x in rec.take():
                if leaders.setdefault(id(x), name) == name:
                    calls.setdefault(name, []).append(x)
            recorded.append((block, j, hidden, calls))
            inputs.hidden[j] = out
        rec.remove()

    def per_batch() -> tuple[float, int]:
        accs: dict = {}
        t0 = time.perf_counter()
        for block, j, _hidden, calls in recorded:
            for name, xs in calls.items():
                acc = accs.setdefault(
                    (id(block), name), _Peak(xs[0].shape[-1], NEEDS, torch.device("cpu"), chunk=1)
                )
                for x in xs:
                    acc.add(x, j)
        for acc in accs.values():
            acc.result()
        return time.perf_counter() - t0, max(a.peak for a in accs.values())

    def per_sample() -> tuple[float, int]:
        accs: dict = {}
        t0 = time.perf_counter()
        for block, j, hidden, calls in recorded:
            for name, xs in calls.items():
                acc = accs.setdefault((id(block), name), _Peak(xs[0].shape[-1], NEEDS, torch.device("cpu")))
                engine._add_per_sample(acc, name, xs, hidden, inputs.starts[j])
        for acc in accs.values():
            acc.result()
        return time.perf_counter() - t0, max(a.peak for a in accs.values())

    times = {"batch": [], "sample": []}
    peaks = {}
    for _ in range(3):  # interleaved, best of three
        for key, fn in (("batch", per_batch), ("sample", per_sample)):
            seconds, peaks[key] = fn()
            times[key].append(seconds)
    batch, sample = min(times["batch"]), min(times["sample"])
    rows = [
        "## Statistics per sample (torchrun's process-count independence)",
        "",
        f"SmolLM2-135M, first {args.blocks} blocks, {args.samples} × {args.seq} tokens, batches of 8, "
        f"{args.threads} threads, statistics = squared norms and Hessians of every Linear (best of 3, "
        "interleaved, one process):",
        "",
        "| summed | seconds | vs per batch | vs the block forwards | full-size partial sums alive (max) |",
        "|---|---|---|---|---|",
        f"| per batch (before) | {batch:.2f} | 1.00× | {batch / forward:.2f}× | {peaks['batch']} |",
        f"| per sample, chunks of 8 (now) | {sample:.2f} | {sample / batch:.2f}× | {sample / forward:.2f}× "
        f"| {peaks['sample']} |",
        "",
        f"The block forwards that produced these inputs took {forward:.2f} s. Command: `python "
        f"scripts/bench_sample_sums.py --samples {args.samples} --seq {args.seq} --blocks {args.blocks} "
        f"--threads {args.threads} --write`.",
    ]
    body = "\n".join(rows)
    print(body)
    if args.write:
        bench.write_section("Statistics per sample", body)


if __name__ == "__main__":
    main()
