"""Perplexity with the GPTQ protocol, the one every pruning paper reports.

Join the held-out documents with blank lines, tokenize once, cut into non-overlapping windows of
``max_seq_length`` (the remainder is dropped), and average next-token NLL over all windows:
``ppl = exp(mean NLL)``. Bits per byte are reported beside it because token perplexity depends on
the tokenizer and on text layout (hard wrapping lowers it while the model gets no better).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmprune.calibration.data import load_texts
from llmprune.errors import DataError


def eval_windows(
    tokenizer, dataset: Any = None, max_seq_length: int = 512, limit: int | None = None
) -> torch.Tensor:
    """``(windows, max_seq_length)`` token ids; ``limit`` keeps that many evenly spaced windows."""
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
    max_seq_length: int = 512,
    limit: int | None = None,
    batch_size: int = 2,
    progress: bool = True,
) -> dict[str, float]:
    """Token perplexity and bits per byte of ``model`` on held-out text (default: the built-in one).

    >>> perplexity(model, tok, limit=16)["ppl"]  # doctest: +SKIP
    """
    windows = eval_windows(tokenizer, dataset, max_seq_length, limit)
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
