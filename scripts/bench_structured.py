"""Structured pruning on SmolLM2-135M: perplexity, speed-up, file size and 10-minute recovery, one run.

Phases (``--phase all`` runs them in order; each can be run alone and they share one results folder):

1. ``prune`` (niced children, one per sparsity, ``--jobs`` at a time): every row prunes the same dense
   model with the same calibration windows (``bench_common``'s ``calib.pt``) and is scored on the test
   part of the held-out text (``test.pt``); the exact removal is recorded, the rows to be recovered are
   saved.
2. ``lr``: the learning rate of ``--recover full`` chosen on the *validation* part (``valid.pt``), the
   same ``--lr_steps`` for every rate (60: what ten minutes buy on one core), no lock.
3. ``speed`` (takes the timed lock, ``--lock``): every row's shape rebuilt from its recorded removal and
   timed *alternately* with the dense model in one process (``evaluation.speed.compare_speed``).
4. ``recover``: each listed row recovers for ``--recover_seconds`` under the timed lock (one lock per row),
   then is scored on the test part (niced); the gap closed is reported against the dense model.

ShortGPT's block influence and Gromov et al.'s angular span are the depth baselines, Wanda-SP and FLAP
the width baselines: all llmprune reimplementations, labelled as such.

    python scripts/bench_structured.py --phase all --write
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from bench_common import load_data, make_data, save_json, window_perplexity, write_section

#: (label, structure, method); heads alone cannot reach every size (one KV group must stay)
ROWS = [  # in the order they are pruned: the done-when rows first
    ("depth · block influence (ShortGPT, reimpl., baseline)", "depth", "block_influence"),
    ("auto · depth/width/heads split, calibration-loss check (ours)", "auto", "obs"),
    ("width · OBS choice + least-squares refit (ours)", "width", "obs"),
    ("width · Wanda-SP score, no compensation (reimpl.)", "width", "wanda_sp"),
    ("width · FLAP fluctuation + bias compensation (reimpl.)", "width", "flap"),
    ("depth · angular distance of a span (Gromov et al., reimpl.)", "depth", "angular"),
    ("heads · OBS choice + least-squares refit (ours)", "heads", "obs"),
]
UNSTRUCTURED = ("unstructured · SparseGPT 50 % (llmprune, for contrast)", "unstructured", "sparsegpt")
LOCK = "/work/wt/timed.lock"


def file_mib(model) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20


@contextmanager
def timed_lock(path: str | None):
    """The shared lock of wall-clock measurements (blocks until it is free); no-op without a path."""
    if not path:
        yield
        return
    with open(path, "a") as fh:
        t0 = time.perf_counter()
        fcntl.flock(fh, fcntl.LOCK_EX)
        print(f"lock taken after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_saved(path: Path):
    """A row's saved model (weights and config only: the tokenizer is the dense model's)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def rows_dir(out: Path) -> Path:
    (out / "rows").mkdir(parents=True, exist_ok=True)
    return out / "rows"


def row_key(structure: str, method: str, target: float) -> str:
    return f"{structure}-{method}-{target:g}"


def prune_one(args, fraction: float) -> None:
    """Child: prune every row at ``fraction`` (niced by the parent), score on the test part, record."""
    import llmprune
    from llmprune.errors import ConfigError
    from llmprune.structured.pipeline import prune_structured

    torch.set_num_threads(args.threads)
    calib, test = load_data(args.data, "test")
    dense, tok = llmprune.load_model(args.model)
    wanted = set(filter(None, args.rows.split(",")))
    rows = list(ROWS) + ([UNSTRUCTURED] if fraction == args.unstructured_at else [])
    for label, structure, method in rows:
        if wanted and f"{structure}/{method}" not in wanted:
            continue
        target = {"heads": 0.15, "unstructured": 0.5}.get(structure, fraction)
        if structure == "heads" and fraction != min(args.fractions):
            continue  # heads alone reach 16.7 % at most on SmolLM2: one row
        key = row_key(structure, method, target)
        path = rows_dir(args.out) / f"{key}.json"
        if path.exists():
            continue
        start = time.perf_counter()
        row: dict[str, Any] = {"key": key, "label": label, "structure": structure, "target": target}
        model = copy.deepcopy(dense)
        try:
            if structure == "unstructured":
                llmprune.prune(
                    model, tok, method=method, sparsity=target, dataset=calib,
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1], progress=False,
                )  # fmt: skip
                small = model
                row.update(block_params_removed=0.0, removal={}, config=dict(_dense_shape(dense)))
                row["counts"] = {"blocks": 0, "channels": 0, "kv_groups": 0}
            else:
                result = prune_structured(
                    model, tok, structure=structure, method=method, sparsity=target, dataset=calib,
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1], progress=False,
                )  # fmt: skip
                small = result.model
                row.update(
                    block_params_removed=result.block_fraction_removed, counts=result.counts,
                    config=result.config, search=result.search, removal=result.removal.to_dict(),
                    speed_plan=result.speed,
                )  # fmt: skip
        except ConfigError as exc:
            row["error"] = str(exc)
            save_json(path, row)
            continue
        row["prune_seconds"] = time.perf_counter() - start
        row["ppl"] = window_perplexity(small, test)
        row["file_mib"] = file_mib(small)
        if fraction == args.save_at or key in args.recover_rows.split(","):
            small.save_pretrained(args.out / "models" / key)
        save_json(path, row)
        print(json.dumps({k: row.get(k) for k in ("key", "counts", "ppl", "prune_seconds")}), flush=True)
        del model, small


def _dense_shape(model) -> dict[str, int]:
    c = model.config
    return {
        "num_hidden_layers": c.num_hidden_layers,
        "intermediate_size": c.intermediate_size,
        "num_key_value_heads": c.num_key_value_heads,
    }


def dense_row(args) -> None:
    import llmprune

    path = args.out / "dense.json"
    if path.exists():
        return
    torch.set_num_threads(args.threads)
    dense, _ = llmprune.load_model(args.model)
    _, test = load_data(args.data, "test")
    _, valid = load_data(args.data, "valid")
    save_json(
        path,
        {
            "ppl": window_perplexity(dense, test),
            "ppl_valid": window_perplexity(dense, valid),
            "file_mib": file_mib(dense),
            "config": _dense_shape(dense),
        },
    )


def recover_text(args) -> str:
    """The text recovery trains on: ``--recover_text``, else the product's default."""
    from llmprune.recovery.windows import DEFAULT_TEXT

    return args.recover_text or DEFAULT_TEXT


def recovery_windows(tok, args) -> torch.Tensor:
    """Training windows for recovery, with another seed than the pruning windows: ``--recover_text``, by
    default the text ``llmprune prune --structure … --recover`` reads when given none (the built-in
    ``recovery`` corpus); ``calibration`` is what the rows of sessions before 11 trained on."""
    from llmprune.calibration.data import calibration_tokens

    return calibration_tokens(recover_text(args), tok, args.recover_windows, args.max_seq_length, seed=1)


def choose_lr(args) -> None:
    """``--recover full`` of one saved row for ``--lr_steps`` steps per setting (no lock: the same steps for
    every rate; ``--lr_steps 0``: ``--lr_seconds`` each under one timed lock, which compares budgets as
    much as rates when the load changes), scored on the *validation* part."""
    import llmprune
    from llmprune.recovery import recover

    path = args.out / "lr.json"
    record = json.loads(path.read_text()) if path.exists() else {"runs": []}
    torch.set_num_threads(args.speed_threads)
    dense, tok = llmprune.load_model(args.model)
    _, valid = load_data(args.data, "valid")
    ids = recovery_windows(tok, args)
    source = args.out / "models" / args.lr_row
    # a fixed number of steps compares learning rates fairly (the steps a time budget buys varied 6-fold
    # with the machine's load in one sweep); it is not a wall-clock measurement, so no lock
    budget = {"steps": args.lr_steps} if args.lr_steps else {"steps": 10**6, "max_seconds": args.lr_seconds}
    with timed_lock(None if args.lr_steps else args.lock):
        for spec in args.lrs.split(","):
            optimizer, lr = spec.split(":") if ":" in spec else ("adamw", spec)
            if any(r["optimizer"] == optimizer and r["lr"] == float(lr) for r in record["runs"]):
                continue
            model = load_saved(source)
            record["ppl_valid_before"] = record.get("ppl_valid_before") or window_perplexity(model, valid)
            res = recover(
                model, method="full", input_ids=ids, dense_model=dense, **budget, lr=float(lr),
                batch_size=args.recover_batch, optimizer=optimizer,
            )  # fmt: skip
            run = {
                "optimizer": optimizer,
                "lr": float(lr),
                "steps": res.steps_done,
                "seconds": res.seconds,
                "ppl_valid": window_perplexity(model, valid),
                "peak_memory_mib": res.peak_memory_mib,
            }
            record["runs"].append(run)
            record.update(row=args.lr_row, windows=list(ids.shape), text=recover_text(args))
            record.update({"steps": args.lr_steps} if args.lr_steps else {"seconds": args.lr_seconds})
            save_json(path, record)
            print(json.dumps(run), flush=True)


def chosen_lr(out: Path) -> tuple[str, float] | None:
    """(optimizer, lr) with the lowest validation perplexity in ``lr.json``, if the sweep ran."""
    path = out / "lr.json"
    if not path.exists():
        return None
    best = min(json.loads(path.read_text())["runs"], key=lambda r: r["ppl_valid"])
    return best["optimizer"], best["lr"]


def shape_key(cfg: dict[str, Any]) -> str:
    """Speed depends on the shape only: ``layers:MLP width:KV heads``."""
    return ":".join(str(cfg[k]) for k in ("num_hidden_layers", "intermediate_size", "num_key_value_heads"))


def speed(args) -> None:
    """Every distinct shape (the recorded rows' and ``--shapes``) timed alternately with the dense model in
    one process under the lock. A shape is rebuilt with its first blocks/channels/groups removed: which
    ones does not change the time."""
    import llmprune
    from llmprune.evaluation.speed import compare_speed, speedups
    from llmprune.structured.surgery import Removal, rebuild

    torch.set_num_threads(args.speed_threads)
    dense, _ = llmprune.load_model(args.model)
    base = _dense_shape(dense)
    shapes = {shape_key(json.loads(p.read_text())["config"]) for p in rows_dir(args.out).glob("*.json")
              if "error" not in json.loads(p.read_text())}  # fmt: skip
    shapes |= set(filter(None, args.shapes.split(",")))
    shapes.discard(shape_key(base))
    models = {"dense": dense}
    for shape in sorted(shapes):
        layers, width, kv = map(int, shape.split(":"))
        kept = range(base["num_hidden_layers"] - layers, base["num_hidden_layers"])
        removal = Removal(
            blocks=list(range(base["num_hidden_layers"] - layers)),
            channels={i: list(range(base["intermediate_size"] - width)) for i in kept},
            kv_groups={i: list(range(base["num_key_value_heads"] - kv)) for i in kept},
        )
        models[shape] = rebuild(dense, removal)
    with timed_lock(args.lock):
        speeds = compare_speed(
            models, prefill_batch=args.prefill_batch, prefill_length=args.prefill_length,
            new_tokens=args.new_tokens, repeats=args.repeats,
        )  # fmt: skip
    ups = speedups(speeds, "dense")
    save_json(
        args.out / "speed.json",
        {
            "speedup": ups,
            "speed": {k: v.to_dict() for k, v in speeds.items()},
            "settings": {
                k: getattr(args, k) for k in ("prefill_batch", "prefill_length", "new_tokens", "repeats")
            }
            | {"threads": args.speed_threads},
        },
    )


def recover_one(args, key: str) -> None:
    """Child: ``--recover_seconds`` of recovery of one saved row under the lock, then niced test scoring."""
    import llmprune
    from llmprune.recovery import recover

    path = args.out / "recovered" / f"{key}.json"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.speed_threads)
    dense, tok = llmprune.load_model(args.model)
    model = load_saved(args.out / "models" / key)
    ids = recovery_windows(tok, args)
    method = "perp" if key.startswith("unstructured") else "full"
    choice = chosen_lr(args.out) if method == "full" else None
    extra = {"optimizer": choice[0], "lr": choice[1]} if choice else {}
    with timed_lock(args.lock):
        res = recover(
            model, method=method, input_ids=ids, dense_model=dense, steps=10**6,
            max_seconds=args.recover_seconds, batch_size=args.recover_batch, **extra,
        )  # fmt: skip
    rec = {
        "key": key,
        "method": method + (f" ({res.options['optimizer']})" if method == "full" else ""),
        "lr": res.options["lr"],
        "steps": res.steps_done,
        "seconds": res.seconds,
        "trainable_params": res.trainable_params,
        "peak_memory_mib": res.peak_memory_mib,
    }
    if args.defer_eval:  # the caller holds the lock: score later, niced (--phase recover_eval)
        model.save_pretrained(args.out / "recovered_models" / key)
    else:
        os.nice(19)
        torch.set_num_threads(args.threads)
        rec["ppl"] = window_perplexity(model, load_data(args.data, "test")[1])
    save_json(path, rec)
    print(json.dumps(rec), flush=True)


def recover_eval(args) -> None:
    """Score the recovered models saved by ``--defer_eval`` runs on the test part."""
    torch.set_num_threads(args.threads)
    _, test = load_data(args.data, "test")
    for path in sorted((args.out / "recovered").glob("*.json")):
        rec = json.loads(path.read_text())
        if "ppl" not in rec:
            rec["ppl"] = window_perplexity(load_saved(args.out / "recovered_models" / rec["key"]), test)
            save_json(path, rec)


def child(args, *extra: str, nice: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, __file__, *extra, *_forward(args)]
    return subprocess.Popen((["nice", "-n", "19"] if nice else []) + cmd)


def _forward(args) -> list[str]:
    keys = ("model", "data", "out", "rows", "threads", "speed_threads", "recover_rows", "recover_seconds")
    keys += ("recover_batch", "recover_windows", "max_seq_length", "lock", "unstructured_at", "lrs")
    keys += ("save_at", "recover_text")
    keys += ("lr_seconds", "lr_steps", "lr_row", "shapes")
    out = []
    for k in keys:
        v = getattr(args, k)
        if v is not None and (v != "" or k == "lock"):  # an empty lock means "held by the caller"
            out.append(f"--{k}={v}")
    return out + ["--sparsities", ",".join(map(str, args.fractions))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--phase", default="all", choices=["all", "prune", "lr", "speed", "recover", "recover_eval", "render"]
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=Path("bench_out/structured/data"))
    ap.add_argument("--out", type=Path, default=Path("bench_out/structured"))
    ap.add_argument("--sparsities", default="0.2,0.3,0.4", help="fractions of block parameters")
    ap.add_argument("--rows", default="", help="comma-separated structure/method rows (default: all)")
    ap.add_argument("--num_calibration_samples", type=int, default=16)
    ap.add_argument("--max_seq_length", type=int, default=256)
    ap.add_argument("--eval_windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=3, help="sparsities pruned in parallel (niced children)")
    ap.add_argument("--unstructured_at", type=float, default=0.3, help="the sparsity whose child adds it")
    ap.add_argument("--lock", default=LOCK, help="lock file of timed runs ('' = none)")
    ap.add_argument("--speed_threads", type=int, default=1)
    ap.add_argument("--shapes", default="30:1536:1,24:1272:3", help="more layers:width:kv shapes to time")
    ap.add_argument("--prefill_batch", type=int, default=4)
    ap.add_argument("--prefill_length", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recover_rows", default="auto-obs-0.3,width-obs-0.3,depth-block_influence-0.3")
    ap.add_argument("--save_at", type=float, default=0.3, help="save this sparsity's models (recovery)")
    ap.add_argument("--recover_seconds", type=float, default=600)
    ap.add_argument("--recover_batch", type=int, default=4)
    ap.add_argument("--recover_windows", type=int, default=64, help="as the product (sessions < 11: 128)")
    ap.add_argument("--recover_text", help="recovery's training text (default: the product's, `recovery`)")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--lr_seconds", type=float, default=180, help="recovery budget of each lr tried")
    ap.add_argument(
        "--lr_steps", type=int, default=60, help="lr sweep: steps per setting (no lock); 0: --lr_seconds each"
    )
    ap.add_argument("--lr_row", default="depth-block_influence-0.3")
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)  # child: prune one sparsity
    ap.add_argument("--dense_one", action="store_true", help=argparse.SUPPRESS)  # child: the dense row
    ap.add_argument("--lr_one", action="store_true", help=argparse.SUPPRESS)  # child: choose the lr
    ap.add_argument("--recover_one", help=argparse.SUPPRESS)  # child: recover one row
    ap.add_argument("--defer_eval", action="store_true", help="recovery: save, score later (recover_eval)")
    ap.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = ap.parse_args()
    args.fractions = [float(s) for s in args.sparsities.split(",")]
    if args.one is not None:
        return prune_one(args, args.one)
    if args.dense_one:
        return dense_row(args)
    if args.lr_one:
        return choose_lr(args)
    if args.recover_one:
        return recover_one(args, args.recover_one)
    if args.phase in ("all", "prune"):
        import llmprune

        _, tok = llmprune.load_model(args.model)
        make_data(args.data, tok, args.num_calibration_samples, args.max_seq_length, args.eval_windows)
        running = [child(args, "--dense_one")]
        for fraction in args.fractions:
            while sum(p.poll() is None for p in running) > args.jobs:
                time.sleep(5)
            running.append(child(args, "--one", str(fraction)))
        for p in running:
            p.wait()
    if args.phase in ("all", "lr"):
        child(args, "--lr_one", nice=False).wait()
    if args.phase in ("all", "speed"):
        speed(args)
    if args.phase in ("all", "recover"):
        for key in filter(None, args.recover_rows.split(",")):
            child(
                args, "--recover_one", key, *(["--defer_eval"] if args.defer_eval else []), nice=False
            ).wait()
    if args.phase == "recover_eval":
        recover_eval(args)
    text = render(load_results(args.out))
    print(text)
    if args.write:
        write_section("structured", text)


def load_results(out: Path) -> dict[str, Any]:
    def read(path: Path):
        return json.loads(path.read_text()) if path.exists() else None

    return {
        "dense": read(out / "dense.json"),
        "rows": [json.loads(p.read_text()) for p in sorted(rows_dir(out).glob("*.json"))],
        "speed": read(out / "speed.json"),
        "lr": read(out / "lr.json"),
        "recovered": {p.stem: json.loads(p.read_text()) for p in sorted((out / "recovered").glob("*.json"))},
    }


def _shape(cfg: dict[str, Any]) -> str:
    return ", ".join(
        str(cfg.get(k)) for k in ("num_hidden_layers", "intermediate_size", "num_key_value_heads")
    )


def _speed_plan(row: dict[str, Any], measured: dict[str, float]) -> list[str]:
    """What auto's time model predicted for its choice, beside what the speed phase measured."""
    plan = row.get("speed_plan") or {}
    if not plan.get("time_model"):
        return []
    dec, threads = plan["time_model"]["decode"], plan["time_model"]["measured"]["settings"]["threads"]
    pred = plan["predicted"]
    text = (
        f"Its time model (measured at the start of the run, {threads} thread(s), beside the other "
        f"jobs): decode {1e3 * dec['other']:.1f} ms per token outside the blocks, "
        f"{1e3 * dec['fixed']:.2f} ms per block + {1e9 * dec['per_param']:.3f} ms per million block "
        f"weights; target {plan['min_decode_speedup']:g}×, chosen split predicted "
        f"{pred['decode']:.2f}× decode / {pred['prefill']:.2f}× prefill"
    )
    if measured:
        text += f", measured {measured['decode']:.2f}× / {measured['prefill']:.2f}× (speed phase)"
    if plan.get("fallback"):
        text += f". Fallback: {plan['fallback']}"
    return ["", text + "."]


def render(res: dict[str, Any]) -> str:
    """The markdown of docs/benchmarks.md's structured section, from the results folder."""
    dense, speed, lr, recovered = res["dense"], res["speed"] or {}, res["lr"], res["recovered"]
    st = speed.get("settings", {})
    ups = speed.get("speedup", {})
    head = (
        "Model `smollm2-135m`; calibration `calib.pt` (16×256 windows of the built-in calibration text, "
        "seed 0); perplexity on `test.pt` (16×256 windows of the test part, *Pride and Prejudice*)"
        + ("; the learning rate of `--recover full` chosen on `valid.pt` (*Emma*). " if lr else ". ")
    )
    if speed:
        head += (
            f"Speed: prefill {st['prefill_batch']}×{st['prefill_length']} (last-position logits) and greedy "
            f"decode of {st['new_tokens']} tokens at batch 1, every shape timed alternately with the dense "
            f"model in one process under the timed lock, medians of {st['repeats']} rounds, "
            f"{st['threads']} thread(s) on the shared 2-core CPU. "
            "`python scripts/bench_structured.py --phase all --write`."
        )
    else:
        head += (
            "Speed: not measured in this run (`--phase speed` did not get the timed lock), `–` below. "
            "`python scripts/bench_structured.py --phase prune`, then `--phase render --write`."
        )
    lines = [
        head,
        "",
        "| target | structure · method | block params removed | shape (layers, MLP, KV heads) | ppl | "
        "prefill × | decode × | file MiB |",
        "|---|---|---|---|---|---|---|---|",
        f"| 0 | dense | 0 % | {_shape(dense['config'])} | {dense['ppl']:.2f} | 1.00 | 1.00 | "
        f"{dense['file_mib']:.0f} |",
    ]
    rows = sorted(res["rows"], key=lambda r: (r["target"], [x[1:] for x in ROWS + [UNSTRUCTURED]].index(
        (r["structure"], r["key"].split("-")[1])) if "key" in r else 0))  # fmt: skip
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['target']:.0%} | {row['label']} | refused: {row['error']} | | | | | |")
            continue
        same_as_dense = row["structure"] == "unstructured"
        up = ups.get(shape_key(row["config"]), {"prefill": 1.0, "decode": 1.0} if same_as_dense else {})
        cells = [f"{up[k]:.2f}" if k in up else "–" for k in ("prefill", "decode")]
        removed = "50 % of Linear weights zeroed" if row["structure"] == "unstructured" else (
            f"{row['block_params_removed']:.1%}")  # fmt: skip
        lines.append(
            f"| {row['target']:.0%} | {row['label']} | {removed} | {_shape(row['config'])} | "
            f"{row['ppl']:.2f} | {cells[0]} | {cells[1]} | {row['file_mib']:.0f} |"
        )
    if ups:
        timed = "; ".join(
            f"{k} → {v['prefill']:.2f} / {v['decode']:.2f}" for k, v in sorted(ups.items()) if k != "dense"
        )
        lines += ["", f"Every timed shape (layers:MLP:KV heads → prefill / decode speed-up): {timed}."]
    best = {}
    for row in rows:
        if "error" in row or row["structure"] in ("unstructured", "heads"):
            continue
        if row["target"] not in best or row["ppl"] < best[row["target"]]["ppl"]:
            best[row["target"]] = row
    wins = [f"{t:.0%}: {r['label'].split(' (')[0]} ({r['ppl']:.2f})" for t, r in sorted(best.items())]
    lines += ["", "Lowest perplexity at each size: " + "; ".join(wins) + "."]
    for row in rows:
        if row.get("search"):
            cands = "; ".join(
                f"{c['blocks']} blocks + {c['channels']} ch + {c['kv_groups']} KV → {c['loss']:.3f}"
                + (f" ({c['decode_speedup']:.2f}×)" if "decode_speedup" in c else "")
                for c in sorted(row["search"], key=lambda c: c["loss"])
            )
            lines += [
                "",
                f"auto at {row['target']:.0%}, candidates by loss on held-out calibration windows"
                + (" (predicted decode speed-up)" if "decode_speedup" in row["search"][0] else "")
                + f": {cands}.",
            ]
            lines += _speed_plan(row, ups.get(shape_key(row["config"]), {}))
    if lr:
        lines += [
            "",
            f"Learning rate of `--recover full`, chosen on the validation part: {lr['row']} recovered for "
            + (
                f"{lr['steps']} steps per setting ({lr['windows'][1]}-token windows, batch 4)"
                if lr.get("steps")
                else f"{lr['seconds']:.0f} s per setting ({lr['windows'][1]}-token windows, batch 4, under "
                "the timed lock)"
            )
            + f", perplexity on `valid.pt` (before recovery {lr['ppl_valid_before']:.2f}): "
            + "; ".join(
                f"{r['optimizer']} {r['lr']:g} → {r['ppl_valid']:.2f} ({r['steps']} steps)"
                for r in lr["runs"]
            )
            + ".",
        ]
    if recovered:
        lines += [
            "",
            "| row | method | steps in the budget | lr | ppl pruned | ppl recovered | dense | gap closed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        by_key = {r["key"]: r for r in rows if "key" in r}
        for key, rec in recovered.items():
            if "ppl" not in rec:
                continue
            before = by_key[key]["ppl"]
            closed = (before - rec["ppl"]) / (before - dense["ppl"])
            lines.append(
                f"| {by_key[key]['label']} ({by_key[key]['target']:.0%}) | {rec['method']} | "
                f"{rec['steps']} in {rec['seconds']:.0f} s | {rec['lr']:g} | {before:.2f} | "
                f"{rec['ppl']:.2f} | {dense['ppl']:.2f} | {closed:.0%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
