"""Per-layer sparsity allocation: the math against hand computations and brute force, the statistics
pass against a dense forward, and the plumbing (API, recipe, sparsity.json)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import transformers
from conftest import make_model
from test_engine import _prune

from llmprune import allocation as alloc
from llmprune.calibration.modules import WeightView, find_blocks, prunable_linears
from llmprune.errors import ConfigError
from llmprune.io.save import load_keep_masks, save_pruned
from llmprune.recipe import recipe_from_yaml
from llmprune.spec import SparsitySpec


def _mean(values, sizes):
    return math.fsum(v * n for v, n in zip(values, sizes, strict=True)) / math.fsum(sizes)


# ---------------------------------------------------------------- OWL and depth


def _owl_reference(ratios, sparsity, lam):
    """The reference code's formula (luuyin/OWL, lib/prune_all.py), equal-size layers."""
    lo, hi = min(ratios), max(ratios)
    density = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(density) / len(density)
    return [1 - (d - mean + (1 - sparsity)) for d in density]


def test_owl_matches_the_reference_formula_on_symmetric_ratios():
    ratios = [0.01, 0.03, 0.02]  # block 1 has most outliers: it keeps most
    got = alloc.owl(ratios, [100, 100, 100], 0.5, 0.1)
    assert got == pytest.approx([0.6, 0.4, 0.5], abs=1e-12)
    assert got == pytest.approx(_owl_reference(ratios, 0.5, 0.1), abs=1e-12)


def test_owl_stays_within_lambda_where_the_reference_would_not():
    ratios = [0.0, 0.0, 0.0, 1.0]
    reference = _owl_reference(ratios, 0.7, 0.1)
    assert min(reference) == pytest.approx(0.55)  # s - 1.5 λ: outside the paper's stated range
    got = alloc.owl(ratios, [10] * 4, 0.7, 0.1)
    assert min(got) == pytest.approx(0.6) and max(got) <= 0.8
    assert _mean(got, [10] * 4) == pytest.approx(0.7, abs=1e-15)
    assert got[3] < got[0] == got[1] == got[2]


@pytest.mark.parametrize("seed", range(5))
def test_spread_keeps_the_exact_weighted_mean_and_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(12, generator=g).tolist()
    sizes = torch.randint(1, 10_000, (12,), generator=g).tolist()
    for lam in (0.0, 0.05, 0.2):
        out = alloc.spread(scores, sizes, 0.6, lam)
        assert abs(_mean(out, sizes) - 0.6) < 1e-14
        assert all(0.6 - lam - 1e-12 <= v <= 0.6 + lam + 1e-12 for v in out)
        order = sorted(range(12), key=lambda i: scores[i])  # monotone in the scores
        assert all(out[a] <= out[b] + 1e-15 for a, b in zip(order, order[1:], strict=False))


def test_depth_is_a_monotone_arithmetic_schedule():
    out = alloc.depth(5, [7] * 5, 0.7, 0.1)
    assert out == pytest.approx([0.6, 0.65, 0.7, 0.75, 0.8], abs=1e-12)
    uneven = alloc.depth(4, [1, 5, 2, 9], 0.5, 0.08)
    assert all(a < b for a, b in zip(uneven, uneven[1:], strict=False))
    assert abs(_mean(uneven, [1, 5, 2, 9]) - 0.5) < 1e-14


def test_outlier_ratio_by_hand():
    scores = [torch.tensor([[1.0, 1.0, 1.0, 10.0]]), torch.tensor([[1.0, 2.0]])]
    # mean 16/6, threshold 2 x 16/6 = 5.33: only the 10 is an outlier, 1 of 6
    assert alloc.outlier_ratio(scores, 2.0) == pytest.approx(1 / 6)
    assert alloc.outlier_ratio(scores, 0.5) == pytest.approx(2 / 6)  # threshold 1.33: the 10 and the 2


# ---------------------------------------------------------------- error allocation


def _interp(curve, x):
    for (x1, y1), (x2, y2) in zip(curve, curve[1:], strict=False):
        if x1 - 1e-12 <= x <= x2 + 1e-12:
            return y1 + (y2 - y1) * (x - x1) / (x2 - x1)
    raise ValueError(x)


def _brute_error_allocation(curves, sizes, sparsity):
    """Exact optimum of a separable convex piecewise-linear problem with one equality: some optimum has
    every layer but one at a breakpoint; enumerate them all."""
    best = math.inf
    for free in range(len(curves)):
        others = [i for i in range(len(curves)) if i != free]
        for points in itertools.product(*[[p[0] for p in curves[i]] for i in others]):
            rest = sparsity * sum(sizes) - sum(x * sizes[i] for x, i in zip(points, others, strict=True))
            x = rest / sizes[free]
            if not curves[free][0][0] - 1e-12 <= x <= curves[free][-1][0] + 1e-12:
                continue
            total = _interp(curves[free], x) + sum(
                _interp(curves[i], p) for p, i in zip(points, others, strict=True)
            )
            best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_error_allocation_reaches_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    trials = alloc.trial_sparsities(0.6, 0.1, 5)
    curves, sizes = [], [int(s) for s in torch.randint(10, 100, (4,), generator=g)]
    for _ in range(4):  # convex increasing errors of different curvatures
        a, b = float(torch.rand(1, generator=g)) + 0.1, float(torch.rand(1, generator=g)) * 5
        curves.append([(t, a * t + b * t * t) for t in trials])
    values = alloc.by_error(curves, sizes, 0.6)
    assert abs(_mean(values, sizes) - 0.6) < 1e-14
    assert all(0.5 - 1e-12 <= v <= 0.7 + 1e-12 for v in values)
    ours = sum(_interp(c, v) for c, v in zip(curves, values, strict=True))
    assert ours <= _brute_error_allocation(curves, sizes, 0.6) + 1e-9


def test_error_allocation_uses_the_convex_hull_of_a_bumpy_curve():
    bumpy = [(0.4, 0.0), (0.5, 5.0), (0.6, 6.0)]  # hull: straight from 0.4 to 0.6, slope 30
    straight = [(0.4, 0.0), (0.5, 3.2), (0.6, 6.4)]  # slope 32
    # optimum: bumpy all the way (6.0) rather than straight (6.4) or both half way (5 + 3.2)
    assert alloc.by_error([bumpy, straight], [1, 1], 0.5) == pytest.approx([0.6, 0.4])


# ---------------------------------------------------------------- options and targets


def test_options_are_split_between_solver_and_allocation():
    solver, options = alloc.split_options("owl", {"owl_lambda": 0.1, "block_size": 64})
    assert solver == {"block_size": 64} and options.owl_lambda == 0.1
    with pytest.raises(ConfigError, match="--allocation owl"):
        alloc.split_options("depth", {"owl_m": 7})
    with pytest.raises(ConfigError, match="did you mean"):
        alloc.check_allocation("owls")
    with pytest.raises(ConfigError, match="owl_lambda"):
        alloc.AllocationOptions(owl_lambda=0.7)
    with pytest.raises(ConfigError, match="N:M"):
        alloc.check_allocation_target("owl", alloc.AllocationOptions(), SparsitySpec.parse("2:4"))
    with pytest.raises(ConfigError, match="lower depth_lambda"):
        alloc.check_allocation_target("depth", alloc.AllocationOptions(depth_lambda=0.3), SparsitySpec(0.8))


# ---------------------------------------------------------------- the statistics pass in the engine


def _dense_outlier_ratios(model, ids, m):
    """OWL's ratios from one plain forward of the dense model with hooks on every block Linear."""
    prefix, blocks = find_blocks(model)
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        for rel, mod in prunable_linears(block).items():

            def hook(_m, inputs, _out, key=f"{i}.{rel}"):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sq[key] = sq.get(key, 0) + (x * x).sum(0)

            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for b in range(0, len(ids), 2):
            model(input_ids=ids[b : b + 2], use_cache=False)
    for h in handles:
        h.remove()
    tokens = ids.numel()
    ratios = {}
    for i, block in enumerate(blocks):
        scores = [
            WeightView(mod).read().double().abs() * (sq[f"{i}.{rel}"] / tokens).sqrt()
            for rel, mod in prunable_linears(block).items()
        ]
        ratios[f"{prefix}.{i}"] = alloc.outlier_ratio(scores, m)
    return ratios


def test_owl_pass_measures_the_dense_model_and_keeps_the_mean(token_ids):
    model = make_model("llama")
    expected = _dense_outlier_ratios(model, token_ids, 2.0)
    result = _prune(
        model, token_ids, method="wanda", sparsity=0.6, allocation="owl", owl_m=2.0, owl_lambda=0.1
    )
    got = result.allocation["outlier_ratio"]
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k] == pytest.approx(expected[k], abs=1e-6)
    targets = {n: float(r.target) for n, r in result.modules.items()}
    sizes = {n: r.shape[0] * r.shape[1] for n, r in result.modules.items()}
    assert abs(_mean(list(targets.values()), list(sizes.values())) - 0.6) < 1e-5  # targets print 6 digits
    assert len(set(targets.values())) == 2  # one sparsity per block
    assert result.overall_sparsity == pytest.approx(0.6, abs=1 / 64)  # Wanda rounds per row of 32/64
    for name, report in result.modules.items():
        assert report.sparsity == pytest.approx(result.allocation["sparsity"][name], abs=1 / report.shape[1])


def test_zero_spread_is_bitwise_the_uniform_run(token_ids):
    """The statistics pass must leave the model and the captured inputs as it found them."""
    uniform = make_model("llama")
    _prune(uniform, token_ids, method="sparsegpt", sparsity=0.5)
    for allocation, option in (("owl", "owl_lambda"), ("error", "error_lambda")):
        model = make_model("llama")
        _prune(model, token_ids, method="sparsegpt", sparsity=0.5, allocation=allocation, **{option: 0.0})
        for (name, a), b in zip(uniform.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b), (allocation, name)


def test_error_and_depth_allocations_through_the_api_and_sparsity_json(token_ids, tmp_path):
    for allocation in ("error", "depth"):
        model = make_model("llama")
        result = _prune(model, token_ids, method="sparsegpt", sparsity=0.6, allocation=allocation)
        chosen = result.allocation["sparsity"]
        sizes = [result.modules[n].shape[0] * result.modules[n].shape[1] for n in chosen]
        assert abs(_mean(list(chosen.values()), sizes) - 0.6) < 1e-12
        assert len(set(chosen.values())) > 1
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in result.modules.values())
        assert zeros == pytest.approx(0.6 * sum(sizes), abs=len(sizes))  # SparseGPT counts per matrix
    save_pruned(model, None, tmp_path / "out", result=result)
    report = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert report["allocation"]["allocation"] == "depth"
    assert report["allocation"]["sparsity"] == pytest.approx(result.allocation["sparsity"])


def test_bad_allocations_fail_before_any_work(token_ids):
    model = make_model("llama")
    with pytest.raises(ConfigError, match="N:M"):
        _prune(model, token_ids, sparsity="2:4", allocation="owl")
    with pytest.raises(ConfigError, match="--allocation owl"):
        _prune(model, token_ids, sparsity=0.5, owl_lambda=0.1)
    with pytest.raises(ConfigError, match="did you mean"):
        _prune(model, token_ids, sparsity=0.5, allocation="depht")


def test_recipe_carries_the_allocation():
    recipe = recipe_from_yaml("version: 1\nprune: {allocation: owl, options: {owl_lambda: 0.05}}\n")
    kwargs = recipe.prune_kwargs()
    assert kwargs["allocation"] == "owl" and kwargs["owl_lambda"] == 0.05
    with pytest.raises(ConfigError, match="allocation"):
        recipe_from_yaml("version: 1\nprune: {allocation: error, options: {owl_m: 3}}\n")


def test_streamed_allocation_equals_in_memory(token_ids, tmp_path):
    """The statistics pass reads streamed blocks from the shards too (a second read of the model)."""
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src, max_shard_size="20KB")
    kw = dict(method="wanda", sparsity=0.6, allocation="owl", owl_m=2.0, owl_lambda=0.1)
    reference = _prune(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), token_ids, **kw)
    streamed = _prune(str(src), token_ids, streaming=True, output_dir=str(tmp_path / "out"), **kw)
    assert streamed.allocation["sparsity"] == reference.allocation["sparsity"]
    masks = load_keep_masks(tmp_path / "out")
    assert all(torch.equal(masks[k], reference.keep_masks[k]) for k in reference.keep_masks)
