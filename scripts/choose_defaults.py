"""Choose the frontier defaults on the *validation* part (Emma) only; the test part is never read here.

    nice -n 19 python scripts/choose_defaults.py admm            # ALPS's ρ and iteration budget
    nice -n 19 python scripts/choose_defaults.py owl             # OWL's λ and M
    nice -n 19 python scripts/choose_defaults.py icbs            # iCBS's ridge and steps
    nice -n 19 python scripts/choose_defaults.py pipeline        # ALPS's engine settings, iCBS after ALPS
    python scripts/choose_defaults.py table                      # write docs/benchmarks.md

* ``admm`` is layer-level: the Linears of blocks 8 and 24 of SmolLM2 are pruned from their calibration
  Hessians at 70 % and 2:4 under each setting, and scored by the relative layer loss
  ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` on the Hessian of validation windows. It is a speed/quality trade-off:
  the table records both, and docs/benchmarks.md says which setting was taken and why.
* ``owl`` and ``icbs`` prune the whole model at 70 % with the fixed calibration tokens and score the
  perplexity of the validation windows; ``pipeline`` does the same at 70 % and 2:4 for what is around
  the ALPS solver: true-sequential calibration, OWL on top of it, iCBS's descent started from ALPS's
  mask and weights, and single knobs (the refit's CG iterations, damping, the ADMM schedule).
  Rule: the lowest validation perplexity; OWL's λ first (with the paper's M = 5), then M at that λ,
  with Wanda (``--owl_solvers``; the solver of the paper's main table, and the cheapest run on a shared
  CPU).
  iCBS: the ridge with the lowest validation perplexity, then 40 steps at that ridge; 40 steps double
  the prune time, so they replace the default 20 only if they lower validation perplexity by more than
  2 % (rule fixed before the run). ``pipeline``: the lowest validation perplexity per target; a setting
  found at one target becomes a solver default only if it is no worse at the other.

Results accumulate in ``bench_out/choose_defaults_<part>.json`` (an interrupted grid resumes; parallel
``pipeline --cells`` runs take their own ``--out`` stem, and ``table`` merges every file of a part).
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

ADMM_GRID = {
    "rho 0.1, 300 it (reference)": {"rho": 0.1, "max_iterations": 300, "min_iterations": 30},
    "rho 0.3, 300 it": {"rho": 0.3, "max_iterations": 300, "min_iterations": 30},
    "rho 0.5, 300 it": {"rho": 0.5, "max_iterations": 300, "min_iterations": 30},
    "rho 0.3, 6 it": {"rho": 0.3, "max_iterations": 6, "min_iterations": 6},
    "rho 0.3, 12 it": {"rho": 0.3, "max_iterations": 12, "min_iterations": 6},
    "rho 0.3, 18 it": {"rho": 0.3, "max_iterations": 18, "min_iterations": 6},
    "rho 1.0, 12 it": {"rho": 1.0, "max_iterations": 12, "min_iterations": 6},
    "rho 0.3, 12 it, SparseGPT start": {
        "rho": 0.3,
        "max_iterations": 12,
        "min_iterations": 6,
        "warm_start": "sparsegpt",
    },
    "SparseGPT start, 0 it (refit only)": {
        "max_iterations": 0,
        "min_iterations": 0,
        "warm_start": "sparsegpt",
    },
}
OWL_LAMBDAS = (0.04, 0.08, 0.12, 0.16)
OWL_MS = (3.0, 10.0)  # M is tried at the best λ found with the paper's M = 5
ICBS_RIDGES = (0.03, 0.1, 0.3, 0.01)  # 0.01 added once 0.03 came out best: the best was at the edge
ICBS_STEPS = (40,)  # tried at the best ridge
#: (method, sparsity, options), cheapest questions first; 2:4 first because it is the open comparison
PIPELINE_GRID = (
    ("alps", "2:4", {}),
    ("alps", "2:4", {"true_sequential": True}),
    ("icbs", "2:4", {"init": "alps"}),
    ("alps", "0.7", {}),
    ("alps", "0.7", {"true_sequential": True}),
    ("alps", "0.7", {"allocation": "owl"}),
    ("alps", "0.7", {"allocation": "owl", "true_sequential": True}),
    ("icbs", "2:4", {"init": "alps", "ridge": 0.0}),
    ("alps", "2:4", {"rho": 0.5, "max_iterations": 300, "min_iterations": 30}),
    ("alps", "2:4", {"refit_iterations": 40}),
    ("alps", "2:4", {"dampening_frac": 0.003}),  # iCBS's validation runs preferred less ridge
    ("alps", "0.7", {"refit_iterations": 40}),  # is the 2:4 winner a default for every target?
    ("alps", "0.7", {"true_sequential": True, "refit_iterations": 40}),  # the two 70 % winners together
)


def _layer_hessians(model, calib: torch.Tensor, valid: torch.Tensor, wanted: list[int]) -> dict:
    """{layer: {weight, calib, valid}} for the Linears of the ``wanted`` blocks, on dense inputs."""
    from llmprune.calibration.capture import call_block, capture_block_inputs
    from llmprune.calibration.modules import WeightView, find_blocks, prunable_linears
    from llmprune.calibration.stats import StatsAccumulator
    from llmprune.solvers.types import HESSIAN

    _, blocks = find_blocks(model)
    out: dict[str, dict] = {}
    for side, ids in (("calib", calib), ("valid", valid)):
        captured = capture_block_inputs(model, blocks[0], ids, 4)
        hidden, args, kwargs = list(captured.hidden), captured.args, captured.kwargs
        for i in range(max(wanted) + 1):
            modules = prunable_linears(blocks[i])
            accs = {
                n: StatsAccumulator(WeightView(m).shape[1], {HESSIAN}, torch.device("cpu"))
                for n, m in modules.items()
            }
            hooks = [
                m.register_forward_hook(lambda _m, inp, _o, acc=accs[n]: acc.add(inp[0]))
                for n, m in modules.items()
            ]
            with torch.no_grad():
                hidden = [
                    call_block(blocks[i], h, a, k) for h, a, k in zip(hidden, args, kwargs, strict=True)
                ]
            for h in hooks:
                h.remove()
            if i in wanted:
                for n, m in modules.items():
                    entry = out.setdefault(f"{i}.{n}", {"weight": WeightView(m).read().clone()})
                    entry[side] = accs[n].result().hessian
    return out


def run_admm(a: argparse.Namespace, results: dict) -> None:
    import llmprune
    import llmprune.solvers.alps as alps_module
    from llmprune.solvers.types import LayerProblem, LayerStats, reconstruction_error
    from llmprune.spec import SparsitySpec

    model, _ = llmprune.load_model(a.model)
    calib, valid = bench.load_data(a.data, "valid")
    layers = _layer_hessians(model, calib, valid[: a.eval_windows], [8, 24])
    iterations = [0]
    admm = alps_module.admm

    def counted(*args, **kwargs):
        b, n = admm(*args, **kwargs)
        iterations[0] += n
        return b, n

    alps_module.admm = counted
    for target in ("0.7", "2:4"):
        for label, options in ADMM_GRID.items():
            key = f"admm|{target}|{label}"
            if key in results:
                continue
            loss, seconds, iterations[0] = 0.0, 0.0, 0
            for name, layer in layers.items():
                problem = LayerProblem(
                    name, layer["weight"], LayerStats(hessian=layer["calib"]), SparsitySpec.parse(target)
                )
                start = time.perf_counter()
                new = alps_module.alps(problem, **options).weight
                seconds += time.perf_counter() - start
                w, h = layer["weight"], layer["valid"]
                loss += reconstruction_error(w, new, h) / reconstruction_error(w, torch.zeros_like(w), h)
            results[key] = {
                "valid_loss": loss / len(layers),
                "iterations_per_layer": iterations[0] / len(layers),
                "seconds": seconds,
            }
            print(key, results[key], file=sys.stderr, flush=True)
            bench.save_json(a.out, results)


def _valid_run(
    a: argparse.Namespace, results: dict, method: str, options: dict, sparsity: str = "0.7"
) -> None:
    key = bench.run_key(method, sparsity, options)
    if key in results:
        return
    torch.set_num_threads(a.threads)
    model, result, seconds = bench.prune_fixed(a.model, a.data, method, sparsity, options)
    valid = bench.load_data(a.data, "valid")[1][: a.eval_windows]
    results[key] = {"ppl_valid": bench.window_perplexity(model, valid), "prune_s": seconds}
    print(key, results[key], file=sys.stderr, flush=True)
    bench.save_json(a.out, results)


def run_owl(a: argparse.Namespace, results: dict) -> None:
    for lam in OWL_LAMBDAS:
        for solver in a.owl_solvers.split(","):
            _valid_run(a, results, solver, {"allocation": "owl", "owl_lambda": lam, "owl_m": 5.0})
    for m in OWL_MS:
        for solver in a.owl_solvers.split(","):
            lams = [lam for lam in OWL_LAMBDAS if bench.run_key(solver, "0.7", _owl(lam, 5.0)) in results]
            best = min(
                lams, key=lambda lam, s=solver: results[bench.run_key(s, "0.7", _owl(lam, 5.0))]["ppl_valid"]
            )
            _valid_run(a, results, solver, _owl(best, m))


def _owl(lam: float, m: float) -> dict:
    return {"allocation": "owl", "owl_lambda": lam, "owl_m": m}


def run_icbs(a: argparse.Namespace, results: dict) -> None:
    for ridge in ICBS_RIDGES:
        _valid_run(a, results, "icbs", {"ridge": ridge})
    best = min(ICBS_RIDGES, key=lambda r: results[bench.run_key("icbs", "0.7", {"ridge": r})]["ppl_valid"])
    for steps in ICBS_STEPS:
        _valid_run(a, results, "icbs", {"ridge": best, "steps": steps})


def run_pipeline(a: argparse.Namespace, results: dict) -> None:
    cells = range(len(PIPELINE_GRID)) if a.cells is None else [int(i) for i in a.cells.split(",")]
    for i in cells:
        method, sparsity, options = PIPELINE_GRID[i]
        _valid_run(a, results, method, options, sparsity)


def table(results: dict, a: argparse.Namespace) -> str:
    lines = [
        "Chosen on the **validation** part (Emma) only, by `scripts/choose_defaults.py`; one thread under "
        "`nice -n 19`. Calibration: 32 windows of the built-in calibration text (seed 0), of 512 tokens for "
        "the ADMM grid (`admm`, run with the defaults) and of 256 tokens for the whole-model runs (`owl`, "
        "`icbs`, run with `--data bench_out/data256 --max_seq_length 256`, the frontier sweep's size), "
        f"scored on the first {a.eval_windows} validation windows.",
        "",
        "ALPS's ADMM (layer level: the 14 Linears of blocks 8 and 24, relative layer loss on validation "
        "Hessians, mean over the Linears; solve seconds are wall time under `nice` on a busy machine):",
        "",
        "| setting | 70 % valid loss | 2:4 valid loss | ADMM iterations / layer (70 %, 2:4) "
        "| solve s (70 %, 2:4) |",
        "|---|---|---|---|---|",
    ]
    for label in ADMM_GRID:
        r = [results.get(f"admm|{t}|{label}") for t in ("0.7", "2:4")]
        if None in r:
            continue
        lines.append(
            f"| {label} | {r[0]['valid_loss']:.4f} | {r[1]['valid_loss']:.4f} | "
            f"{r[0]['iterations_per_layer']:.0f}, {r[1]['iterations_per_layer']:.0f} | "
            f"{r[0]['seconds']:.1f}, {r[1]['seconds']:.1f} |"
        )
    lines += [
        "",
        "Whole model, validation perplexity (lower is better; prune seconds are wall time of niced runs "
        "sharing the machine, not comparable). Options are what each run set on top of the defaults of "
        "its day: the ALPS rows without `refit_iterations` ran with 10 refit iterations (the default "
        "until these rows chose 40); the iCBS rows name their ridge.",
        "",
    ]
    lines += ["| method | sparsity | options | valid ppl | prune s |", "|---|---|---|---|---|"]
    whole = [key for key in results if not key.startswith("admm|")]
    for key in sorted(whole, key=lambda k: tuple(k.split("|", 2)[:2])):  # grouped; grid order within
        r = results[key]
        method, sparsity, options = key.split("|", 2)
        lines.append(f"| {method} | {sparsity} | {options} | {r['ppl_valid']:.2f} | {r['prune_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_run_args(p, out="bench_out/choose_defaults.json", section="frontier-defaults")
    p.add_argument("part", choices=("admm", "owl", "icbs", "pipeline", "table"))
    p.add_argument("--cells", help="pipeline: indices into PIPELINE_GRID (default all; parallel runs: --out)")
    p.add_argument("--owl_solvers", default="wanda", help="solvers whose validation perplexity picks λ, M")
    p.set_defaults(eval_windows=16)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.part != "table" and not all((a.data / f"{x}.pt").exists() for x in ("calib", "test", "valid")):
        import llmprune  # the tokenizer, once; the table needs no model at all

        _, tok = llmprune.load_model(a.model)
        bench.make_data(a.data, tok, a.num_calibration_samples, a.max_seq_length, 32)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.part == "table":
        results: dict = {}
        for part in ("admm", "owl", "icbs", "pipeline"):
            for path in sorted(a.out.parent.glob(f"{a.out.stem}*_{part}.json")):  # parallel runs' files too
                results.update(json.loads(path.read_text()))
        body = table(results, a)
        bench.write_section(a.section, body)
        print(body)
        return
    part = {"admm": run_admm, "owl": run_owl, "icbs": run_icbs, "pipeline": run_pipeline}[a.part]
    a.out = a.out.with_name(f"{a.out.stem}_{a.part}.json")  # one file per part: parallel parts never clash
    mine = json.loads(a.out.read_text()) if a.out.exists() else {}
    part(a, mine)


if __name__ == "__main__":
    main()
