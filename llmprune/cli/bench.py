"""``llmprune bench``: prefill and decode speed of a model beside its base, timed alternately here.

>>> llmprune bench --model out/auto-30                 # base read from out/auto-30/run_info.json
>>> llmprune bench --model out/auto-30 --baseline smollm2-135m --write   # also into run_info.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prefill and decode speed of a model and its base, side by side")
    g = p.add_argument_group("models")
    g.add_argument("--model", required=True, help="the model to time (a pruned output folder, Hub id…)")
    g.add_argument("--baseline", help="compare with this model (default: the source in run_info.json)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    g = p.add_argument_group("timing")
    g.add_argument("--prefill_batch", type=int, default=8, help="prefill batch (default 8)")
    g.add_argument("--prefill_length", type=int, default=512, help="prefill tokens per row (default 512)")
    g.add_argument(
        "--new_tokens", type=int, default=128, help="greedy tokens decoded at batch 1 (default 128)"
    )
    g.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians reported (default 3)")
    g.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    g = p.add_argument_group("output")
    g.add_argument("--write", action="store_true", help="add the figures to MODEL/run_info.json")
    g.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def baseline_of(model_dir: Path) -> str | None:
    """The base model recorded beside a pruned checkpoint, if any."""
    info = model_dir / "run_info.json"
    if not info.is_file():
        return None
    data = json.loads(info.read_text(encoding="utf-8"))
    return data.get("source_model") or data.get("base_model")


def run(args: argparse.Namespace) -> int:
    import torch

    import llmprune
    from llmprune.errors import ConfigError
    from llmprune.evaluation.speed import compare_speed, speedups

    for flag in ("prefill_batch", "prefill_length", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.write and not Path(args.model).is_dir():
        raise ConfigError("--write adds to MODEL/run_info.json: --model must be a local folder.")
    baseline = args.baseline or (baseline_of(Path(args.model)) if Path(args.model).is_dir() else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"model": llmprune.load_model(args.model, dtype=args.dtype or "float32", device=args.device)[0]}
    if baseline:
        models = {
            "baseline": llmprune.load_model(baseline, dtype=args.dtype or "float32", device=args.device)[0],
            **models,
        }
    else:
        log.info("no --baseline and none recorded beside the model: timing the model alone")
    speeds = compare_speed(
        models,
        prefill_batch=args.prefill_batch,
        prefill_length=args.prefill_length,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    report: dict[str, Any] = {
        "model": args.model,
        "baseline": baseline,
        "settings": {
            "prefill": f"{args.prefill_batch}x{args.prefill_length}",
            "decode": f"batch 1, greedy, {args.new_tokens} new tokens",
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
        },
        "speed": {name: s.to_dict() for name, s in speeds.items()},
    }
    if baseline:
        report["speedup"] = speedups(speeds, "baseline")["model"]
    if args.write and (Path(args.model) / "structure.json").is_file():  # also structure.json and the card
        from llmprune.structured.save import record_speed

        record_speed(args.model, report)
    elif args.write:
        from llmprune.io.atomic import write_text

        path = Path(args.model) / "run_info.json"
        info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        info["speed"] = report
        write_text(path, json.dumps(info, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else format_speed(report))
    return 0


def format_speed(report: dict[str, Any]) -> str:
    rows = [("", "prefill tok/s", "decode tok/s", "peak MiB")]
    for name, s in report["speed"].items():
        rows.append(
            (
                name,
                f"{s['prefill_tokens_per_s']:.0f}",
                f"{s['decode_tokens_per_s']:.1f}",
                f"{s['peak_mib']:.0f}",
            )
        )
    if "speedup" in report:
        up = report["speedup"]
        rows.append(("speed-up", f"{up['prefill']:.2f}x", f"{up['decode']:.2f}x", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}" for a, b, c, d in rows]
    lines.append(
        f"prefill {report['settings']['prefill']}, decode {report['settings']['decode']}, "
        f"medians of {report['settings']['repeats']} alternating rounds"
    )
    return "\n".join(lines)
