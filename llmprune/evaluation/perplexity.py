"""Perplexity with the GPTQ protocol, the one every pruning paper reports.

Join the held-out documents with blank lines, tokenize once, cut into non-overlapping windows of
``max_seq_length`` (the remainder is dropped), and average next-token NLL over the windows scored:
``ppl = exp(mean NLL)``. By default a bounded number of evenly spaced windows is scored
(``DEFAULT_EVAL_TOKENS`` tokens: 16 windows of 2048, 128 of 256), so a default run takes minutes on
CPU; ``limit="all"`` scores every window, as the papers do. Bits per byte are reported beside it
because token perplexity depends on the tokenizer and on text layout (hard wrapping lowers it while the
model gets no better).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmprune.calibration.data import load_texts
from llmprune.errors import ConfigError, DataError
from llmprune.preflight import check_token_ids, window_length

#: tokens scored by default: enough for a stable comparison of dense and pruned, minutes on a CPU
DEFAULT_EVAL_TOKENS = 32768


def window_count(limit: int | str | None, max_seq_length: int) -> int | None:
    """Windows to score: ``None`` = the default token budget, ``"all"`` = every window (returns None)."""
    if limit is None:
        return max(1, DEFAULT_EVAL_TOKENS // max_seq_length)
    if isinstance(limit, str):
        if limit.strip().lower() == "all":
            return None
        raise ConfigError(f"eval_limit {limit!r}: use a number of windows, or 'all'.")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"eval_limit must be a number of windows >= 1 or 'all', got {limit!r}.")
    return limit


def eval_windows(
    tokenizer, dataset: Any = None, max_seq_length: int = 512, limit: int | str | None = "all"
) -> torch.Tensor:
    """``(windows, max_seq_length)`` token ids; ``limit`` keeps that many evenly spaced windows."""
    limit = window_count(limit, max_seq_length)
    if isinstance(dataset, torch.Tensor):
        ids = dataset.reshape(-1)
    else:
        text = "\n\n".join(load_texts(dataset, split="test"))
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    count = ids.numel() // max_seq_length
    if count == 0:
        raise DataError(
            f"held-out text has {ids.numel()} tokens, fewer than one window of {max_seq_length}: "
            "give more text or lower max_seq_length."
        )
    windows = ids[: count * max_seq_length].reshape(count, max_seq_length)
    if limit is not None and limit < count:
        pick = torch.linspace(0, count - 1, max(1, limit)).round().long().unique()
        windows = windows[pick]
    return windows


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    dataset: Any = None,
    max_seq_length: int | None = None,
    limit: int | str | None = None,
    batch_size: int = 2,
    progress: bool = True,
) -> dict[str, float]:
    """Token perplexity and bits per byte of ``model`` on held-out text (default: the built-in one).

    ``max_seq_length`` follows the same rule as calibration (``preflight.window_length``: default the
    smaller of 2048 and the model's positions, longer is refused); ``limit`` is a number of evenly spaced
    windows, ``None`` for the default budget of ``DEFAULT_EVAL_TOKENS`` tokens, or ``"all"``.

    >>> perplexity(model, tok, limit=16)["ppl"]  # doctest: +SKIP
    """
    max_seq_length = window_length(max_seq_length, model.config, "--eval_max_seq_length")
    count = window_count(limit, max_seq_length) or "all"
    windows = eval_windows(tokenizer, dataset, max_seq_length, count)
    check_token_ids(windows, getattr(model.config, "vocab_size", None))  # before: a raw IndexError
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_bytes = 0.0, 0
    for start in tqdm(
        range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False
    ):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, L, V): the largest tensor of a run
        for row in range(batch.shape[0]):  # one row at a time keeps log-softmax memory at (L, V)
            row_logits = logits[row, :-1].float()
            total_nll += float(F.cross_entropy(row_logits, batch[row, 1:], reduction="sum"))
        del logits
        if tokenizer is not None:
            total_bytes += sum(len(tokenizer.decode(row[1:]).encode("utf-8")) for row in batch.cpu().tolist())
    model.train(was_training)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total_nll / tokens
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else float("nan"),
        "windows": int(windows.shape[0]),
        "tokens": int(tokens),
        "max_seq_length": max_seq_length,
    }
