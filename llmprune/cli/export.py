"""``llmprune export SRC --format {dense,compressed,gguf} --output_dir OUT``: rewrite a model's weights."""

from __future__ import annotations

import argparse

from llmprune.io.gguf_export import GGUF_TYPES
from llmprune.io.weights import FORMATS


def add_format_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, default: str) -> None:
    """``--format``/``--save_format`` and ``--gguf_type``, shared with ``llmprune prune`` (where the
    defaults come from the recipe, so the flags default to None there)."""
    recipe_default = name == "save_format"
    p.add_argument(
        f"--{name}",
        choices=FORMATS,
        default=None if recipe_default else default,
        help="dense: plain safetensors; compressed: llmprune's sparse layout (docs/format.md), "
        f"0.63x the bytes at 50%% sparsity; gguf: one llama.cpp file (default {default})",
    )
    p.add_argument(
        "--gguf_type",
        choices=GGUF_TYPES,
        default=None if recipe_default else "f16",
        help="GGUF matrix type (default f16)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model as a dense, compressed or GGUF checkpoint")
    p.add_argument(
        "source", help="checkpoint folder (dense or compressed), .gguf file, Hub id, or smollm2-135m"
    )
    add_format_flags(p, "format", "compressed")
    p.add_argument("--output_dir", required=True, help="folder to write (atomically)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace output_dir if it exists and is not empty"
    )
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the source's)"
    )
    p.add_argument("--trust_remote_code", action="store_true", help="allow the source's own model code")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmprune.io.export import export

    out = export(
        args.source,
        args.output_dir,
        format=args.format,
        gguf_type=args.gguf_type,
        overwrite=args.overwrite,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"exported {args.source} as {args.format} to {out}")
    return 0
