"""Perplexity recovered within a wall-clock budget on pruned SmolLM2: end-to-end PERP, block-wise
reconstruction after pruning, and block-wise reconstruction fused into the pruning pass.

    python scripts/bench_recovery.py prune --pairs wanda:0.5,sparsegpt:2:4          # nice, no lock
    flock /work/wt/timed.lock python scripts/bench_recovery.py run --pairs wanda:0.5 \
        --kinds e2e --budget 600 --threads 2                                        # the timed part
    python scripts/bench_recovery.py evaluate                                       # nice, no lock
    python scripts/bench_recovery.py report

Data: ``bench_out/data`` (``bench_common.make_data``): calibration windows ``calib.pt`` (32 × 512 of the
built-in calibration text) are what pruning *and* recovery train on; perplexity is measured on the
**test** part (``test.pt``, Pride and Prejudice) for the tables and on the **validation** part
(``valid.pt``, Emma) for choosing defaults (``--part valid``).

Kinds:

* ``e2e``: ``recover(method=--recover_method)`` end to end with today's defaults: the dense model's
  top-k targets computed first (on the dense weights, before the pruned ones are loaded: no copy; the
  pass is *inside* the budget), bfloat16 autocast, block checkpointing; on the calibration windows cut to
  256 tokens, batch 4. The trained state is saved at 2 and 5 minutes and at the end (clock paused) and
  scored afterwards by ``evaluate`` at nice 19, so the timed lock is held for training only. With
  ``--warm_steps N`` the dense model is first pruned again with N block-wise steps per block fused into
  the pass (a warm start whose recovery time the budget pays; tried and not adopted, eighth round);
* ``perp``: the previous end-to-end default (live dense copy as teacher, float32, no checkpointing),
  perplexity at 2, 5 and 10 minutes evaluated in the run (the loop's clock is paused meanwhile);
* ``blockwise``: ``recover(mode="reconstruct")`` on the cached pruned model with a dense copy, one run per
  budget (the budget is spread over the blocks, so it is not an anytime method);
* ``fused``: ``prune(..., recover="perp")`` from the dense model; the budget bounds the recovery time
  inside the pass, and the prune time is reported beside it.

Every job runs in a fresh process (its peak RSS is its own, whole process, model load included) and
writes one JSON under ``bench_out/recovery/``; ``report`` writes the ``recovery-blockwise`` section of
docs/benchmarks.md. Masks are checked: every pruned weight still exactly +0.0, no kept weight lost.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    load_data,
    prune_fixed,
    prune_on_windows,
    save_json,
    window_perplexity,
    write_section,
)

WORK = Path("bench_out/recovery")
CHECKPOINTS = (120.0, 300.0, 600.0)


def _tag(method: str, sparsity: str) -> str:
    return f"{method}_{sparsity.replace(':', 'of')}"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _perplexities(model, data: Path) -> dict[str, float]:
    return {part: window_perplexity(model, load_data(data, part)[1]) for part in ("test", "valid")}


def prune_job(a: argparse.Namespace, method: str, sparsity: str) -> None:
    """Prune once and cache the pruned Linear weights, the keep-masks and the perplexities before recovery."""
    path = WORK / f"{_tag(method, sparsity)}.pt"
    if path.exists():
        return
    torch.set_num_threads(a.threads)
    model, result, prune_s = prune_fixed(a.model, a.data, method, sparsity, {})
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in result.keep_masks}
    ppl = _perplexities(model, a.data)
    blob = {"weights": weights, "keep": result.keep_masks, "ppl": ppl["test"], "ppl_valid": ppl["valid"]}
    blob["prune_s"] = prune_s
    torch.save(blob, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def dense_job(a: argparse.Namespace) -> None:
    path = WORK / "dense.json"
    if path.exists():
        return
    import llmprune

    torch.set_num_threads(a.threads)
    model, _ = llmprune.load_model(a.model)
    save_json(path, _perplexities(model, a.data))


def _mask_kept(model, keep: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor] | None) -> bool:
    """Every pruned weight is +0.0 and, when the pruned weights are known, no kept nonzero became 0."""
    for name, k in keep.items():
        w = model.get_submodule(name).weight.detach()
        if not (bool((w[~k] == 0).all()) and not bool(torch.signbit(w[~k]).any())):
            return False
        if pruned is not None and not bool(((w != 0) | (pruned[name] == 0)).all()):
            return False
    return True


class _PausableClock:
    """Stands in for the ``time`` module of ``llmprune.recovery.train``: evaluation inside a callback
    pauses it, so checkpoints cost the training budget nothing."""

    def __init__(self) -> None:
        self.paused = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() - self.paused


def _settings(a: argparse.Namespace) -> dict:
    out = {"lr": a.lr} if a.lr else {}
    if a.steps:
        out["steps"] = a.steps
    out.update(json.loads(a.options or "{}"))
    return out


def _snapshot(model, path: Path) -> None:
    """The trained tensors (PERP: adapters, norms, biases; LIFT: the trained weights), by name."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _training_windows(a: argparse.Namespace, calib: torch.Tensor, tok, model) -> torch.Tensor:
    """The pruning's calibration windows cut to 256 tokens (``--windows 0``), or ``--windows`` fresh
    windows of ``--window_length`` tokens drawn with ``--windows_seed`` from ``--text``: a local file or
    folder, a built-in corpus name (``calibration``: the rows of the rounds before the sixth), or by default
    what ``llmprune prune --recover`` trains on when given no text (the built-in ``recovery`` corpus)."""
    if not a.windows:
        return torch.cat([calib[:, :256], calib[:, 256:]])  # 64 x 256: each 512-window cut in two
    from llmprune.recovery.windows import MAX_WINDOWS, recovery_windows

    count = MAX_WINDOWS if a.windows < 0 else a.windows  # -1: the product's pool, cut by the teacher's time
    return recovery_windows(a.text, tok, model, count, a.window_length, a.windows_seed)


@torch.no_grad()
def _sampled_windows(model, tok, count: int, length: int, seed: int, batch: int = 16) -> torch.Tensor:
    """``count`` windows of ``length`` tokens written by the dense model from its start token (nucleus
    0.95, temperature 1; EOS held back until the window is full), seeded: the self-generated recovery
    data tried on the validation part (docs/benchmarks.md, "Recovery": no better than the calibration
    text, and 245 s of a 10-minute budget to write 64 windows)."""
    first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows, new = [], length - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, count, batch):
            prompt = torch.full((min(batch, count - start), 1), first, dtype=torch.long)
            rows.append(
                model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                    top_p=0.95, top_k=0, min_new_tokens=new, max_new_tokens=new, pad_token_id=first,
                )
            )  # fmt: skip
    return torch.cat(rows)


def _fused_warm_start(a, model, tok, calib, method: str, sparsity: str, clock, out: Path, row: dict):
    """``--warm_steps N``: prune the dense ``model`` again with the cached pruning's settings, now with
    ``N`` steps of block-wise PERP per block fused into the pass, as a warm start for the end-to-end
    run. Its recovery seconds are paid from the budget, the pruning's own are not (the clock is paused
    for them). The masks differ from the plain pruning's (later blocks see recovered inputs), so the
    pruned weights are saved for ``evaluate``; the gap stays measured from the plain pruning.
    -> (keep-masks, the fused recovery's seconds)."""
    options = {"recover": a.recover_method, "recover_options": {"steps": a.warm_steps}}
    result, wall = prune_on_windows(model, tok, calib, method, sparsity, options)
    fused_s = result.recovery["seconds"]
    clock.paused += wall - fused_s
    row.update(warm_seconds=fused_s, warm_steps_done=result.recovery["steps_done"])
    path = out.with_name(out.stem + "_pruned.pt")
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in result.keep_masks}
    torch.save({"weights": weights, "keep": result.keep_masks}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    row["pruned_blob"] = str(path)
    return result.keep_masks, fused_s


def e2e_job(a: argparse.Namespace, method: str, sparsity: str, out: Path, row: dict) -> None:
    """Timed part of an ``e2e`` run: teacher targets (in the budget), training, snapshots; no scoring."""
    import llmprune
    from llmprune.recovery import recover
    from llmprune.recovery import train as train_module
    from llmprune.recovery.api import dense_targets
    from llmprune.recovery.windows import NUM_WINDOWS, TEACHER_SHARE

    calib, _ = load_data(a.data)
    settings = _settings(a)
    top_k = settings.pop("teacher_top_k", 64)
    model, tok = llmprune.load_model(a.model)
    ids = _training_windows(a, calib, tok, model)
    clock = _PausableClock()
    train_module.time = clock  # the loop reads its clock through this name
    t0 = clock.perf_counter()
    if a.generated:  # sampled from the dense weights, inside the budget
        sampled = _sampled_windows(model, tok, a.generated, 256, a.windows_seed)
        row["generate_seconds"] = clock.perf_counter() - t0
        ids = torch.cat([ids, sampled])
    # on the dense weights (no copy), the way `llmprune prune --recover` makes them: top-k and, with
    # hidden_distill, the block outputs; --windows -1: for as long as the product's rule gives the pass
    share = TEACHER_SHARE * a.budget if a.windows < 0 else None
    targets = dense_targets(
        model, ids, {**settings, "teacher_top_k": top_k, "batch_size": a.batch_size},
        max_seconds=share, min_windows=NUM_WINDOWS,
    )  # fmt: skip
    ids = targets.input_ids
    row["windows"] = list(ids.shape)
    teacher_s = clock.perf_counter() - t0
    targets.seconds = teacher_s  # the budget pays all since t0: the sampled windows too, if any
    if a.warm_steps:  # prune again, block-wise recovery fused into the pass (paid from the budget)
        keep, warm_s = _fused_warm_start(a, model, tok, calib, method, sparsity, clock, out, row)
        targets.seconds += warm_s
    else:
        blob = torch.load(WORK / f"{_tag(method, sparsity)}.pt")
        with torch.no_grad():
            for name, w in blob["weights"].items():
                model.get_submodule(name).weight.copy_(w)
        keep = blob["keep"]
        del blob
    marks = [c for c in CHECKPOINTS if c < a.budget]
    snaps: list[dict] = []

    def callback(step: int, m) -> None:
        elapsed = clock.perf_counter() - t0
        if marks and elapsed >= marks[0]:
            marks.pop(0)
            paused = time.perf_counter()
            path = out.with_name(out.stem + f"_snap{len(snaps)}.pt")
            _snapshot(m, path)
            snaps.append({"at_s": elapsed, "step": step + 1, "path": str(path)})
            clock.paused += time.perf_counter() - paused

    info = recover(
        model,
        input_ids=ids,
        method=a.recover_method,
        keep_masks=keep,
        teacher_targets=targets,
        max_seconds=a.budget,
        batch_size=a.batch_size,
        callback=callback,
        **{"steps": 10_000, **settings},  # --steps caps the run below the budget's own count
    )  # fmt: skip  (recover() pays the teacher pass, targets.seconds, from max_seconds)
    row.update(seconds=info.seconds + targets.seconds, train_seconds=info.seconds, teacher_seconds=teacher_s)
    row.update(steps=info.steps_done, trainable=info.trainable_params, lr=info.options["lr"])
    row["losses"] = info.losses  # the first says how far the pruned model starts from the dense one
    row.update(precision=info.options["precision"], top_k=top_k, snapshots=snaps)
    row.update(gradient_checkpointing=info.options["gradient_checkpointing"])
    row["peak_rss_mib"] = _peak_rss_mib()
    row["s_per_step"] = info.seconds / max(1, info.steps_done)
    row["mask_unchanged"] = _mask_kept(model, keep, None)
    final = out.with_name(out.stem + "_final.pt")
    torch.save({n: t for n, t in model.state_dict().items()}, final.with_suffix(".tmp"))
    final.with_suffix(".tmp").replace(final)
    row["final_state"] = str(final)
    print(json.dumps(row), file=sys.stderr, flush=True)
    save_json(out, row)


def evaluate(a: argparse.Namespace) -> None:
    """Score the snapshots and final states of ``e2e`` runs (untimed: run it at nice 19)."""
    import llmprune
    from llmprune.recovery import masking
    from llmprune.recovery.perp import PerpOptions, PerpSession

    torch.set_num_threads(a.threads)
    wanted = (
        {_tag(m, sp) for m, sp in (pair.split(":", 1) for pair in a.pairs.split(","))} if a.pairs else None
    )
    for path in sorted(WORK.glob("*_e2e_*.json")):
        row = json.loads(path.read_text())
        if "ppl_test" in row or (wanted and _tag(row["method"], row["sparsity"]) not in wanted):
            continue
        blob = torch.load(WORK / f"{_tag(row['method'], row['sparsity'])}.pt")
        base = torch.load(row["pruned_blob"]) if "pruned_blob" in row else blob  # --warm_steps: its own
        model, _ = llmprune.load_model(a.model)
        model.load_state_dict(torch.load(row["final_state"]))
        row["mask_unchanged"] = row["mask_unchanged"] and _mask_kept(model, base["keep"], base["weights"])
        row.update({f"ppl_{k}": v for k, v in _perplexities(model, a.data).items()})
        row["ppl_before_test"], row["ppl_before_valid"] = blob["ppl"], blob["ppl_valid"]
        checkpoints = []
        for snap in row.get("snapshots", []):
            model, _ = llmprune.load_model(a.model)
            with torch.no_grad():
                for name, w in base["weights"].items():
                    model.get_submodule(name).weight.copy_(w)
            state = torch.load(snap["path"])
            session = None
            if any(".lora_" in n for n in state):
                opts = {k: v for k, v in row["settings"].items() if k in ("r", "alpha", "lora", "lm_head")}
                targets = masking.resolve_targets(model, base["keep"])
                session = PerpSession(model, targets, PerpOptions(**opts))
                session.attach()
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, t in state.items():
                    params[name].copy_(t)
            if session is not None:
                session.finish()
            test = window_perplexity(model, load_data(a.data, "test")[1])  # the tables' part only
            checkpoints.append({"at_s": snap["at_s"], "step": snap["step"], "test": test})
        row["checkpoints"] = checkpoints
        save_json(path, row)
        if a.keep_states is False:
            for f in [row["final_state"], *(snap["path"] for snap in row.get("snapshots", []))]:
                Path(f).unlink(missing_ok=True)
        print(json.dumps({k: row[k] for k in ("method", "sparsity", "ppl_test", "ppl_valid")}), flush=True)


def run_job(a: argparse.Namespace, kind: str, method: str, sparsity: str) -> None:
    import llmprune
    from llmprune.recovery import recover
    from llmprune.recovery import train as train_module

    name = f"e2e_{a.recover_method}" if kind == "e2e" else kind
    out = WORK / f"{_tag(method, sparsity)}_{name}_{a.budget:.0f}s_{a.threads}t{a.suffix}.json"
    if out.exists():
        return
    torch.set_num_threads(a.threads)
    calib, _ = load_data(a.data)
    row: dict = {"method": method, "sparsity": sparsity, "kind": kind, "budget_s": a.budget}
    row.update(threads=a.threads, settings=_settings(a), batch=a.batch_size, suffix=a.suffix, text=a.text)
    row["window_length"] = a.window_length
    if kind == "e2e":
        row["kind"] = f"e2e {a.recover_method}"
        e2e_job(a, method, sparsity, out, row)
        return
    if kind == "fused":
        model, tok = llmprune.load_model(a.model)
        options = {"max_seconds": a.budget, "steps": a.steps or 10_000, **_settings(a)}
        fused = {"batch_size": a.batch_size, "recover": a.recover_method, "recover_options": options}
        result, wall = prune_on_windows(model, tok, calib, method, sparsity, fused)
        rec = result.recovery
        row.update(wall_s=wall, seconds=rec["seconds"], steps=rec["steps_done"])
        row.update(trainable=rec["trainable_params"], lr=rec["options"]["lr"])
        before = None
        keep, pruned = result.keep_masks, None
    else:
        blob = torch.load(WORK / f"{_tag(method, sparsity)}.pt")
        model, tok = llmprune.load_model(a.model)
        dense = llmprune.load_model(a.model)[0]
        with torch.no_grad():
            for name, w in blob["weights"].items():
                model.get_submodule(name).weight.copy_(w)
        keep, pruned = blob["keep"], blob["weights"]
        before = {"test": blob["ppl"], "valid": blob["ppl_valid"]}
        checkpoints: list[dict] = []
        clock = _PausableClock()
        if kind == "perp":
            ids = torch.cat([calib[:, :256], calib[:, 256:]])  # 64 x 256: each 512-window cut in two
            marks = [c for c in CHECKPOINTS if c < a.budget]

            def callback(step: int, m) -> None:
                elapsed = clock.perf_counter() - t0
                if marks and elapsed >= marks[0]:
                    marks.pop(0)
                    paused = time.perf_counter()
                    checkpoints.append({"at_s": elapsed, "step": step + 1, **_perplexities(m, a.data)})
                    clock.paused += time.perf_counter() - paused

            train_module.time = clock  # the loop reads its clock through this name
            t0 = clock.perf_counter()
            info = recover(
                model, input_ids=ids, method="perp", keep_masks=keep, dense_model=dense,
                max_seconds=a.budget, batch_size=a.batch_size, callback=callback,
                **{"steps": 10_000, **_settings(a)},
            )  # fmt: skip
        else:
            info = recover(
                model, input_ids=calib, method=a.recover_method, mode="reconstruct", keep_masks=keep,
                dense_model=dense, steps=a.steps or 10_000, max_seconds=a.budget, batch_size=a.batch_size,
                **{k: v for k, v in _settings(a).items() if k != "steps"},
            )  # fmt: skip
        row.update(seconds=info.seconds, steps=info.steps_done, trainable=info.trainable_params)
        row.update(lr=info.options["lr"], checkpoints=checkpoints)
        del dense
    row["peak_rss_mib"] = _peak_rss_mib()
    row["s_per_step"] = row["seconds"] / max(1, row["steps"])
    row["mask_unchanged"] = _mask_kept(model, keep, pruned)
    after = _perplexities(model, a.data)
    for part in ("test", "valid"):
        row[f"ppl_{part}"] = after[part]
        if before is not None:  # fused: filled in by the report, from the cached plain pruning
            row[f"ppl_before_{part}"] = before[part]
    print(json.dumps(row), file=sys.stderr, flush=True)
    save_json(out, row)


def _with_gaps(row: dict, dense: dict[str, float]) -> dict:
    """Gap closed on both parts (and at each checkpoint), against the plain pruning of the cache."""
    for part in ("test", "valid"):
        if f"ppl_before_{part}" not in row:
            cached = WORK / f"{_tag(row['method'], row['sparsity'])}.pt"
            if not cached.exists():
                continue
            blob = torch.load(cached)
            row["ppl_before_test"], row["ppl_before_valid"] = blob["ppl"], blob["ppl_valid"]
        before = row[f"ppl_before_{part}"]
        row[f"gap_{part}"] = (before - row[f"ppl_{part}"]) / (before - dense[part])
        for c in row.get("checkpoints", []):
            if part in c:  # e2e snapshots are scored on the test part only
                c[f"gap_{part}"] = (before - c[part]) / (before - dense[part])
    return row


def _gap(r: dict, part: str) -> str:
    g = r.get(f"gap_{part}")
    return "–" if g is None else f"{100 * g:.0f} %"


def _teacher(r: dict) -> str:
    """e2e rows: what the teacher pass took of the budget."""
    return f" (teacher pass {r['teacher_seconds']:.0f} s)" if "teacher_seconds" in r else ""


def report(a: argparse.Namespace) -> None:
    dense = json.loads((WORK / "dense.json").read_text())
    rows = [json.loads(p.read_text()) for p in sorted(WORK.glob("*_*s_*t*.json"))]
    rows = [_with_gaps(r, dense) for r in rows if "ppl_test" in r]  # e2e rows: after `evaluate`
    order = {m: i for i, m in enumerate(["magnitude", "wanda", "sparsegpt", "icbs"])}
    rows.sort(key=lambda r: (r["sparsity"], order.get(r["method"], 9), r["kind"], r["budget_s"]))
    save_json(a.out, rows)
    head = [
        "| pruned | recovery | budget | ppl before | ppl after | gap closed (test) | gap closed (valid) "
        "| steps | s/step | peak RSS | zeros kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table, sweep, checkpoints = list(head), list(head), []
    for r in rows:
        line = (
            f"| {r['method']} {r['sparsity']} | {r['kind']} {r.get('suffix', '')}{_teacher(r)} "
            f"| {r['budget_s']:.0f} s "
            f"| {r.get('ppl_before_test', float('nan')):.2f} | {r['ppl_test']:.2f} | {_gap(r, 'test')} "
            f"| {_gap(r, 'valid')} | {r['steps']} | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} MiB "
            f"| {'yes' if r['mask_unchanged'] else 'NO'} |"
        )
        (sweep if r.get("suffix") else table).append(line)
        for c in r.get("checkpoints", []):
            checkpoints.append(
                f"| {r['method']} {r['sparsity']} | {r['kind']} | {c['at_s']:.0f} s | {c['test']:.2f} "
                f"| {100 * c.get('gap_test', float('nan')):.0f} % |"
            )
    lines = [
        f"`scripts/bench_recovery.py` (SmolLM2-135M; dense perplexity {dense['test']:.2f} on the test part, "
        f"{dense['valid']:.2f} on the validation part). Gap closed = (before − after) / (before − dense). "
        "Calibration and recovery data: 32 × 512 windows of the built-in calibration text. Budgets are "
        "recovery time only (fused: the recovery inside the pass). Peak RSS is the whole process's.",
    ]
    if len(table) > 2:
        lines += ["", *table]
    if checkpoints:
        lines += ["", "End-to-end PERP, perplexity at checkpoints of one run:", ""]
        lines += ["| pruned | recovery | at | test ppl | gap closed |", "|---|---|---|---|---|", *checkpoints]
    if len(sweep) > 2:
        lines += ["", "Choosing defaults (validation part decides; test shown for completeness):", "", *sweep]
    write_section("recovery-blockwise", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["prune", "run", "evaluate", "report", "job"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--pairs", help="method:sparsity,… (sparsity may be N:M; default wanda:0.5; evaluate: all)"
    )
    p.add_argument("--kinds", default="e2e", help="e2e, perp, blockwise, fused (comma-separated)")
    p.add_argument("--recover_method", default="perp", help="perp or lift (e2e, blockwise and fused)")
    p.add_argument("--budget", type=float, default=600)
    p.add_argument("--steps", type=int, help="steps (per block for blockwise/fused)")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--options", help="JSON of extra recovery options (r, rank, …)")
    p.add_argument("--suffix", default="", help="tag of a sweep run (kept out of the main table)")
    p.add_argument("--data", type=Path, default=Path("bench_out/data"))
    p.add_argument("--out", type=Path, default=Path("bench_out/recovery.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--windows",
        type=int,
        default=0,
        help="e2e: fresh training windows (0: the pruning's; -1: as many as the product's time rule buys)",
    )
    p.add_argument("--window_length", type=int, default=256, help="e2e with --windows: tokens per window")
    p.add_argument("--windows_seed", type=int, default=1, help="seed of the fresh windows (pruning: 0)")
    p.add_argument(
        "--text", help="e2e with --windows: training text (file, folder, built-in name; default: llmprune's)"
    )
    p.add_argument(
        "--warm_steps", type=int, default=0,
        help="e2e: prune again with this many block-wise steps per block fused in, then train end to end",
    )  # fmt: skip
    p.add_argument(
        "--generated", type=int, default=0, help="e2e: add this many windows sampled from the dense model"
    )
    p.add_argument(
        "--keep_states",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate: keep the e2e runs' saved states after scoring them",
    )
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    pairs = [pair.split(":", 1) for pair in (a.pairs or "wanda:0.5").split(",")]
    if a.command == "job":
        kind, method, sparsity = a.job.split("|")
        if kind == "prune":
            prune_job(a, method, sparsity)
        elif kind == "dense":
            dense_job(a)
        else:
            run_job(a, kind, method, sparsity)
        return
    if a.command == "report":
        report(a)
        return
    if a.command == "evaluate":
        evaluate(a)
        return
    forward = sys.argv[2:]
    jobs = [("dense", "-", "-")]
    if a.command == "prune":
        jobs += [("prune", m, s) for m, s in pairs]
    else:
        jobs += [(k, m, s) for k in a.kinds.split(",") for m, s in pairs]
    for job in jobs:
        subprocess.call([sys.executable, __file__, "job", *forward, "--job", "|".join(job)])


if __name__ == "__main__":
    main()
