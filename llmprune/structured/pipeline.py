"""Structured pruning end to end: plan, calibrate block by block, choose, compensate, rebuild.

>>> import llmprune
>>> model, tok = llmprune.load_model("smollm2-135m")                                  # doctest: +SKIP
>>> result = llmprune.prune(model, tok, structure="auto", sparsity=0.3)               # doctest: +SKIP
>>> small = result.model            # a plain, smaller LlamaForCausalLM                 # doctest: +SKIP

Passes over the calibration tokens, one decoder block in memory at a time:

1. (depth and auto) the dense model: each block's influence ``1 - cos(h_in, h_out)``, its residual
   error, the angular distance of spans; for auto also the OBS error curves of removing MLP channels
   and key-value groups from each block, so ``plan.allocate`` can split the budget;
2. (width and heads) sequentially on the already-shrunk model: per kept block, the statistics of the
   ``o_proj`` input choose the key-value groups, the remaining ``o_proj`` columns are refitted; then the
   statistics of the MLP output projection's input (after the attention edit) choose the channels and
   refit its remaining columns (and bias). Removed blocks are skipped.

The edits are written as function-equivalent zeros; ``surgery.rebuild`` then builds the smaller model.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

import torch
from torch import Tensor, nn

from llmprune.calibration.data import tokens_hash
from llmprune.calibration.distributed import current_comm
from llmprune.calibration.modules import WeightView, find_blocks
from llmprune.calibration.settings import calibration_ids
from llmprune.errors import ConfigError
from llmprune.structured.arch import Layout, check_structure, head_geometry, layout_of
from llmprune.structured.passes import BlockStats, InputStats, block_pass, measure_block, run_block
from llmprune.structured.plan import Allocation, Costs, Counts, allocate, counts_for
from llmprune.structured.refit import mean_compensation, refit_columns, refit_with_bias
from llmprune.structured.result import StructuredResult
from llmprune.structured.scores import (
    angular_distance,
    block_influence,
    fluctuation_scores,
    group_scores,
    obs_group_removal,
    token_cosines,
    wanda_channel_scores,
)
from llmprune.structured.settings import SHAPE_KEYS, check_settings, resolve_method
from llmprune.structured.surgery import Removal, check_removal, head_indices, mlp_width, rebuild

log = logging.getLogger(__name__)


def model_costs(model: nn.Module, layout: Layout) -> Costs:
    """Parameter weights of one block, one MLP channel, one key-value group (read off the modules)."""
    _, blocks = find_blocks(model)
    block = blocks[0]

    def nbias(m: nn.Module) -> int:
        return int(getattr(m, "bias", None) is not None)

    channel = sum(
        WeightView(block.get_submodule(r)).shape[1] + nbias(block.get_submodule(r)) for r in layout.mlp_in
    )
    channel += WeightView(block.get_submodule(layout.mlp_out)).shape[0]
    group, kv = 0, 0
    if layout.attn is not None:
        g = head_geometry(model.config)
        q, k, v, o = (block.get_submodule(r) for r in layout.attn)
        rows_q, rows_kv = g.queries_per_group * g.head_dim, g.head_dim
        group = rows_q * (q.in_features + nbias(q)) + rows_kv * (
            k.in_features + nbias(k) + v.in_features + nbias(v)
        )
        group += rows_q * o.out_features
        kv = g.num_kv_heads
    return Costs(
        num_blocks=len(blocks),
        block=sum(p.numel() for p in block.parameters()),
        channel=channel,
        group=group,
        width=mlp_width(model, layout),
        kv_heads=kv,
    )


def counts_from_shape(model: nn.Module, layout: Layout, options: dict[str, Any], c: Costs) -> Counts:
    """Counts from explicit new sizes (``num_hidden_layers=22``, ``intermediate_size=1152``…)."""
    shape = {k: options[k] for k in SHAPE_KEYS if k in options}
    width_keys = {"intermediate_size", "ffn_dim", "n_inner"} & set(shape)
    if (
        width_keys
        - {layout.width_key}
        - ({"intermediate_size"} if layout.width_key != "intermediate_size" else set())
    ):
        raise ConfigError(f"{layout.model_type} names its MLP width {layout.width_key!r}: use that option.")
    layers = shape.get("num_hidden_layers", c.num_blocks)
    width = next((shape[k] for k in width_keys), c.width)
    if not 1 <= layers <= c.num_blocks or not 1 <= width <= c.width:
        raise ConfigError(
            f"new sizes must be between 1 and the current ones ({c.num_blocks} layers, {c.width} "
            f"channels), got {layers} layers and {width} channels."
        )
    groups = 0
    if "num_key_value_heads" in shape or "num_attention_heads" in shape:
        check_structure(layout, "heads")
        g = head_geometry(model.config)
        kv = shape.get("num_key_value_heads")
        if kv is None:
            if shape["num_attention_heads"] % g.queries_per_group:
                raise ConfigError(
                    f"num_attention_heads must be a multiple of {g.queries_per_group} (the query heads "
                    "sharing one key-value head): whole groups are removed."
                )
            kv = shape["num_attention_heads"] // g.queries_per_group
        if not 1 <= kv <= g.num_kv_heads:
            raise ConfigError(f"num_key_value_heads must be between 1 and {g.num_kv_heads}, got {kv}.")
        groups = g.num_kv_heads - kv
    return Counts(blocks=c.num_blocks - layers, channels=c.width - width, kv_groups=groups)


def _head_groups(model: nn.Module) -> Tensor:
    g = head_geometry(model.config)
    return torch.stack([head_indices(g, [k])[0] for k in range(g.num_kv_heads)])  # (G, rep * hd)


def _augmented(W: Tensor, bias: Tensor | None, st: InputStats) -> tuple[Tensor, Tensor]:
    """[W | b] and the Hessian of [x; 1] for a biased layer (the bias column is never removed)."""
    if bias is None:
        return W, st.hessian
    from llmprune.structured.refit import augmented_hessian

    return torch.cat([W, bias.detach().float()[:, None]], 1), augmented_hessian(st.hessian, st.mean)


def choose_groups(
    method: str, module: nn.Module, st: InputStats, groups: Tensor, count: int, opts: dict[str, Any]
) -> tuple[list[int], list[float] | None]:
    """Which ``count`` groups of input columns of ``module`` to remove (and the OBS error curve)."""
    W = WeightView(module).read()  # (out, in)
    if method == "obs":
        Wa, Ha = _augmented(W, getattr(module, "bias", None), st)
        step = max(1, math.ceil(count / opts["obs_rounds"]))
        return obs_group_removal(Wa, Ha, groups, count, damp=opts["dampening_frac"], step=step)
    cols = (
        wanda_channel_scores(W, st.sq_norms)
        if method == "wanda_sp"
        else fluctuation_scores(W, st.sq_norms, st.mean)
    )
    order = torch.argsort(group_scores(cols, groups), stable=True)
    return order[:count].tolist(), None


@torch.no_grad()
def remove_columns(module: nn.Module, removed: Tensor, st: InputStats, refit: bool, damp: float) -> None:
    """Write the function-equivalent edit: removed input columns zero, the rest refitted (or kept), and
    the bias compensated for the removed columns' mean where the layer has one."""
    view = WeightView(module)
    W = view.read()  # (out, in)
    bias = getattr(module, "bias", None)
    keep = torch.ones(W.shape[1], dtype=torch.bool)
    keep[removed] = False
    new_b = None
    new = torch.zeros_like(W)
    if refit and bias is not None:
        new[:, keep], new_b = refit_with_bias(W, bias.detach().float(), st.hessian, st.mean, keep, damp=damp)
    elif refit:
        new[:, keep] = refit_columns(W, st.hessian, keep, damp=damp)
    else:
        new[:, keep] = W[:, keep]
        if bias is not None:
            new_b = mean_compensation(W, bias.detach().float(), st.mean, keep)
    view.write(keep[None, :].expand_as(W), new)
    if new_b is not None:
        bias.copy_(new_b.to(bias.dtype))


def prune_structured(
    model: nn.Module,
    tokenizer=None,
    *,
    structure: str = "auto",
    sparsity: float | str = 0.3,
    method: str | None = None,
    dataset: Any = None,
    num_calibration_samples: int = 128,
    max_seq_length: int = 2048,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    **options: Any,
) -> StructuredResult:
    """Remove ``sparsity`` of the decoder-block parameters as whole ``structure``s; return the new model.

    ``structure``: ``depth`` (whole blocks), ``width`` (MLP channels), ``heads`` (key-value groups with
    their query heads) or ``auto`` (the split with the least calibration error proxy). Options:
    ``dampening_frac`` (0.01), ``refit`` (default: on for ``obs``), ``width_multiple`` (8: the new
    intermediate size is a multiple of it), ``obs_rounds`` (32), ``depth_method`` (auto's block choice),
    or explicit sizes (``num_hidden_layers=22``, ``intermediate_size=1152``, ``num_key_value_heads=2``).
    """
    start = time.perf_counter()
    method = resolve_method(structure, method)
    layout = layout_of(model)
    check_structure(layout, structure)
    opts = check_settings(structure, method, sparsity, options)
    costs = model_costs(model, layout)
    explicit = any(k in SHAPE_KEYS for k in options)
    notes: list[str] = []
    if explicit:
        counts = counts_from_shape(model, layout, options, costs)
        notes.append("explicit shape options: --sparsity was not used")
    elif structure != "auto":
        counts = counts_for(structure, float(sparsity), costs, opts["width_multiple"])
    else:
        counts = None
    if counts is not None:  # refuse impossible requests before any calibration
        _dry_run(model, counts, costs)
    ids = calibration_ids(
        model, dataset, tokenizer, num_calibration_samples, max_seq_length, seed, current_comm()
    )
    torch.manual_seed(seed)
    depth_method = opts["depth_method"] or (method if structure == "depth" else "block_influence")
    if structure == "auto" and not explicit:
        depth_method = opts["depth_method"] or "residual"
    scores: list[dict[str, float]] = []
    dropped: list[int] = []
    search: list[dict[str, Any]] = []
    if structure == "auto" and not explicit:
        alloc, scores, search = _auto_plan(
            model, layout, ids, float(sparsity), costs, opts, batch_size, progress
        )
        counts, dropped = alloc.counts, alloc.blocks
        notes.append(
            f"auto split: {counts.blocks} blocks, {counts.channels} channels and {counts.kv_groups} "
            "key-value groups per kept block"
        )
    elif counts.blocks:
        scores = _depth_scores(model, ids, counts.blocks, batch_size, depth_method == "angular", progress)
        dropped = _choose_blocks(depth_method, scores, counts.blocks)
    removal = Removal(blocks=dropped)
    originals: list[tuple[nn.Module, Tensor, Tensor | None]] = []  # edited modules' weights, restored
    try:
        if counts.channels or counts.kv_groups:
            wmethod = "obs" if structure in ("auto", "depth") else method
            _shrink_pass(model, layout, ids, counts, removal, wmethod, opts, batch_size, progress, originals)
        small = rebuild(model, removal)
    finally:
        _restore(originals)
    result = StructuredResult(
        model=small,
        structure=structure,
        method=method if structure != "depth" else depth_method,
        sparsity=None if explicit else float(sparsity),
        removal=removal,
        counts={"blocks": counts.blocks, "channels": counts.channels, "kv_groups": counts.kv_groups},
        block_params={"dense": costs.total, "pruned": _block_params(small)},
        total_params={"dense": _params(model), "pruned": _params(small)},
        config=_shape(small, layout),
        block_scores=scores,
        search=search,
        options={k: v for k, v in {**opts, **options}.items() if v is not None},
        calibration_hash=tokens_hash(ids),
        num_calibration_samples=int(ids.shape[0]),
        max_seq_length=int(ids.shape[1]),
        seed=seed,
        notes=notes,
    )
    result.seconds = time.perf_counter() - start
    log.info(
        "%s (%s): removed %.1f%% of the decoder-block parameters (%s) in %.1fs",
        structure,
        result.method,
        100 * result.block_fraction_removed,
        result.counts,
        result.seconds,
    )
    return result


@torch.no_grad()
def _restore(originals: list[tuple[nn.Module, Tensor, Tensor | None]]) -> None:
    """Put back the input model's weights: the edits were only needed to propagate the calibration."""
    for module, weight, bias in originals:
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _block_params(model: nn.Module) -> int:
    _, blocks = find_blocks(model)
    return sum(p.numel() for b in blocks for p in b.parameters())


def _shape(model: nn.Module, layout: Layout) -> dict[str, Any]:
    keys = ("num_hidden_layers", layout.width_key, "num_attention_heads", "num_key_value_heads", "head_dim")
    return {k: getattr(model.config, k, None) for k in keys if getattr(model.config, k, None) is not None}


def _dry_run(model: nn.Module, counts: Counts, c: Costs) -> None:
    """check_removal on a stand-in removal of the same counts: the same errors, before calibration."""
    kept = range(counts.blocks, c.num_blocks)
    check_removal(
        model,
        Removal(
            blocks=list(range(counts.blocks)),
            channels={i: list(range(counts.channels)) for i in kept},
            kv_groups={i: list(range(counts.kv_groups)) for i in kept} if counts.kv_groups else {},
        ),
    )


def _depth_scores(
    model: nn.Module, ids: Tensor, span: int, batch_size: int, angular: bool, progress: bool = True
) -> list[dict[str, float]]:
    """Block influence and residual error per block; angular distance of the span starting there."""
    scores: list[dict[str, float]] = []
    window: deque[list[Tensor]] = deque(maxlen=span + 1)

    def visit(i: int, block: nn.Module, inputs) -> list:
        if i == 0 and angular:
            window.append(list(inputs.hidden))
        st, outs = measure_block(block, i, inputs, [])
        scores.append(_block_score(st))
        if angular:
            window.append(outs)
            if len(window) == span + 1:
                cos = sum(
                    float(token_cosines(a, b).sum()) for a, b in zip(window[0], window[-1], strict=True)
                )
                scores[i + 1 - span]["angular_span"] = angular_distance(cos, st.num_tokens)
        return outs

    block_pass(model, ids, visit, batch_size=batch_size, desc="(1/2) scoring blocks", progress=progress)
    return scores


def _block_score(st: BlockStats) -> dict[str, float]:
    return {
        "block_influence": block_influence(st.cos_sum, st.num_tokens),
        "residual_error": st.residual_error,
    }


def _choose_blocks(method: str, scores: list[dict[str, float]], count: int) -> list[int]:
    if count == 0:
        return []
    if method == "angular":
        starts = [i for i, s in enumerate(scores) if "angular_span" in s]
        best = min(starts, key=lambda i: (scores[i]["angular_span"], i))
        return list(range(best, best + count))
    key = "block_influence" if method == "block_influence" else "residual_error"
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i][key], i))[:count])


#: dense statistics kept for auto's candidate checks above this size are skipped (the proxy decides)
_AUTO_STATS_BUDGET = 2 * 2**30


def _auto_plan(model, layout, ids, fraction, c: Costs, opts, batch_size, progress):
    """Auto: the error proxy proposes one split per depth budget, the calibration loss picks among them.

    Pass 1 on the dense model measures each block's removal error and the OBS error curves (and
    greedy orders) of removing channels and key-value groups. ``plan.allocate`` proposes the best
    split for a few numbers of dropped blocks; each proposal is then applied to the dense model
    (dense-statistics refit, dropped blocks skipped by a hook) and scored by the LM loss on a few
    calibration windows, because a sum of per-block errors misjudges how dropped blocks compound.
    """
    need = (
        counts_for("width", min(fraction, 0.95), c, 1).channels
        if fraction * c.total < c.num_blocks * c.width * c.channel
        else c.width - 1
    )
    k_max = min(c.width - 1, need + opts["width_multiple"])
    g_max = c.kv_heads - 1 if c.kv_heads else 0
    heads = _head_groups(model) if g_max else None
    channel_groups = torch.arange(c.width)[:, None]
    scores, block_err, wcurves, hcurves = [], [], [], []
    orders: list[tuple[list[int], list[int]]] = []  # per block: greedy channel order, group order
    o = layout.attn[3] if layout.attn else None
    taps = [layout.mlp_out] + ([o] if g_max else [])
    o_width = int(heads.numel()) if g_max else 0
    keep_stats = 4 * c.num_blocks * (c.width**2 + o_width**2) <= _AUTO_STATS_BUDGET  # fp32 Hessians
    dense_stats: list[dict[str, InputStats]] = []

    def visit(i: int, block: nn.Module, inputs) -> list:
        st, outs = measure_block(block, i, inputs, taps)
        scale = max(st.out_scale, 1e-30)
        scores.append(_block_score(st))
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

    block_pass(model, ids, visit, batch_size=batch_size, desc="(1/2) measuring", progress=progress)
    args = (fraction, c, block_err, wcurves, hcurves, opts["width_multiple"], layout.structures)
    proxy = allocate(*args)
    if not keep_stats or "depth" not in layout.structures:
        return proxy, scores, []
    full = (
        counts_for("depth", fraction, c).blocks if fraction * c.total < (c.num_blocks - 0.5) * c.block else 0
    )
    eval_ids = ids[: min(8, len(ids))]
    tried: dict[tuple[int, int], Allocation] = {}
    search: list[dict[str, Any]] = []

    def consider(alloc: Allocation | None) -> None:
        if alloc is None or (alloc.counts.blocks, alloc.counts.kv_groups) in tried:
            return
        tried[(alloc.counts.blocks, alloc.counts.kv_groups)] = alloc
        loss = _candidate_loss(model, layout, alloc, orders, dense_stats, heads, eval_ids, opts)
        search.append({**vars(alloc.counts), "dropped": alloc.blocks, "proxy": alloc.error, "loss": loss})
        log.info("auto candidate %s: calibration loss %.4f (proxy %.4g)", alloc.counts, loss, alloc.error)

    def proposal(**fixed: int) -> Allocation | None:
        try:
            return allocate(*args, **fixed)
        except ConfigError:  # nothing with exactly these counts fits the budget
            return None

    # coordinate search: the depth budget first (groups as the proxy likes), then the groups at the best depth
    consider(proxy)
    for d in sorted({0, full // 3, (2 * full) // 3, full}):
        consider(proposal(blocks=d))
    best = min(search, key=lambda r: (r["loss"], r["blocks"]))
    for g in range(g_max + 1):
        consider(proposal(blocks=best["blocks"], groups=g))
    best = min(search, key=lambda r: (r["loss"], r["blocks"]))
    return tried[(best["blocks"], best["kv_groups"])], scores, search


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
                module = _keep_original(block.get_submodule(name), originals)
                remove_columns(module, cols, dense_stats[i][name], True, opts["dampening_frac"])
        losses = [
            float(model(input_ids=ids[b : b + 4], labels=ids[b : b + 4]).loss) for b in range(0, len(ids), 4)
        ]
        return sum(losses) / len(losses)
    finally:
        for h in hooks:
            h.remove()
        _restore(originals)


def _keep_original(module: nn.Module, originals: list) -> nn.Module:
    bias = getattr(module, "bias", None)
    originals.append(
        (module, module.weight.detach().clone(), None if bias is None else bias.detach().clone())
    )
    return module


def _shrink_pass(
    model,
    layout: Layout,
    ids,
    counts: Counts,
    removal: Removal,
    method: str,
    opts,
    batch_size,
    progress=True,
    originals=None,
) -> None:
    """Pass 2: per kept block, remove KV groups (o_proj refit), then MLP channels (output refit)."""
    refit = opts["refit"] if opts["refit"] is not None else method == "obs"
    heads = _head_groups(model) if counts.kv_groups else None
    channel_groups = torch.arange(mlp_width(model, layout))[:, None]
    dropped = set(removal.blocks)
    originals = [] if originals is None else originals

    def keep_original(module: nn.Module) -> nn.Module:
        bias = getattr(module, "bias", None)
        originals.append(
            (module, module.weight.detach().clone(), None if bias is None else bias.detach().clone())
        )
        return module

    def visit(i: int, block: nn.Module, inputs) -> list:
        if i in dropped:
            return inputs.hidden
        if counts.kv_groups:
            o = layout.attn[3]
            st, _ = measure_block(block, i, inputs, [o])
            ids_, _ = choose_groups(
                method, block.get_submodule(o), st.inputs[o], heads, counts.kv_groups, opts
            )
            removal.kv_groups[i] = sorted(ids_)
            remove_columns(
                keep_original(block.get_submodule(o)),
                heads[ids_].flatten(),
                st.inputs[o],
                refit,
                opts["dampening_frac"],
            )
        if counts.channels:
            st, _ = measure_block(block, i, inputs, [layout.mlp_out])
            down = block.get_submodule(layout.mlp_out)
            ids_, _ = choose_groups(
                method, down, st.inputs[layout.mlp_out], channel_groups, counts.channels, opts
            )
            removal.channels[i] = sorted(ids_)
            remove_columns(
                keep_original(down),
                torch.tensor(ids_),
                st.inputs[layout.mlp_out],
                refit,
                opts["dampening_frac"],
            )
        return run_block(block, inputs)

    block_pass(model, ids, visit, batch_size=batch_size, desc="(2/2) shrinking", progress=progress)
