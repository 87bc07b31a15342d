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
from llmprune.structured.auto import auto_plan
from llmprune.structured.edits import (
    block_score,
    choose_groups,
    head_groups,
    remove_columns,
    restore,
)
from llmprune.structured.passes import block_pass, measure_block, run_block
from llmprune.structured.plan import Costs, Counts, counts_for
from llmprune.structured.result import StructuredResult
from llmprune.structured.scores import (
    angular_distance,
    token_cosines,
)
from llmprune.structured.settings import SHAPE_KEYS, check_settings, resolve_method
from llmprune.structured.surgery import Removal, check_removal, mlp_width, rebuild

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


def prune_structured(
    model: nn.Module,
    tokenizer=None,
    *,
    structure: str = "auto",
    sparsity: float | str = 0.3,
    method: str | None = None,
    dataset: Any = None,
    num_calibration_samples: int | None = None,  # None: sized to the model and device, as for masks
    max_seq_length: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    **options: Any,
) -> StructuredResult:
    """Remove ``sparsity`` of the decoder-block parameters as whole ``structure``s; return the new model.

    ``structure``: ``depth`` (whole blocks), ``width`` (MLP channels), ``heads`` (key-value groups with
    their query heads) or ``auto`` (the split of least held-out calibration loss among those a time
    model measured here predicts to decode ``min_decode_speedup`` times faster). Options:
    ``dampening_frac`` (0.01), ``refit`` (default: on for ``obs``), ``width_multiple`` (8: the new
    intermediate size is a multiple of it), ``obs_rounds`` (32), ``depth_method`` (auto's block choice),
    ``min_decode_speedup`` (auto: 1.25; 0 turns the speed target off), or explicit sizes
    (``num_hidden_layers=22``, ``intermediate_size=1152``, ``num_key_value_heads=2``).
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
    speed: dict[str, Any] = {}
    if structure == "auto" and not explicit:
        alloc, scores, search, speed = auto_plan(
            model, layout, ids, float(sparsity), costs, opts, batch_size, progress
        )
        counts, dropped = alloc.counts, alloc.blocks
        notes.append(
            f"auto split: {counts.blocks} blocks, {counts.channels} channels and {counts.kv_groups} "
            "key-value groups per kept block"
        )
        if speed.get("fallback"):
            notes.append(f"speed target: {speed['fallback']}")
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
        restore(originals)
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
        speed=speed,
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
        scores.append(block_score(st))
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


def _choose_blocks(method: str, scores: list[dict[str, float]], count: int) -> list[int]:
    if count == 0:
        return []
    if method == "angular":
        starts = [i for i, s in enumerate(scores) if "angular_span" in s]
        best = min(starts, key=lambda i: (scores[i]["angular_span"], i))
        return list(range(best, best + count))
    key = "block_influence" if method == "block_influence" else "residual_error"
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i][key], i))[:count])


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
    heads = head_groups(model) if counts.kv_groups else None
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
