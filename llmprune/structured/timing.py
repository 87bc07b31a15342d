"""Measuring auto's time model (``speedmodel``) on this machine, in a few seconds, before it chooses.

Three models are timed alternately, as ``llmprune bench`` times a result against its base: the dense
model, a copy with the first half of its blocks removed, and that copy with half of every kept block's
MLP channels removed (the range of widths auto's candidates use, so the per-weight cost is measured
where it is applied). Which blocks and channels go does not matter for time, so the copies are built by
``surgery.rebuild`` without any statistics. Decode is timed as the benchmark times it (greedy, batch 1,
a short prompt, seconds per generated token) and prefill as one batch-1 forward. Each model's time is
the *minimum* over the rounds: on a shared machine interference only ever adds time, so the fastest
round is the best estimate of the model's own cost (the median still carries other jobs' load).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llmprune.evaluation.speed import decode_seconds, prefill_seconds
from llmprune.structured.plan import Costs
from llmprune.structured.speedmodel import TimeModel, fit_step_time
from llmprune.structured.surgery import Removal, rebuild

log = logging.getLogger(__name__)


def shape_variants(model: nn.Module, c: Costs) -> tuple[int, int, dict[str, nn.Module]]:
    """``(dropped blocks, removed channels, {"half": …, "narrow": …})`` rebuilt from ``model``.

    The two copies hold about 0.8× the model's block weights beside it (plus two embeddings): auto only
    runs its candidate search, and so this measurement, on models whose statistics fit its 2 GiB budget.
    """
    dropped = c.num_blocks // 2
    channels = c.width // 2
    kept = range(dropped, c.num_blocks)
    half = Removal(blocks=list(range(dropped)))
    narrow = Removal(blocks=list(range(dropped)), channels={i: list(range(channels)) for i in kept})
    return dropped, channels, {"half": rebuild(model, half).eval(), "narrow": rebuild(model, narrow).eval()}


def measure_time_model(
    model: nn.Module,
    c: Costs,
    *,
    new_tokens: int = 16,
    prompt_length: int = 16,
    prefill_length: int = 128,
    repeats: int = 5,
    seed: int = 0,
) -> TimeModel | None:
    """Time the dense model and two shrunk copies; ``None`` for a one-block model (nothing to compare).

    >>> tm = measure_time_model(model, model_costs(model, layout_of(model)))        # doctest: +SKIP
    >>> tm.predict(Counts(blocks=6, channels=264), c)["decode"]                      # doctest: +SKIP
    """
    if c.num_blocks < 2 or c.width < 2:
        return None
    dropped, channels, variants = shape_variants(model, c)
    models = {"dense": model, **variants}
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    ids = torch.randint(vocab, (1, prefill_length), generator=gen).to(device)
    prompt = torch.randint(vocab, (1, prompt_length), generator=gen).to(device)
    was_training = model.training
    model.eval()
    pre: dict[str, list[float]] = {n: [] for n in models}
    dec: dict[str, list[float]] = {n: [] for n in models}
    try:
        for m in models.values():  # warm-up: first calls allocate and pick kernels
            prefill_seconds(m, ids[:, :8])
            decode_seconds(m, prompt, 2)
        for _ in range(repeats):
            for name, m in models.items():
                pre[name].append(prefill_seconds(m, ids))
                dec[name].append(decode_seconds(m, prompt, new_tokens) / new_tokens)
    finally:
        model.train(was_training)
    fastest = {
        "prefill": {n: min(v) for n, v in pre.items()},
        "decode": {n: min(v) for n, v in dec.items()},
    }
    steps = {
        k: fit_step_time(v["dense"], v["half"], v["narrow"], c, dropped, channels) for k, v in fastest.items()
    }
    measured = {
        "seconds_per_step": fastest,
        "variants": {
            "half": f"{c.num_blocks - dropped} blocks",
            "narrow": f"{c.num_blocks - dropped} blocks of {c.width - channels} channels",
        },
        "settings": {
            "decode": f"batch 1, greedy, {prompt_length}-token prompt, {new_tokens} new tokens",
            "prefill": f"1x{prefill_length}",
            "repeats": repeats,
            "threads": torch.get_num_threads(),
        },
    }
    tm = TimeModel(decode=steps["decode"], prefill=steps["prefill"], measured=measured)
    log.info(
        "auto's time model (decode, per token): %.2f ms outside the blocks, %.3f ms per block + %.3g ms per "
        "million block weights",
        1e3 * tm.decode.other,
        1e3 * tm.decode.fixed,
        1e9 * tm.decode.per_param,
    )
    return tm
