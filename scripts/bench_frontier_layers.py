"""Layer-level quality of the solvers on the embedded model: SparseGPT vs ALPS (and Wanda) on real layers.

    nice -n 10 python scripts/bench_frontier_layers.py --blocks 2

A cheap stand-in for the full perplexity sweep (``bench_frontier.py``) on a machine too busy for it:
the first ``--blocks`` decoder blocks of SmolLM2 are run densely over the fixed calibration windows and
over the *test* windows, each Linear's input Hessian is collected on both, every solver prunes the
Linear from the calibration Hessian, and the relative layer loss ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` is
measured on the calibration Hessian (what the solver minimised) and on the test Hessian (how it
transfers to other text). Solve times are reported as ratios to SparseGPT's on the same layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402

from llmprune.calibration.capture import call_block, capture_block_inputs  # noqa: E402
from llmprune.calibration.modules import WeightView, find_blocks, prunable_linears  # noqa: E402
from llmprune.calibration.stats import StatsAccumulator  # noqa: E402
from llmprune.registry import get_solver  # noqa: E402
from llmprune.solvers.types import HESSIAN, SQ_NORMS, LayerProblem, reconstruction_error  # noqa: E402
from llmprune.spec import SparsitySpec  # noqa: E402

NEEDS = frozenset({HESSIAN, SQ_NORMS})


@torch.no_grad()
def _block_stats(block, hidden, args, kwargs):
    """Input statistics of every Linear of ``block`` over the batches, and the block's dense outputs."""
    modules = prunable_linears(block)
    accs = {
        n: StatsAccumulator(WeightView(m).shape[1], NEEDS, torch.device("cpu")) for n, m in modules.items()
    }
    handles = [
        m.register_forward_hook(lambda _m, inp, _out, n=n: accs[n].add(inp[0])) for n, m in modules.items()
    ]
    outputs = [call_block(block, h, a, k) for h, a, k in zip(hidden, args, kwargs, strict=True)]
    for h in handles:
        h.remove()
    return {n: acc.result() for n, acc in accs.items()}, outputs


def relative_loss(weight, new, hessian) -> float:
    return reconstruction_error(weight, new, hessian) / reconstruction_error(
        weight, torch.zeros_like(weight), hessian
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_run_args(p, out="bench_out/frontier_layers.json", section="frontier-layers")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--methods", default="wanda,sparsegpt,alps")
    p.add_argument("--sparsities", default="0.7,2:4")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    import llmprune

    model, tok = llmprune.load_model(a.model)
    bench.make_data(a.data, tok, a.num_calibration_samples, a.max_seq_length, a.eval_windows)
    calib, test = bench.load_data(a.data)
    _, blocks = find_blocks(model)
    sides = {}
    for name, ids in (("calib", calib), ("test", test)):
        captured = capture_block_inputs(model, blocks[0], ids, 4)
        sides[name] = (list(captured.hidden), captured.args, captured.kwargs)
    rows: list[dict] = []
    for i in range(a.blocks):
        stats = {}
        for name, (hidden, args, kwargs) in sides.items():
            stats[name], outputs = _block_stats(blocks[i], hidden, args, kwargs)
            sides[name] = (outputs, args, kwargs)
        for rel, module in prunable_linears(blocks[i]).items():
            weight = WeightView(module).read()
            for sparsity in a.sparsities.split(","):
                problem = LayerProblem(
                    f"{i}.{rel}", weight, stats["calib"][rel], SparsitySpec.parse(sparsity)
                )
                for method in a.methods.split(","):
                    start = time.perf_counter()
                    result = get_solver(method)(problem)
                    seconds = time.perf_counter() - start
                    new = (
                        result.weight if result.weight is not None else weight.masked_fill(~result.keep, 0.0)
                    )
                    rows.append(
                        {
                            "layer": f"{i}.{rel}",
                            "sparsity": sparsity,
                            "method": method,
                            "seconds": seconds,
                            "calib": relative_loss(weight, new, stats["calib"][rel].hessian),
                            "test": relative_loss(weight, new, stats["test"][rel].hessian),
                        }
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    bench.save_json(a.out, rows)
    body = table(rows, a, calib.shape, test.shape)
    bench.write_section(a.section, body)
    print(body)


def table(rows: list[dict], a, calib_shape, test_shape) -> str:
    methods, sparsities = a.methods.split(","), a.sparsities.split(",")
    layers = sorted({r["layer"] for r in rows})
    lines = [
        f"SmolLM2-135M-Instruct, the {len(layers)} Linears of the first {a.blocks} blocks; Hessians from "
        f"{list(calib_shape)} calibration tokens and from {list(test_shape)} windows of the test part; "
        f"torch threads {a.threads}. Relative layer loss `tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`, mean over the Linears "
        "(lower is better); time = summed solve seconds over SparseGPT's.",
        "",
        "| sparsity | method | calibration loss | test loss | test loss / SparseGPT's | time / SparseGPT's |",
        "|---|---|---|---|---|---|",
    ]
    for sparsity in sparsities:
        mine = [r for r in rows if r["sparsity"] == sparsity]

        def mean(method: str, what: str, mine=mine) -> float:
            values = [r[what] for r in mine if r["method"] == method]
            return sum(values) / len(values)

        base_test = mean("sparsegpt", "test") if "sparsegpt" in methods else float("nan")
        base_time = sum(r["seconds"] for r in mine if r["method"] == "sparsegpt") or float("nan")
        for method in methods:
            seconds = sum(r["seconds"] for r in mine if r["method"] == method)
            lines.append(
                f"| {sparsity} | {method} | {mean(method, 'calib'):.4f} | {mean(method, 'test'):.4f} | "
                f"{mean(method, 'test') / base_test:.3f} | {seconds / base_time:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
