"""How fast a uniformly shrunk model runs, predicted from three timings: what auto's speed target judges.

Why a model of time and not of parameters: at batch 1 a decoder block costs a fixed time whatever its
width (norms, rotary, attention over the cache, a dozen kernel launches and Python calls), and the
output head and the generation loop cost the same after any cut. So removing 30 % of the block
parameters as MLP width alone decodes barely faster, while removing them as whole blocks also removes
their fixed cost. One step (a decoded token, or one prefill forward) is modelled as

    t(d, k, g) = other + (N - d) * (fixed + per_param * P(k, g)),   P(k, g) = block - k*channel - g*group

with ``d`` dropped blocks, ``k`` MLP channels and ``g`` key-value groups removed per kept block
(``plan.Costs`` weighs them). The three constants come from timing the dense model, a model with half
of its blocks and one with half its blocks narrowed (``structured.timing``), which is exactly three
equations: no fit, no tuned constant, and each one measured in the regime it predicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llmprune.structured.plan import Costs, Counts

#: auto's default: the decode speed-up a candidate must be predicted to reach (see ``choose``)
MIN_DECODE_SPEEDUP = 1.25


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step: ``other`` outside the blocks, ``fixed`` per block, ``per_param`` per weight."""

    other: float
    fixed: float
    per_param: float

    def seconds(self, counts: Counts, c: Costs) -> float:
        kept = c.num_blocks - counts.blocks
        params = c.block - counts.channels * c.channel - counts.kv_groups * c.group
        return self.other + kept * (self.fixed + self.per_param * params)

    def speedup(self, counts: Counts, c: Costs) -> float:
        """Dense step time over this shape's (> 1: faster)."""
        return self.seconds(Counts(), c) / max(self.seconds(counts, c), 1e-30)


def fit_step_time(
    dense: float, half: float, narrow: float, c: Costs, dropped: int, channels: int
) -> StepTime:
    """The constants from three step times: the dense model, ``dropped`` blocks removed, and that model
    with ``channels`` MLP channels removed from every kept block as well.

    Noise can make a difference negative on a busy machine; each constant is clamped at zero (a model
    that says "free" for one part is still a bound, and the clamp is visible in the result).
    """
    per_block = max(dense - half, 0.0) / dropped
    kept = c.num_blocks - dropped
    per_param = max(half - narrow, 0.0) / (kept * channels * c.channel) if channels * c.channel else 0.0
    fixed = max(per_block - per_param * c.block, 0.0)
    other = max(dense - c.num_blocks * per_block, 0.0)
    return StepTime(other=other, fixed=fixed, per_param=per_param)


@dataclass(frozen=True)
class TimeModel:
    """Decode (batch 1, one token with the cache) and prefill step times on the machine that measured them."""

    decode: StepTime
    prefill: StepTime
    measured: dict[str, Any]  # the raw timings and settings, for the record

    def predict(self, counts: Counts, c: Costs) -> dict[str, float]:
        return {"decode": self.decode.speedup(counts, c), "prefill": self.prefill.speedup(counts, c)}

    def to_dict(self) -> dict[str, Any]:
        return {"decode": asdict(self.decode), "prefill": asdict(self.prefill), "measured": self.measured}


def choose(
    search: list[dict[str, Any]], min_decode_speedup: float | None
) -> tuple[dict[str, Any], str | None]:
    """The candidate auto keeps: the lowest loss among those predicted to decode at least
    ``min_decode_speedup`` times faster than the dense model; with no target (``None`` or 0), the lowest
    loss. When no candidate reaches the target, the lowest loss of all, and a note saying so (the
    target is a preference, not a reason to fail a run that asked for a size).

    Ties (equal losses) go to fewer dropped blocks, as before the speed target existed.
    """
    by_loss = sorted(search, key=lambda r: (r["loss"], r["blocks"]))
    if not min_decode_speedup:
        return by_loss[0], None
    fast = [r for r in by_loss if r.get("decode_speedup", 0.0) >= min_decode_speedup]
    if fast:
        return fast[0], None
    fastest = max(search, key=lambda r: r.get("decode_speedup", 0.0))
    return by_loss[0], (
        f"no candidate is predicted to decode {min_decode_speedup:g}x faster than the dense model (the "
        f"fastest, {fastest['blocks']} blocks + {fastest['channels']} channels + {fastest['kv_groups']} "
        f"KV groups: {fastest.get('decode_speedup', 0.0):.2f}x); kept the lowest calibration loss. Lower "
        "--option min_decode_speedup or raise --sparsity for a faster model."
    )
