"""``llmprune inspect PATH``: sparsity and N:M validity of any safetensors checkpoint, no model needed."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="per-matrix sparsity and N:M validity of a checkpoint folder")
    p.add_argument("path", help="checkpoint folder (or one .safetensors file)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmprune.io.inspect import format_inspection, inspect_checkpoint

    report = inspect_checkpoint(args.path)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))
    return 0
