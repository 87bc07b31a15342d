"""``--structure auto``: split a parameter budget across depth, width and heads.

The error proxy (``plan.allocate``) proposes; the calibration loss decides among the candidates that a
time model measured on this machine predicts fast enough (see ``auto_plan`` and ``speedmodel``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.modules import find_blocks
from llmprune.errors import ConfigError
from llmprune.structured.edits import (
    block_score,
    choose_groups,
    head_groups,
    keep_original,
    remove_columns,
    restore,
)
from llmprune.structured.passes import InputStats, block_pass, measure_block
from llmprune.structured.plan import Allocation, Costs, allocate, counts_for
from llmprune.structured.scores import angular_distance, token_cosines
from llmprune.structured.speedmodel import TimeModel, choose
from llmprune.structured.timing import measure_time_model

log = logging.getLogger(__name__)


#: dense statistics kept for auto's candidate checks above this size are skipped (the proxy decides)
_AUTO_STATS_BUDGET = 2 * 2**30
#: at most this many (dropped blocks, removed groups) pairs: auto checks every one of them
EXHAUSTIVE = 12


def _heads_alone(fraction: float, c: Costs, g_max: int) -> int:
    """Key-value groups per block that remove ``fraction`` by heads alone (0: heads cannot reach it)."""
    try:
        g = counts_for("heads", fraction, c).kv_groups if g_max else 0
    except ConfigError:
        return 0
    return g if g <= g_max else 0


def auto_plan(model, layout, ids, fraction, c: Costs, opts, batch_size, progress):
    """Auto: the error proxy proposes splits, a time model says which are fast enough, the loss picks.

    Pass 1 on the dense model measures each block's removal error and the OBS error curves (and
    greedy orders) of removing channels and key-value groups. ``plan.allocate`` proposes the best
    split for a few numbers of dropped blocks; each proposal is then applied to the dense model
    (dense-statistics refit, dropped blocks skipped by a hook) and scored by the LM loss on a quarter of
    the calibration windows (at most 8) held out of the statistics, because a sum of per-block errors
    misjudges how dropped blocks compound and a refit judged on its own windows flatters itself.
    Each structure alone is always a candidate, depth alone twice: the blocks of least residual error
    and the span of least angular distance (Gromov et al.), measured in the same pass.

    With ``min_decode_speedup`` (default 1.25; 0 or ``None``: off) the decode and prefill time of every
    candidate is predicted by a time model measured here (``timing``, ``speedmodel``); for each number of
    key-value groups the least depth that reaches the target is a candidate too, and the lowest loss
    among the candidates predicted to reach it wins (``speedmodel.choose``; none: the lowest loss, noted).

    Returns the allocation, the block scores, the candidates and the speed record (target, time model,
    the choice's predicted speed-up, the fallback if any).
    """
    target = opts.get("min_decode_speedup") or None
    need = (
        counts_for("width", min(fraction, 0.95), c, 1).channels
        if fraction * c.total < c.num_blocks * c.width * c.channel
        else c.width - 1
    )
    k_max = min(c.width - 1, need + opts["width_multiple"])
    g_max = c.kv_heads - 1 if c.kv_heads else 0
    heads = head_groups(model) if g_max else None
    channel_groups = torch.arange(c.width)[:, None]
    scores, block_err, wcurves, hcurves = [], [], [], []
    orders: list[tuple[list[int], list[int]]] = []  # per block: greedy channel order, group order
    o = layout.attn[3] if layout.attn else None
    taps = [layout.mlp_out] + ([o] if g_max else [])
    o_width = int(heads.numel()) if g_max else 0
    keep_stats = 4 * c.num_blocks * (c.width**2 + o_width**2) <= _AUTO_STATS_BUDGET  # fp32 Hessians
    dense_stats: list[dict[str, InputStats]] = []
    full = (
        counts_for("depth", fraction, c).blocks if fraction * c.total < (c.num_blocks - 0.5) * c.block else 0
    )
    window: deque[list[Tensor]] = deque(maxlen=full + 1)  # hidden states at span ends (Gromov et al.)
    spans: dict[tuple[int, int], float] = {}  # (length, first block) -> angular distance, lengths <= full

    def visit(i: int, block: nn.Module, inputs) -> list:
        if full and i == 0:
            window.append(list(inputs.hidden))
        st, outs = measure_block(block, i, inputs, taps)
        if full:
            window.append(outs)
            for length in range(1, len(window)):
                cos = sum(
                    float(token_cosines(a, b).sum())
                    for a, b in zip(window[-1 - length], window[-1], strict=True)
                )
                spans[(length, i + 1 - length)] = angular_distance(cos, st.num_tokens)
        scale = max(st.out_scale, 1e-30)
        scores.append(block_score(st))
        residual = (opts["depth_method"] or "residual") == "residual"
        block_err.append(st.residual_error if residual else scores[-1]["block_influence"])
        down = block.get_submodule(layout.mlp_out)
        worder, curve = choose_groups("obs", down, st.inputs[layout.mlp_out], channel_groups, k_max, opts)
        wcurves.append([0.0] + [e / scale for e in curve])
        horder, hc = [], []
        if g_max:
            hopts = {**opts, "obs_rounds": g_max}
            horder, hc = choose_groups("obs", block.get_submodule(o), st.inputs[o], heads, g_max, hopts)
        hcurves.append([0.0] + [e / scale for e in hc])
        orders.append((worder, horder))
        if keep_stats:
            dense_stats.append(st.inputs)
        return outs

    # the candidates' refits are fitted on some windows and judged on others: judged in-sample, a refit
    # of o_proj made removing heads look cheap (SmolLM2, 30 %: loss 3.95 in-sample, held-out ppl 168
    # against 115 for channels only)
    held = max(1, min(8, len(ids) // 4)) if len(ids) > 1 else 0
    fit_ids, eval_ids = (ids[:-held], ids[-held:]) if held else (ids, ids)
    block_pass(model, fit_ids, visit, batch_size=batch_size, desc="(1/2) measuring", progress=progress)
    args = (fraction, c, block_err, wcurves, hcurves, opts["width_multiple"], layout.structures)
    proxy = allocate(*args)
    speed: dict[str, Any] = {"min_decode_speedup": target}
    if not keep_stats or "depth" not in layout.structures:
        speed["fallback"] = "no candidate search (statistics too large to keep): the error proxy's split"
        return proxy, scores, [], speed
    tm: TimeModel | None = measure_time_model(model, c) if target else None
    if tm is not None:
        speed["time_model"] = tm.to_dict()
    elif target:
        speed["fallback"] = "a one-block model has no time model: the lowest calibration loss was kept"
        target = None
    tried: dict[tuple[int, int, tuple[int, ...]], Allocation] = {}
    search: list[dict[str, Any]] = []

    def key(alloc: Allocation) -> tuple[int, int, tuple[int, ...]]:
        return alloc.counts.blocks, alloc.counts.kv_groups, tuple(alloc.blocks)

    def consider(alloc: Allocation | None) -> None:
        if alloc is None or key(alloc) in tried:
            return
        tried[key(alloc)] = alloc
        loss = _candidate_loss(model, layout, alloc, orders, dense_stats, heads, eval_ids, opts)
        rec = {**vars(alloc.counts), "dropped": alloc.blocks, "proxy": alloc.error, "loss": loss}
        if tm is not None:
            rec.update({f"{k}_speedup": v for k, v in tm.predict(alloc.counts, c).items()})
        search.append(rec)
        log.info(
            "auto candidate %s: calibration loss %.4f (proxy %.4g), predicted decode %s",
            alloc.counts,
            loss,
            alloc.error,
            f"{rec['decode_speedup']:.2f}x" if tm is not None else "not measured",
        )

    def proposal(**fixed: int) -> Allocation | None:
        try:
            return allocate(*args, **fixed)
        except ConfigError:  # nothing with exactly these counts fits the budget
            return None

    def as_span(alloc: Allocation | None) -> Allocation | None:
        """The same counts with the dropped blocks as the span of least angular distance."""
        if alloc is None or not alloc.counts.blocks:
            return None
        d, k, g = alloc.counts.blocks, alloc.counts.channels, alloc.counts.kv_groups
        starts = [j for length, j in spans if length == d]
        if not starts:
            return None
        start = min(starts, key=lambda j: (spans[(d, j)], j))
        span = list(range(start, start + d))
        shrink = [wcurves[i][k] + hcurves[i][g] for i in range(c.num_blocks)]
        return replace(alloc, blocks=span, error=sum(shrink) + sum(block_err[i] - shrink[i] for i in span))

    def least_fast_depth(g: int) -> Allocation | None:
        """The proposal with ``g`` groups and the fewest dropped blocks predicted to reach the target."""
        for d in range(max_blocks + 1):
            alloc = proposal(blocks=d, groups=g)
            if alloc is not None and tm is not None and tm.decode.speedup(alloc.counts, c) >= target:
                return alloc
        return None

    max_blocks = c.num_blocks - 1
    if (max_blocks + 1) * (g_max + 1) <= EXHAUSTIVE:  # small models: every split
        for d in range(max_blocks + 1):
            for g in range(g_max + 1):
                consider(proposal(blocks=d, groups=g))
    else:
        # each structure alone, so auto is never worse than the best of them on this loss; then a coordinate
        # search: the depth budget first (groups as the proxy likes), then the groups at the best depth
        consider(proxy)
        consider(proposal(blocks=0, groups=0))  # width alone
        depth_alone = proposal(blocks=full, groups=0)  # depth alone (channels only to round the size)
        consider(depth_alone)
        consider(as_span(depth_alone))  # the same count as the span of least angular distance
        alone = _heads_alone(fraction, c, g_max)
        if alone:
            consider(proposal(blocks=0, groups=alone))
        for d in sorted({0, full // 3, (2 * full) // 3, full}):
            consider(proposal(blocks=d))
        if target:  # the cheapest way to the speed target, for each number of groups
            for g in range(g_max + 1):
                fast = least_fast_depth(g)
                consider(fast)
                consider(as_span(fast))
        best, _ = choose(search, target)
        for g in range(g_max + 1):
            consider(proposal(blocks=best["blocks"], groups=g))
    if not search:
        speed["fallback"] = "no split could be checked: the error proxy's split"
        return proxy, scores, [], speed
    best, note = choose(search, target)
    if tm is not None:
        speed["predicted"] = {k: best[f"{k}_speedup"] for k in ("decode", "prefill")}
        speed["met"] = note is None
    if note:
        speed["fallback"] = note
        log.warning("auto: %s", note)
    return tried[(best["blocks"], best["kv_groups"], tuple(best["dropped"]))], scores, search, speed


def _skip_block(_module, args, kwargs, output):
    """Forward hook making a block the identity: what removing it does, without changing the model."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


@torch.no_grad()
def _candidate_loss(model, layout, alloc, orders, dense_stats, heads, ids: Tensor, opts) -> float:
    """LM loss of the dense model with ``alloc`` applied (edits undone and hooks removed after)."""
    _, blocks = find_blocks(model)
    originals: list[tuple[nn.Module, Tensor, Tensor | None]] = []
    hooks = []
    k, g = alloc.counts.channels, alloc.counts.kv_groups
    try:
        for i, block in enumerate(blocks):
            if i in alloc.blocks:
                hooks.append(block.register_forward_hook(_skip_block, with_kwargs=True))
                continue
            edits = [(layout.mlp_out, torch.tensor(orders[i][0][:k]))] if k else []
            if g:
                edits.append((layout.attn[3], heads[orders[i][1][:g]].flatten()))
            for name, cols in edits:
                module = keep_original(block.get_submodule(name), originals)
                remove_columns(module, cols, dense_stats[i][name], True, opts["dampening_frac"])
        losses = [
            float(model(input_ids=ids[b : b + 4], labels=ids[b : b + 4]).loss) for b in range(0, len(ids), 4)
        ]
        return sum(losses) / len(losses)
    finally:
        for h in hooks:
            h.remove()
        restore(originals)
