"""``llmprune push OUTPUT_DIR --hub_model_id ID``: upload a saved checkpoint folder to the Hub."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a saved checkpoint folder to the Hugging Face Hub")
    p.add_argument("output_dir", help="folder written by `llmprune prune --output_dir`")
    p.add_argument("--hub_model_id", required=True, help="target repository, e.g. your-name/model-wanda-2of4")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached `hf auth login`)")
    p.add_argument("--commit_message", default="Upload pruned model (llmprune)", help="commit message")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds without an answer before a retry (default 60)"
    )
    p.add_argument("--retries", type=int, default=2, help="retries after a network failure (default 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmprune.io.hub import push_to_hub

    url = push_to_hub(
        args.output_dir,
        args.hub_model_id,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        timeout=args.timeout,
        retries=args.retries,
    )
    print(f"pushed {args.output_dir} to {url}")
    return 0
