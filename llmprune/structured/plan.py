"""How much of each structure to remove for a target fraction of decoder-block parameters.

Pure arithmetic on sizes and error curves, no model: ``Costs`` holds what one block, one MLP channel
and one key-value group (with its query heads) weigh; ``counts_for`` turns a fraction into counts for a
single structure; ``allocate`` splits a budget across depth, width and heads to minimise the summed
per-block error proxies (all in one unit: squared residual-stream perturbation relative to the
block's output norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmprune.errors import ConfigError


@dataclass(frozen=True)
class Costs:
    num_blocks: int
    block: int  # parameters of one decoder block
    channel: int  # parameters per MLP intermediate channel (rows of the input projections + a column)
    group: int  # parameters per key-value group with its query heads (0: heads not removable)
    width: int  # intermediate channels per block
    kv_heads: int  # key-value groups per block (0: heads not removable)

    @property
    def total(self) -> int:
        return self.num_blocks * self.block


@dataclass(frozen=True)
class Counts:
    """Uniform removal: whole blocks, then per remaining block the same channels and KV groups."""

    blocks: int = 0
    channels: int = 0
    kv_groups: int = 0

    def removed(self, c: Costs) -> int:
        kept = c.num_blocks - self.blocks
        return self.blocks * c.block + kept * (self.channels * c.channel + self.kv_groups * c.group)


def _round_channels(needed: float, c: Costs, multiple: int) -> int:
    """Channels to remove so that the *remaining* width is a multiple of ``multiple`` (rounded down)."""
    needed = max(0, math.ceil(needed - 1e-9))
    remaining = (c.width - needed) // multiple * multiple
    return c.width - remaining


def counts_for(structure: str, fraction: float, c: Costs, multiple: int = 8) -> Counts:
    """Counts of one structure removing (about) ``fraction`` of the block parameters.

    >>> counts_for("depth", 0.3, Costs(30, 100, 1, 10, 50, 3))
    Counts(blocks=9, channels=0, kv_groups=0)
    """
    budget = fraction * c.total
    if structure == "depth":
        n = round(budget / c.block)
        if n >= c.num_blocks:
            raise ConfigError(f"removing {fraction:.0%} of the blocks leaves none: lower --sparsity.")
        return Counts(blocks=n)
    if structure == "width":
        n = _round_channels(budget / (c.num_blocks * c.channel), c, multiple)
        if n >= c.width:
            raise ConfigError(
                f"removing {fraction:.0%} of the block parameters by MLP width alone would remove every "
                f"channel: lower --sparsity or use --structure auto."
            )
        return Counts(channels=n)
    if structure == "heads":
        n = math.ceil(budget / (c.num_blocks * c.group) - 1e-9) if c.group else c.kv_heads
        if n >= c.kv_heads:
            most = (c.kv_heads - 1) * c.group / c.block if c.kv_heads else 0.0
            raise ConfigError(
                f"heads alone can remove at most {most:.1%} of the block parameters "
                f"({c.kv_heads} key-value groups, one must stay); asked {fraction:.0%}. Fix: lower "
                f"--sparsity or use --structure auto."
            )
        return Counts(kv_groups=n)
    raise ConfigError(f"unknown structure {structure!r}: depth, width, heads or auto.")


@dataclass(frozen=True)
class Allocation:
    counts: Counts
    blocks: list[int]  # which blocks to drop
    error: float  # summed proxy


def allocate(
    fraction: float,
    c: Costs,
    block_error: list[float],
    width_curves: list[list[float]],
    head_curves: list[list[float]],
    multiple: int = 8,
    structures: tuple[str, ...] = ("depth", "width", "heads"),
    blocks: int | None = None,
    groups: int | None = None,
) -> Allocation:
    """The split of ``fraction`` across depth, width and heads with the least summed error proxy.

    ``block_error[i]``: removing block i; ``width_curves[i][k]`` / ``head_curves[i][k]``: removing ``k``
    channels / groups from block i (``[0] == 0``; as long as the search may need). For every number of
    dropped blocks and of removed groups, the channels fill the rest of the budget; the dropped blocks
    are those whose removal costs least compared with shrinking them. ``blocks`` and ``groups`` fix
    how many blocks are dropped and how many key-value groups are removed per kept block.
    """
    budget = fraction * c.total
    best: Allocation | None = None
    max_blocks = c.num_blocks - 1 if "depth" in structures else 0
    max_groups = c.kv_heads - 1 if "heads" in structures and c.kv_heads else 0
    for d in range(max_blocks + 1) if blocks is None else [blocks]:
        kept = c.num_blocks - d
        for g in range(max_groups + 1) if groups is None else [groups]:
            rest = budget - d * c.block - kept * g * c.group
            k = _round_channels(rest / (kept * c.channel), c, multiple) if rest > 0 else 0
            if k >= c.width or k >= len(width_curves[0]) or (k and "width" not in structures):
                continue
            counts = Counts(d, k, g)
            removed = counts.removed(c)
            if removed < budget - c.channel * kept * multiple or removed > budget + c.block / 2:
                continue  # rounding aside, the split must remove what was asked
            shrink = [width_curves[i][k] + head_curves[i][g] for i in range(c.num_blocks)]
            order = sorted(range(c.num_blocks), key=lambda i: (block_error[i] - shrink[i], i))
            dropped = sorted(order[:d])
            error = sum(shrink) + sum(block_error[i] - shrink[i] for i in dropped)
            if best is None or error < best.error:
                best = Allocation(counts, dropped, error)
    if best is None:
        raise ConfigError(f"no split of depth, width and heads removes {fraction:.0%}: lower --sparsity.")
    return best
