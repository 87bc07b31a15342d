"""``llmprune`` command line: one subcommand per module, each exposing ``register(subparsers)``.

Flags use the vocabulary of the Python API and the recipes (``--num_calibration_samples`` is
``num_calibration_samples=`` is ``calibration: {num_calibration_samples: …}``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from llmprune.errors import LlmpruneError

#: subcommand modules under llmprune.cli, in the order ``--help`` lists them
COMMANDS = ("prune", "recover", "eval", "sweep", "inspect", "export", "push", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmprune", description="Post-training pruning for causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"llmprune.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except LlmpruneError as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
