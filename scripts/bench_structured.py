"""Structured pruning on SmolLM2-135M: perplexity, speed-up and file size of each structure, one run.

Every row prunes the same dense model with the same calibration windows, is scored on the same
held-out windows, and is timed *alternately* with the dense model and the other rows in one process
(``llmprune.evaluation.speed.compare_speed``), so the speed-ups are ratios measured side by side.
ShortGPT's block-influence removal is the depth baseline; Wanda-SP (channel score, no compensation)
the width baseline; both are llmprune reimplementations, labelled as such.

    nice -n 10 python scripts/bench_structured.py --sparsities 0.3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import save_json, write_section

#: (label, structure, method); heads alone cannot reach every size (one KV group must stay)
ROWS = [
    ("depth · block influence (ShortGPT, reimpl., baseline)", "depth", "block_influence"),
    ("depth · angular distance of a span (Gromov et al., reimpl.)", "depth", "angular"),
    ("width · Wanda-SP score, no compensation (reimpl.)", "width", "wanda_sp"),
    ("width · OBS choice + least-squares refit", "width", "obs"),
    ("heads · OBS choice + least-squares refit", "heads", "obs"),
    ("auto · depth/width/heads split, calibration-loss check", "auto", "obs"),
]


def file_mib(model) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", default="0.3", help="comma-separated fractions of block parameters")
    ap.add_argument("--rows", default="", help="comma-separated structure/method rows (default: all)")
    ap.add_argument("--num_calibration_samples", type=int, default=32)
    ap.add_argument("--max_seq_length", type=int, default=256)
    ap.add_argument("--eval_windows", type=int, default=16)
    ap.add_argument("--eval_length", type=int, default=512)
    ap.add_argument("--prefill_batch", type=int, default=4)
    ap.add_argument("--prefill_length", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="/tmp/bench_structured.json")
    ap.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    ap.add_argument("--from_json", action="store_true", help="only render the markdown from --json")
    ap.add_argument(
        "--speed_only",
        action="store_true",
        help="time the shapes recorded in --json (speed depends on shape only)",
    )
    args = ap.parse_args()
    if args.speed_only:
        time_shapes(args)
    if args.from_json or args.speed_only:
        write_section("structured", render(json.loads(Path(args.json).read_text())))
        return

    import llmprune
    from llmprune.calibration.data import calibration_tokens
    from llmprune.evaluation.perplexity import eval_windows, perplexity
    from llmprune.evaluation.speed import compare_speed, speedups
    from llmprune.structured.pipeline import prune_structured

    torch.set_num_threads(args.threads)
    dense, tok = llmprune.load_model(args.model)
    calib = calibration_tokens(None, tok, args.num_calibration_samples, args.max_seq_length, seed=0)
    held_out = eval_windows(tok, None, args.eval_length, limit=args.eval_windows)

    def ppl(model) -> float:
        return perplexity(model, tok, dataset=held_out, max_seq_length=args.eval_length, progress=False)[
            "ppl"
        ]

    record: dict[str, Any] = {
        "settings": vars(args),
        "dense": {"ppl": ppl(dense), "file_mib": file_mib(dense)},
    }
    record["settings"]["calibration"] = f"{calib.shape[0]}x{calib.shape[1]} built-in calibration text"
    record["settings"]["held_out"] = f"{held_out.shape[0]}x{held_out.shape[1]} built-in Austen windows"
    record["rows"] = []
    models = {"dense": dense}
    wanted = set(filter(None, args.rows.split(",")))
    for fraction in [float(s) for s in args.sparsities.split(",")]:
        for label, structure, method in ROWS:
            if wanted and f"{structure}/{method}" not in wanted:
                continue
            target = fraction if structure != "heads" else min(fraction, 0.15)
            start = time.perf_counter()
            try:
                result = prune_structured(
                    copy.deepcopy(dense), tok, structure=structure, method=method, sparsity=target,
                    dataset=calib, num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                    progress=False,
                )  # fmt: skip
            except llmprune.errors.ConfigError as exc:
                record["rows"].append({"label": label, "target": target, "error": str(exc)})
                continue
            key = f"{structure}/{method}/{target}"
            row = {
                "key": key,
                "label": label,
                "target": target,
                "block_params_removed": result.block_fraction_removed,
                "counts": result.counts,
                "config": result.config,
                "search": result.search,
                "prune_seconds": time.perf_counter() - start,
                "ppl": ppl(result.model),
                "file_mib": file_mib(result.model),
            }
            record["rows"].append(row)
            models[key] = result.model
            print(
                json.dumps({k: row[k] for k in ("key", "block_params_removed", "counts", "ppl")}), flush=True
            )
            save_json(Path(args.json), record)
    speeds = compare_speed(
        models, prefill_batch=args.prefill_batch, prefill_length=args.prefill_length,
        new_tokens=args.new_tokens, repeats=args.repeats,
    )  # fmt: skip
    ups = speedups(speeds, "dense")
    record["dense"]["speed"] = speeds["dense"].to_dict()
    for row in record["rows"]:
        if "key" in row:
            row["speedup"] = ups[row["key"]]
            row["speed"] = speeds[row["key"]].to_dict()
    save_json(Path(args.json), record)
    print(render(record))
    if args.write:
        write_section("structured", render(record))


def time_shapes(args) -> None:
    """Rebuild each recorded row's shape from the dense model and time them all alternately."""
    import llmprune
    from llmprune.evaluation.speed import compare_speed, speedups
    from llmprune.structured.surgery import Removal, rebuild

    torch.set_num_threads(args.threads)
    record = json.loads(Path(args.json).read_text())
    dense, _ = llmprune.load_model(record["settings"]["model"])
    n = dense.config.num_hidden_layers
    models = {"dense": dense}
    for row in record["rows"]:
        if "key" in row:
            c = row["counts"]
            kept = range(c["blocks"], n)
            removal = Removal(
                blocks=list(range(c["blocks"])),
                channels={i: list(range(c["channels"])) for i in kept},
                kv_groups={i: list(range(c["kv_groups"])) for i in kept},
            )
            models[row["key"]] = rebuild(dense, removal)
    speeds = compare_speed(
        models, prefill_batch=args.prefill_batch, prefill_length=args.prefill_length,
        new_tokens=args.new_tokens, repeats=args.repeats,
    )  # fmt: skip
    ups = speedups(speeds, "dense")
    for row in record["rows"]:
        if "key" in row:
            row["speedup"], row["speed"] = ups[row["key"]], speeds[row["key"]].to_dict()
    record["settings"].update(
        {k: getattr(args, k) for k in ("prefill_batch", "prefill_length", "new_tokens")}
    )
    record["settings"]["speed_note"] = "timed on the rebuilt shapes in a separate run"
    save_json(Path(args.json), record)


def command_line(settings: dict[str, Any]) -> str:
    """The flags of the run that produced ``settings`` (those that change the figures)."""
    keys = ("sparsities", "rows", "num_calibration_samples", "eval_windows", "eval_length", "prefill_batch")
    keys += ("prefill_length", "new_tokens", "repeats", "threads")
    return " ".join(f"--{k} {settings[k]}" for k in keys if settings.get(k) not in (None, ""))


def render(record: dict[str, Any]) -> str:
    s, dense = record["settings"], record["dense"]
    lines = [
        f"Model `{s['model']}`; calibration {s['calibration']}; perplexity on {s['held_out']}; "
        f"speed: prefill {s['prefill_batch']}×{s['prefill_length']} (last-position logits) and greedy "
        f"decode of {s['new_tokens']} tokens at batch 1, every model timed alternately in one process, "
        f"medians of {s['repeats']} rounds, {s['threads']} thread(s) on a shared 2-core CPU. "
        f"`python scripts/bench_structured.py {command_line(s)}`."
        + (f" Speed {s['speed_note']}." if s.get("speed_note") else ""),
        "",
        "| target | structure · method | block params removed | shape (layers, MLP, KV heads) | ppl | "
        "prefill × | decode × | file MiB |",
        "|---|---|---|---|---|---|---|---|",
        f"| 0 | dense | 0 % | 30, 1536, 3 | {dense['ppl']:.2f} | 1.00 | 1.00 | {dense['file_mib']:.0f} |",
    ]
    for row in record["rows"]:
        if "error" in row:
            lines.append(f"| {row['target']:.0%} | {row['label']} | refused: {row['error']} | | | | | |")
            continue
        cfg = row["config"]
        shape = ", ".join(
            str(cfg.get(k)) for k in ("num_hidden_layers", "intermediate_size", "num_key_value_heads")
        )
        up = {k: row.get("speedup", {}).get(k, float("nan")) for k in ("prefill", "decode")}
        lines.append(
            f"| {row['target']:.0%} | {row['label']} | {row['block_params_removed']:.1%} | {shape} | "
            f"{row['ppl']:.2f} | {up['prefill']:.2f} | {up['decode']:.2f} | "
            f"{row['file_mib']:.0f} |"
        )
    for row in record["rows"]:
        if row.get("search"):
            cands = "; ".join(
                f"{c['blocks']} blocks + {c['channels']} ch + {c['kv_groups']} KV → loss {c['loss']:.3f}"
                for c in row["search"]
            )
            lines += [
                "",
                f"auto at {row['target']:.0%}, candidates (loss on held-out calibration windows): {cands}.",
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
