"""Distillation targets computed once: the dense model's top-k next-token probabilities per position.

Why: distilling from a live teacher keeps a second copy of the model in memory for the whole run and
pays a teacher forward (and a tokens × vocab logits buffer) at every step. The dense distribution of a
small model is concentrated: its top 64 of 49k tokens hold almost all the mass. So the teacher's
targets are computed once, before pruning or before training, and kept as ``k`` probabilities with
their token ids plus the rest of the mass as one bucket (``1 − Σ top-k``): for 64 windows of 256 tokens
and k = 64, 8 MB instead of a 540 MB model. The loss (``losses.py``) is then the KL divergence between
the teacher's (k + 1)-bucket distribution and the student's distribution folded the same way, which is
exact when k equals the vocabulary.

The same pass can also keep the dense model's **block outputs** (the residual stream after chosen
decoder blocks, in bfloat16) for an intermediate-distillation term (``hidden.py``): matching them
gives every trained block a target of its own instead of one signal through 30 blocks (Kurtic et
al. 2023, "SquareHead"). 64 windows of 256 tokens, 576 features and 10 blocks: 190 MB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmprune.errors import ConfigError
from llmprune.recovery.hidden import BlockOutputs


@dataclass
class TopKTargets:
    """Per window and position: the teacher's ``k`` most likely next tokens and their probabilities."""

    input_ids: Tensor  # (N, L) the windows the targets belong to
    indices: Tensor  # (N, L, k) int64 token ids
    probs: Tensor  # (N, L, k) float32 teacher probabilities
    rest: Tensor  # (N, L) float32 the mass of every other token, summed directly (not 1 − Σ probs)
    seconds: float = 0.0  # what the teacher pass took (recovery pays it from its time budget)
    hidden: Tensor | None = None  # (N, T, L, H) bfloat16: the outputs of decoder blocks ``hidden_blocks``
    hidden_blocks: tuple[int, ...] = ()

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def rows(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(indices, probs, rest) of the windows ``rows`` (a 1-D index tensor into the N windows)."""
        return self.indices[rows], self.probs[rows], self.rest[rows]

    def hidden_rows(self, rows: Tensor) -> Tensor | None:
        """(B, T, L, H) dense block outputs of the windows ``rows``, or None if none were kept."""
        return None if self.hidden is None else self.hidden[rows]

    def nbytes(self) -> int:
        kept = (self.indices, self.probs, self.rest) + (() if self.hidden is None else (self.hidden,))
        return sum(t.numel() * t.element_size() for t in kept)


@torch.no_grad()
def topk_targets(
    teacher: nn.Module,
    input_ids: Tensor,
    k: int,
    batch_size: int = 4,
    hidden_blocks: tuple[int, ...] = (),
    *,
    max_seconds: float | None = None,
    min_windows: int = 0,
) -> TopKTargets:
    """Run ``teacher`` once over ``input_ids`` (N, L) and keep the top-``k`` next-token probabilities,
    and the outputs of the decoder blocks numbered ``hidden_blocks`` (none by default).

    With ``max_seconds`` the pass stops after the batch that reaches it, once it holds at least
    ``min_windows`` windows: the targets (and their ``input_ids``) are then the first windows only, as
    many as that time bought (a time-budgeted recovery draws more windows than it can use).
    """
    if k < 1:
        raise ConfigError(f"teacher_top_k must be >= 1 (or None for a live teacher), got {k}.")
    start = time.perf_counter()
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    indices, probs, rest, hidden = [], [], [], []
    done = 0  # windows with targets so far
    taps = BlockOutputs(teacher, hidden_blocks)
    try:
        for batch in input_ids.split(batch_size):
            with taps.recording():
                logits = teacher(input_ids=batch.to(device), use_cache=False).logits  # (B, L, V)
            if hidden_blocks:
                hidden.append(taps.stacked().to("cpu", torch.bfloat16))  # (B, T, L, H)
            log_p = F.log_softmax(logits.float(), dim=-1)
            del logits
            top = torch.topk(log_p, min(k, log_p.shape[-1]), dim=-1)
            indices.append(top.indices.cpu())
            probs.append(top.values.exp().cpu())
            others = log_p.scatter_(-1, top.indices, float("-inf"))  # in place: log_p is not used again
            rest.append(torch.logsumexp(others, dim=-1).exp().cpu())  # (B, L); exactly 0 when k = V
            del log_p, others
            done += len(batch)
            if max_seconds is not None and done >= min_windows and time.perf_counter() - start >= max_seconds:
                break
    finally:
        teacher.train(was_training)
    targets = TopKTargets(input_ids[:done], torch.cat(indices), torch.cat(probs), torch.cat(rest))
    if hidden_blocks:
        targets.hidden, targets.hidden_blocks = torch.cat(hidden), tuple(hidden_blocks)
    targets.seconds = time.perf_counter() - start
    return targets
