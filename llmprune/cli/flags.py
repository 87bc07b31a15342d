"""Flag groups shared by subcommands, so one name means one thing everywhere (and in recipes)."""

from __future__ import annotations

import argparse

from llmprune.io.models import DEFAULT_MODEL


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"Hub id, local folder, .gguf file, or {DEFAULT_MODEL!r} (default)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)"
    )


def add_pruning_flags(p: argparse.ArgumentParser, with_sparsity: bool = True) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument(
        "--method", help="registered solver: magnitude, wanda, sparsegpt, icbs, alps (default wanda)"
    )
    if with_sparsity:
        g.add_argument("--sparsity", help="fraction such as 0.5, or N:M such as 2:4 (keep 2 of every 4)")
    g.add_argument(
        "--targets", nargs="*", help="module names, suffixes or re:patterns to prune (default: all)"
    )
    g.add_argument("--ignore", nargs="*", help="module names, suffixes or re:patterns to leave dense")
    g.add_argument(
        "--true_sequential", action="store_true", default=None, help="calibrate q,k,v → o → mlp in turn"
    )
    g.add_argument(
        "--allocation",
        choices=["uniform", "owl", "error", "depth"],
        help="per-layer sparsity around the mean: uniform (default), owl, error, depth",
    )
    g.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="solver or allocation option, repeatable"
    )


def add_calibration_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--dataset", help="calibration text: file, folder, Hub dataset, c4, wikitext2, self")
    g.add_argument(
        "--num_calibration_samples", type=int, help="windows of text (default 128 on a GPU, 32 on CPU)"
    )
    g.add_argument(
        "--max_seq_length", type=int, help="tokens per window (default 2048, at most the model's positions)"
    )
    g.add_argument("--seed", type=int, help="sampling seed (default 0)")
    g.add_argument("--batch_size", type=int, help="windows per forward (default 8)")


def eval_limit(text: str) -> int | str:
    """``--eval_limit``: a number of evenly spaced perplexity windows, or ``all`` (the recipe checks it)."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


EVAL_LIMIT_HELP = "perplexity on this many evenly spaced windows, or 'all' (default: 32768 tokens' worth)"


def add_scale_flags(p: argparse.ArgumentParser) -> None:
    """Models larger than memory and long runs: none of these changes the pruned weights."""
    g = p.add_argument_group("large models")
    g.add_argument(
        "--streaming",
        action="store_true",
        default=None,
        help="read, prune and write one block at a time from the safetensors shards (needs --output_dir)",
    )
    g.add_argument(
        "--max_memory", help="calibration activations kept in memory (8GB, 512MiB); the rest on disk"
    )
    g.add_argument("--offload_dir", help="where activations above --max_memory go (default: a temp folder)")
    g.add_argument("--checkpoint_dir", help="record progress after every block here (for --resume)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in --checkpoint_dir (default: beside --output_dir)",
    )
