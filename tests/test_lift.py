"""LIFT: principal weights vs an SVD reference, sparse AdamW vs torch's AdamW, zeros kept throughout."""

from __future__ import annotations

import pytest
import torch
from helpers import chain_windows, lm_loss, magnitude_prune
from helpers import tiny_gpt2 as gpt2
from helpers import tiny_llama as llama

from llmprune.errors import ConfigError
from llmprune.recovery import recover
from llmprune.recovery.lift import LiftOptions, LiftSession, SparseAdamW, principal_indices
from llmprune.recovery.masking import resolve_targets, weight_2d
from llmprune.recovery.train import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_selection(w: torch.Tensor, keep: torch.Tensor, rank: int, k: int) -> set[int]:
    """Full float64 SVD, rank-r sum of outer products, then the k largest |W_r| among kept entries."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=True)
    w_r = sum(s[i] * torch.outer(u[:, i], vh[i]) for i in range(rank))
    kept = [(abs(float(w_r.flatten()[j])), j) for j in range(w.numel()) if bool(keep.flatten()[j])]
    return {j for _, j in sorted(kept, reverse=True)[:k]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_principal_weights_match_a_full_svd_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 10, generator=gen)
    keep = torch.rand(12, 10, generator=gen) > 0.5
    w = w.masked_fill(~keep, 0.0)
    got = principal_indices(w, keep, rank=3, k=15, svd="exact")
    assert got.tolist() == sorted(got.tolist())
    assert set(got.tolist()) == reference_selection(w, keep, 3, 15)
    assert bool(keep.flatten()[got].all())


def test_lowrank_svd_and_transposed_layout_select_the_same_entries() -> None:
    gen = torch.Generator().manual_seed(0)
    # exactly rank 6, so svd_lowrank with q = 2·rank = 6 finds the exact subspace
    w = torch.randn(40, 6, generator=gen) @ torch.randn(6, 30, generator=gen)
    keep = torch.rand(40, 30, generator=gen) > 0.3
    exact = principal_indices(w, keep, rank=3, k=50, svd="exact")
    torch.manual_seed(0)
    lowrank = principal_indices(w, keep, rank=3, k=50, svd="lowrank")
    assert set(lowrank.tolist()) == set(exact.tolist())
    # Conv1D stores (in, out): selecting on the transpose picks the transposed entries
    rows, cols = exact // 30, exact % 30
    transposed = principal_indices(w.t().contiguous(), keep.t(), rank=3, k=50, svd="exact")
    assert set(transposed.tolist()) == set((cols * 40 + rows).tolist())


def test_k_never_exceeds_the_kept_entries_and_density_option() -> None:
    assert LiftOptions(rank=4).budget((10, 6), kept=100) == 64
    assert LiftOptions(rank=4).budget((10, 6), kept=30) == 30
    assert LiftOptions(rank=4, budget_rank=1).budget((10, 6), kept=100) == 16
    assert LiftOptions(density=0.05).budget((100, 100), kept=5000) == 250


def test_sparse_adamw_equals_torch_adamw_on_the_selected_entries() -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 6, generator=gen)
    index = torch.tensor([1, 5, 7, 20, 33, 47])
    mine = torch.nn.Parameter(w0.clone())
    ref = torch.nn.Parameter(w0.clone())
    opt = SparseAdamW([(mine, index)], lr=0.05, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(8, 6, generator=gen)
        mine.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(mine.detach().view(-1)[index], ref.detach().view(-1)[index])
    untouched = torch.ones(48, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(mine.detach().view(-1)[untouched], w0.view(-1)[untouched])
    assert opt.state_numel(mine) == 2 * len(index)


def test_weight_decay_really_applies() -> None:
    p = torch.nn.Parameter(torch.full((2, 3), 2.0))
    opt = SparseAdamW([(p, torch.tensor([0, 4]))], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(2, 3)  # no gradient: only the decay moves the weights
    opt.step()
    want = torch.full((2, 3), 2.0)
    want.view(-1)[[0, 4]] = 2.0 * (1 - 0.1 * 0.5)
    assert torch.equal(p.detach(), want)


def test_refresh_carries_moments_of_entries_in_both_selections() -> None:
    p = torch.nn.Parameter(torch.zeros(10))
    opt = SparseAdamW([(p, torch.tensor([1, 3, 5]))])
    opt.state[p]["exp_avg"] = torch.tensor([10.0, 30.0, 50.0])
    opt.state[p]["exp_avg_sq"] = torch.tensor([1.0, 3.0, 5.0])
    opt.set_indices(p, torch.tensor([5, 4, 3, 9]))
    assert opt.state[p]["index"].tolist() == [3, 4, 5, 9]
    assert opt.state[p]["exp_avg"].tolist() == [30.0, 0.0, 50.0, 0.0]
    assert opt.state[p]["exp_avg_sq"].tolist() == [3.0, 0.0, 5.0, 0.0]
    assert opt.state_numel(p) == 8


def test_only_selected_entries_change_and_state_is_2k() -> None:
    model = llama()
    magnitude_prune(model)
    targets = resolve_targets(model, None)
    before = {n: m.weight.detach().clone() for n, (m, _) in targets.items()}
    session = LiftSession(model, targets, LiftOptions(rank=2, update_interval=1000))
    session.attach()
    opt = session.optimizer(session.parameters(), TrainSettings(lr=1e-2))
    ids = chain_windows()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    session.finish()
    for name, (module, keep) in targets.items():
        m, n = module.weight.shape
        k = min((m + n) * 2, int(keep.sum()))
        index = session.indices[name]
        assert index.numel() == k
        assert opt.state_numel(module.weight) == 2 * k
        changed = (module.weight.detach() != before[name]).view(-1).nonzero().flatten()
        assert len(changed) > 0
        assert set(changed.tolist()) <= set(index.tolist()), name
    assert session.trainable_count() == sum(i.numel() for i in session.indices.values())
    assert not any(p.requires_grad is False for p in model.parameters())  # restored


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zeros_survive_every_step_and_every_refresh(arch: str) -> None:
    model = llama() if arch == "llama" else gpt2()
    keep = magnitude_prune(model)
    modules = dict(model.named_modules())
    seen = []

    def check(step: int, m) -> None:
        for name, k in keep.items():
            w = weight_2d(modules[name]).detach()
            assert torch.equal(w != 0, k), (step, name)
        seen.append(step)

    res = recover(
        model, method="lift", input_ids=chain_windows(), steps=8, lr=1e-2, update_interval=2, callback=check
    )
    assert seen == list(range(8))
    assert res.details["refreshes"] == 4


def test_lift_lowers_the_loss_and_counts_k_as_trainable() -> None:
    model = llama()
    magnitude_prune(model)
    ids = chain_windows()
    before = lm_loss(model, ids)
    total = sum(p.numel() for p in model.parameters())
    res = recover(model, method="lift", input_ids=ids, steps=25, lr=1e-2, rank=4, update_interval=10)
    assert lm_loss(model, ids) < before - 0.2
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)]  # (out, in), half kept
    want = 2 * sum(min((o + i) * 4, (o * i) // 2) for o, i in shapes)
    assert res.trainable_params == want
    assert res.trainable_fraction == pytest.approx(want / total)


def test_deterministic_for_a_seed() -> None:
    runs = []
    for _ in range(2):
        model = llama()
        magnitude_prune(model)
        recover(
            model,
            method="lift",
            input_ids=chain_windows(),
            steps=5,
            lr=1e-2,
            update_interval=2,
            svd="lowrank",
        )
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_lift_option_errors() -> None:
    model = llama()
    magnitude_prune(model)
    with pytest.raises(ConfigError, match="own sparse AdamW"):
        recover(model, method="lift", input_ids=chain_windows(), optim="adamw_8bit", steps=1)
    with pytest.raises(ConfigError, match="did you mean 'update_interval'"):
        recover(model, method="lift", input_ids=chain_windows(), update_intervall=3)
    with pytest.raises(ConfigError, match="svd"):
        LiftOptions(svd="fast")
