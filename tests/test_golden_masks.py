"""Hand-computed masks for magnitude and Wanda on tiny tensors (torchao-style golden tests)."""

from __future__ import annotations

import pytest
import torch

from llmprune.errors import ConfigError
from llmprune.registry import get_solver
from llmprune.solvers.magnitude import global_allocation
from llmprune.solvers.types import LayerProblem, LayerStats
from llmprune.spec import SparsitySpec

T, F = True, False


def _problem(weight, spec, x=None):
    x = torch.ones(3, weight.shape[1]) if x is None else x
    return LayerProblem(
        "layer", weight, LayerStats.from_inputs(x, {"sq_norms", "hessian"}), SparsitySpec.parse(spec)
    )


def test_magnitude_per_matrix_golden():
    w = torch.arange(1.0, 9.0).reshape(2, 4)  # [[1,2,3,4],[5,6,7,8]]
    keep = get_solver("magnitude")(_problem(w, 0.5)).keep
    assert keep.tolist() == [[F, F, F, F], [T, T, T, T]]  # one threshold for the whole matrix
    keep = get_solver("magnitude")(_problem(-w, "2:4")).keep  # sign does not matter
    assert keep.tolist() == [[F, F, T, T], [F, F, T, T]]
    keep = get_solver("magnitude")(_problem(torch.tensor([[4.0, -1, 3, 2, 0.5, 9, -8, 7]]), "1:4")).keep
    assert keep.tolist() == [[T, F, F, F, F, T, F, F]]


def test_wanda_golden_uses_input_norms_per_row():
    w = torch.tensor([[1.0, 2, 3, 4], [4, 3, 2, 1]])
    x = torch.tensor([[4.0, 1, 1, 1]])  # ||x_j|| = [4,1,1,1]
    # scores: row0 [4,2,3,4] -> keep cols 0,3; row1 [16,3,2,1] -> keep cols 0,1
    keep = get_solver("wanda")(_problem(w, 0.5, x)).keep
    assert keep.tolist() == [[T, F, F, T], [T, T, F, F]]
    keep = get_solver("wanda")(_problem(w, "3:4", x)).keep
    assert keep.tolist() == [[T, F, T, T], [T, T, T, F]]


def test_wanda_differs_from_magnitude_only_through_norms():
    w = torch.tensor([[1.0, 2, 3, 4]])
    assert get_solver("wanda")(_problem(w, 0.5)).keep.tolist() == [[F, F, T, T]]  # equal norms
    x = torch.tensor([[10.0, 10, 1, 1]])
    assert get_solver("wanda")(_problem(w, 0.5, x)).keep.tolist() == [[T, T, F, F]]


def test_global_magnitude_allocation_golden():
    weights = {"a": torch.tensor([0.1, 0.2, 0.3, 0.4]), "b": torch.tensor([1.0, 2, 3, 4])}
    spec = SparsitySpec.parse(0.5)  # prune 4 of 8
    # no floor: all of layer a would go, but one weight of every layer survives; 50 % keeps two of a
    assert global_allocation(weights, spec, scope="global", min_density=0.0) == {"a": 0.75, "b": 0.25}
    assert global_allocation(weights, spec, scope="global", min_density=0.5) == {"a": 0.5, "b": 0.5}
    assert global_allocation(weights, spec, scope="global", min_density=0.25) == {"a": 0.75, "b": 0.25}
    assert global_allocation(weights, spec, scope="layer") == {}


def test_global_magnitude_ties_at_the_threshold_meet_the_target_exactly():
    """Before: every weight tied at the threshold was pruned, overshooting the target."""
    weights = {"a": torch.ones(8), "b": torch.ones(8)}
    allocation = global_allocation(weights, SparsitySpec.parse(0.25), scope="global", min_density=0.0)
    assert sum(allocation[k] * 8 for k in allocation) == 4  # 25 % of 16
    assert allocation == {"a": 0.5, "b": 0.0}  # ties go to the layers in name order


def test_global_magnitude_refuses_what_it_cannot_do():
    weights = {"a": torch.ones(8)}
    with pytest.raises(ConfigError, match="N:M"):  # before: silently per-group, as if scope=layer
        global_allocation(weights, SparsitySpec.parse("2:4"), scope="global")
    with pytest.raises(ConfigError, match="min_density must be a number"):  # before: raw TypeError
        global_allocation(weights, SparsitySpec.parse(0.5), scope="global", min_density="0.1")


def test_global_magnitude_without_a_floor_runs(token_ids):
    """Before: min_density=0 gave a layer 100 % and the run failed on that spec with a wrong message."""
    from conftest import make_model

    import llmprune

    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e-6)
    result = llmprune.prune(model, method="magnitude", sparsity=0.5, scope="global", min_density=0.0)
    down = model.model.layers[0].mlp.down_proj.weight
    assert int((down != 0).sum()) >= 1 and result.overall_sparsity == pytest.approx(0.5, abs=1e-4)


def test_global_magnitude_end_to_end(token_ids):
    from conftest import make_model

    import llmprune

    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e-3)  # tiny weights: global pruning hits them first
    result = llmprune.prune(
        model,
        None,
        method="magnitude",
        sparsity=0.5,
        scope="global",
        min_density=0.1,
        dataset=token_ids,
        num_calibration_samples=6,
        max_seq_length=24,
        progress=False,
    )
    assert abs(result.overall_sparsity - 0.5) < 1e-3
    assert result.modules["model.layers.0.mlp.down_proj"].sparsity == pytest.approx(
        0.9, abs=1 / 2048
    )  # floor
    assert result.modules["model.layers.1.mlp.down_proj"].sparsity < 0.5


def test_magnitude_needs_no_data_and_runs_no_forward():
    from conftest import make_model

    import llmprune

    model = make_model("llama")
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    result = llmprune.prune(model, None, method="magnitude", sparsity="2:4", progress=False)  # no dataset
    assert calls == [] and result.overall_sparsity == 0.5 and result.calibration_hash == ""


@pytest.mark.parametrize("shape", [(5, 16), (3, 4, 4), (1, 1000)])
def test_selection_breaks_ties_like_a_stable_sort(shape):
    """The linear-time selection must prune exactly what a stable ascending sort would."""
    from llmprune.solvers.masks import keep_all_but_lowest

    gen = torch.Generator().manual_seed(0)
    for count in range(0, shape[-1] + 1, max(1, shape[-1] // 7)):
        scores = torch.randint(0, 4, shape, generator=gen).float()  # many ties
        expected = torch.ones_like(scores, dtype=torch.bool)
        if count:
            expected.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[..., :count], False)
        assert torch.equal(keep_all_but_lowest(scores, count), expected)
