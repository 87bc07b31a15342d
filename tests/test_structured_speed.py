"""Auto's speed target: the time model, its measurement, and the rule that picks a fast-enough split.

No timing is asserted: the measured constants are replaced by known ones wherever a choice depends on
them, and the measurement itself is only checked for what it builds and what it leaves untouched.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import ARCHITECTURES

from llmprune.errors import ConfigError
from llmprune.structured import auto, timing
from llmprune.structured.arch import layout_of
from llmprune.structured.pipeline import _block_params, model_costs, prune_structured
from llmprune.structured.plan import Costs, Counts
from llmprune.structured.settings import check_settings
from llmprune.structured.speedmodel import StepTime, TimeModel, choose, fit_step_time

pytestmark = pytest.mark.usefixtures("one_thread")

COSTS = Costs(num_blocks=30, block=3_540_000, channel=1728, group=331_776, width=1536, kv_heads=3)


def llama(blocks: int):
    cls, kwargs = ARCHITECTURES["llama"]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**kwargs, "num_hidden_layers": blocks})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_fit_solves_the_three_timings_exactly() -> None:
    """The constants are the solution of the 3x3 system the three timed shapes make (torch.linalg.solve
    as the reference): catches a wrong denominator, e.g. dividing the narrow-vs-half difference by all
    blocks instead of the kept ones, or forgetting that a channel weighs ``channel`` parameters."""
    c, dropped, channels = COSTS, 15, 1344
    truth = torch.tensor([4e-3, 6e-4, 2.5e-10], dtype=torch.float64)  # other, fixed, per_param
    kept = c.num_blocks - dropped
    system = torch.tensor(
        [
            [1.0, c.num_blocks, c.num_blocks * c.block],
            [1.0, kept, kept * c.block],
            [1.0, kept, kept * (c.block - channels * c.channel)],
        ],
        dtype=torch.float64,
    )
    times = system @ truth
    fit = fit_step_time(*map(float, times), c, dropped, channels)
    reference = torch.linalg.solve(system, times)
    assert [fit.other, fit.fixed, fit.per_param] == pytest.approx(reference.tolist(), rel=1e-9)
    # and the prediction of a shape not timed is the formula's
    counts = Counts(blocks=6, channels=264, kv_groups=1)
    n = c.num_blocks - 6
    by_hand = truth[0] + n * (truth[1] + truth[2] * (c.block - 264 * c.channel - c.group))
    assert fit.seconds(counts, c) == pytest.approx(float(by_hand), rel=1e-9)


def test_noisy_timings_are_clamped_not_negative() -> None:
    """A busy machine can time the smaller model slower: the constants stay >= 0 (a negative per-weight
    cost would make removing more weights look slower and invert the choice)."""
    fit = fit_step_time(1.0, 1.05, 1.1, COSTS, 15, 1344)
    assert fit.other >= 0 and fit.fixed >= 0 and fit.per_param >= 0
    assert fit.speedup(Counts(), COSTS) == pytest.approx(1.0)


def test_a_fixed_block_cost_makes_depth_faster_than_width_at_equal_size() -> None:
    """The reason for the model: with a per-block fixed cost, dropping 9 of 30 blocks is predicted faster
    than removing the same parameters as channels; with no fixed cost and nothing outside the blocks the
    two are equal. Catches a model that only counts parameters (which made auto pick width alone)."""
    c = Costs(num_blocks=30, block=1000, channel=1, group=100, width=1000, kv_heads=3)
    depth, width = Counts(blocks=9), Counts(channels=300)
    assert depth.removed(c) == width.removed(c)
    with_fixed = StepTime(other=1e-3, fixed=5e-4, per_param=1e-6)
    assert with_fixed.speedup(depth, c) > with_fixed.speedup(width, c) > 1.0
    params_only = StepTime(other=0.0, fixed=0.0, per_param=1e-6)
    assert params_only.speedup(depth, c) == pytest.approx(params_only.speedup(width, c))
    assert params_only.speedup(depth, c) == pytest.approx(1 / 0.7)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_weights_the_model_counts_are_the_rebuilt_blocks(arch) -> None:
    """P(k, g) of the time model is the parameter count of a kept block of the rebuilt model: catches
    per-weight time charged to the wrong size (biases, or the key/value rows of a removed group)."""
    from conftest import make_model

    from llmprune.structured.surgery import Removal, rebuild

    model = make_model(arch)
    layout = layout_of(model)
    c = model_costs(model, layout)
    g = 1 if arch != "gpt2" else 0
    kept = range(1, c.num_blocks)
    removal = Removal(
        blocks=[0],
        channels={i: [0, 5, 9] for i in kept},
        kv_groups={i: [1] for i in kept} if g else {},
    )
    small = rebuild(model, removal)
    one_param = StepTime(other=0.0, fixed=0.0, per_param=1.0)
    assert one_param.seconds(Counts(1, 3, g), c) == _block_params(small)


def test_choose_keeps_the_lowest_loss_that_is_fast_enough() -> None:
    search = [
        {"blocks": 0, "channels": 616, "kv_groups": 0, "loss": 4.67, "decode_speedup": 1.08},
        {"blocks": 6, "channels": 264, "kv_groups": 0, "loss": 4.85, "decode_speedup": 1.27},
        {"blocks": 9, "channels": 0, "kv_groups": 0, "loss": 5.45, "decode_speedup": 1.36},
    ]
    best, note = choose(search, 1.25)
    assert best["blocks"] == 6 and note is None  # not width alone (too slow), not depth (worse loss)
    best, note = choose(search, None)
    assert best["blocks"] == 0 and note is None  # no target: the loss alone
    assert choose(search, 0)[0]["blocks"] == 0
    best, note = choose(search, 2.0)  # unreachable: the lowest loss, and the record says so
    assert best["blocks"] == 0 and "1.36x" in note and "min_decode_speedup" in note
    tie = [dict(search[2], loss=4.0), dict(search[1], loss=4.0)]
    assert choose(tie, 1.25)[0]["blocks"] == 6  # equal loss: fewer dropped blocks


def test_measurement_builds_half_and_narrow_copies_and_leaves_the_model_alone() -> None:
    """What the three timings are of (the fit's equations assume these shapes) and that timing them
    changes nothing: catches variants of the wrong shape and a measurement that edits the input."""
    model = llama(4)
    c = model_costs(model, layout_of(model))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    dropped, channels, variants = timing.shape_variants(model, c)
    assert dropped == 2 and channels == c.width // 2
    assert variants["half"].config.num_hidden_layers == 2
    assert variants["narrow"].config.intermediate_size == c.width - c.width // 2
    model.train()
    tm = timing.measure_time_model(model, c, new_tokens=2, prefill_length=8, repeats=1)
    assert model.training  # the mode is put back
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    assert min(tm.decode.other, tm.decode.fixed, tm.decode.per_param) >= 0
    assert set(tm.measured["seconds_per_step"]["decode"]) == {"dense", "half", "narrow"}
    assert tm.predict(Counts(), c) == {"decode": pytest.approx(1.0), "prefill": pytest.approx(1.0)}


def _fake_time_model(monkeypatch, calls: list[int]) -> None:
    """Depth is fast, width barely helps: decode speed-up 1 + 0.1 per dropped block (of 6)."""
    step = StepTime(other=0.0, fixed=1.0, per_param=0.0)  # all time is per-block fixed cost

    def fake(model, c, **_):
        calls.append(1)
        return TimeModel(decode=step, prefill=step, measured={"fake": True})

    monkeypatch.setattr(auto, "measure_time_model", fake)


def _shrink(model, **kwargs):
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    return prune_structured(
        model, None, structure="auto", sparsity=0.3, dataset=ids, num_calibration_samples=8,
        max_seq_length=16, progress=False, **kwargs,
    )  # fmt: skip


def test_auto_meets_the_speed_target_with_the_lowest_loss(monkeypatch) -> None:
    """A loss that prefers width alone and a time model where only dropped blocks speed decoding up: auto
    must propose the least depth that reaches the target (its coordinate search would otherwise never
    leave width alone, the SmolLM2 failure) and keep the best loss among fast-enough splits."""
    calls: list[int] = []
    _fake_time_model(monkeypatch, calls)
    monkeypatch.setattr(auto, "EXHAUSTIVE", 0)

    def loss_prefers_width(model, layout, alloc, *rest) -> float:
        return alloc.counts.blocks + 0.5 * alloc.counts.kv_groups

    monkeypatch.setattr(auto, "_candidate_loss", loss_prefers_width)
    model = llama(6)
    result = _shrink(model, min_decode_speedup=1.19)  # one dropped block of 6: 1.2x
    assert calls == [1]
    assert all("decode_speedup" in r for r in result.search)
    fast = [r for r in result.search if r["decode_speedup"] >= 1.19]
    assert fast and result.counts["blocks"] == 1  # the least depth reaching 1.2x, lowest loss among those
    chosen_loss = result.counts["blocks"] + 0.5 * result.counts["kv_groups"]
    assert min(r["loss"] for r in fast) == pytest.approx(chosen_loss)
    assert result.speed["met"] and result.speed["predicted"]["decode"] == pytest.approx(1.2)
    assert result.speed["time_model"]["measured"] == {"fake": True}
    doc = result.to_dict()
    assert doc["speed"]["min_decode_speedup"] == 1.19

    calls.clear()
    off = _shrink(llama(6), min_decode_speedup=0)
    assert calls == [] and off.counts["blocks"] == 0  # no target: not measured, the loss alone

    high = _shrink(llama(6), min_decode_speedup=10)  # unreachable
    assert high.counts["blocks"] == 0 and not high.speed["met"]
    assert "no candidate" in high.speed["fallback"] and any("speed target" in n for n in high.notes)


@pytest.mark.parametrize("value", ["fast", True, -1])
def test_bad_speed_targets_are_refused(value) -> None:
    with pytest.raises(ConfigError, match="min_decode_speedup"):
        check_settings("auto", None, 0.3, {"min_decode_speedup": value})
