"""``--structure auto`` checks each structure alone, and on small models every split, by calibration loss."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import ARCHITECTURES

from llmprune.errors import ConfigError
from llmprune.structured import auto
from llmprune.structured.arch import layout_of
from llmprune.structured.pipeline import model_costs, prune_structured
from llmprune.structured.plan import allocate

pytestmark = pytest.mark.usefixtures("one_thread")


def llama(blocks: int):
    cls, kwargs = ARCHITECTURES["llama"]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**kwargs, "num_hidden_layers": blocks})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def shrink(model, ids, **kwargs):
    n, length = ids.shape
    return prune_structured(
        model, None, structure="auto", dataset=ids, num_calibration_samples=n, max_seq_length=length,
        progress=False, **kwargs,
    )  # fmt: skip


def feasible_splits(model, fraction: float) -> set[tuple[int, int]]:
    """Every (dropped blocks, removed KV groups) that some channel count completes to ``fraction``
    (which blocks are dropped does not change feasibility, so flat error curves do)."""
    c = model_costs(model, layout_of(model))
    zeros = [0.0] * c.num_blocks
    flat_w, flat_h = [[0.0] * (c.width + 1)] * c.num_blocks, [[0.0] * (c.kv_heads + 1)] * c.num_blocks
    out = set()
    for d in range(c.num_blocks):
        for g in range(c.kv_heads):
            try:
                a = allocate(fraction, c, zeros, flat_w, flat_h, 8, blocks=d, groups=g)
            except ConfigError:
                continue
            out.add((a.counts.blocks, a.counts.kv_groups))
    return out


def test_small_models_check_every_split_and_keep_the_lowest_loss() -> None:
    model = llama(3)  # 3 blocks x 2 key-value groups: 6 splits, all checked
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    result = shrink(model, ids, sparsity=0.3, min_decode_speedup=0)
    tried = {(r["blocks"], r["kv_groups"]) for r in result.search}
    assert tried == feasible_splits(model, 0.3)
    assert (0, 0) in tried and any(d > 0 and g == 0 for d, g in tried)  # width alone, depth alone
    best = min(result.search, key=lambda r: (r["loss"], r["blocks"]))
    assert result.counts == {k: best[k] for k in ("blocks", "channels", "kv_groups")}


def test_larger_models_still_check_width_alone_and_depth_alone(monkeypatch) -> None:
    """With the coordinate search, a proxy that always likes removing heads must not hide the single
    structures: width alone and depth alone are checked whatever the proxy proposes."""
    real = auto.allocate

    def proxy_likes_heads(*args, blocks=None, groups=None):
        return real(*args, blocks=blocks, groups=1 if groups is None else groups)

    def loss_favours_one_block(model, layout, alloc, *rest) -> float:
        return abs(alloc.counts.blocks - 1) + 0.1 * alloc.counts.kv_groups

    monkeypatch.setattr(auto, "EXHAUSTIVE", 0)
    monkeypatch.setattr(auto, "allocate", proxy_likes_heads)
    monkeypatch.setattr(auto, "_candidate_loss", loss_favours_one_block)
    model = llama(6)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    result = shrink(model, ids, sparsity=0.3, min_decode_speedup=0)
    tried = {(r["blocks"], r["kv_groups"]) for r in result.search}
    full = 2  # depth alone: round(0.3 * 6) blocks
    assert (0, 0) in tried and (full, 0) in tried
    assert result.counts["blocks"] == 1 and result.counts["kv_groups"] == 0  # the fake loss's optimum


def test_the_angular_span_is_a_candidate(monkeypatch) -> None:
    """Depth alone is also tried as Gromov et al.'s span, the one ``--structure depth --method angular``
    drops on the same windows (the statistics windows: auto holds the last quarter out)."""
    from llmprune.structured.pipeline import _choose_blocks, _depth_scores

    monkeypatch.setattr(auto, "EXHAUSTIVE", 0)
    model = llama(6)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    result = shrink(model, ids, sparsity=0.3, min_decode_speedup=0)
    full = 2  # round(0.3 * 6) blocks
    expected = _choose_blocks("angular", _depth_scores(model, ids[:6], full, 8, True, False), full)
    spans = [r["dropped"] for r in result.search if r["blocks"] == full and r["kv_groups"] == 0]
    assert expected in spans
