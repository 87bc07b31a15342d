"""Distillation from cached top-k teacher targets (no live teacher): loss, gradient and recover()."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import chain_windows, magnitude_prune, tiny_llama

from llmprune.errors import ConfigError
from llmprune.recovery import recover
from llmprune.recovery.losses import retraining_loss
from llmprune.recovery.teacher import topk_targets


def _reference(logits: torch.Tensor, ids: torch.Tensor, idx, p_top, rest, distill: float) -> torch.Tensor:
    """The (k + 1)-bucket KL written out in float64 with autograd, mixed with torch's cross-entropy."""
    log_q = F.log_softmax(logits.double(), dim=-1)  # (B, L, V)
    q_top = log_q.gather(-1, idx).exp()
    q_rest = 1.0 - q_top.sum(-1)
    p_top, rest = p_top.double(), rest.double()
    kl = (
        (torch.xlogy(p_top, p_top) - p_top * q_top.log()).sum(-1)
        + torch.xlogy(rest, rest)
        - rest * q_rest.log()
    )
    ce = F.cross_entropy(log_q[:, :-1].reshape(-1, log_q.shape[-1]), ids[:, 1:].reshape(-1))
    return distill * kl.mean() + (1 - distill) * ce


@pytest.mark.parametrize("distill", [1.0, 0.5])
def test_topk_loss_and_gradient_match_a_float64_reference(distill: float) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, k = 50, 5
    logits = torch.randn(2, 7, vocab, generator=gen) * 3
    teacher = torch.randn(2, 7, vocab, generator=gen) * 3
    ids = torch.randint(0, vocab, (2, 7), generator=gen)
    p = teacher.double().softmax(-1)
    top = p.topk(k, dim=-1)
    idx, p_top = top.indices, top.values.float()
    rest = (p.sum(-1) - top.values.sum(-1)).float()
    x = logits.clone().requires_grad_(True)
    got = retraining_loss(x, ids, (idx, p_top, rest), distill)
    got.backward()
    y = logits.clone().double().requires_grad_(True)
    want = _reference(y, ids, idx, p_top, rest, distill)
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-7)


def test_topk_over_the_whole_vocabulary_is_the_full_kl() -> None:
    gen = torch.Generator().manual_seed(1)
    logits, teacher = torch.randn(2, 6, 40, generator=gen), torch.randn(2, 6, 40, generator=gen)
    ids = torch.randint(0, 40, (2, 6), generator=gen)
    lp = F.log_softmax(teacher, -1)
    top = lp.topk(40, dim=-1)
    sparse = (top.indices, top.values.exp(), torch.zeros(2, 6))
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    la, lb = retraining_loss(a, ids, sparse, 1.0), retraining_loss(b, ids, teacher, 1.0)
    (la + lb).backward()
    assert float(la.detach()) == pytest.approx(float(lb.detach()), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-8)


def test_topk_targets_keep_the_rest_of_the_mass() -> None:
    model = tiny_llama()
    ids = chain_windows(4, 12)
    targets = topk_targets(model, ids, k=8, batch_size=3)
    assert targets.indices.shape == (4, 12, 8) and targets.rest.shape == (4, 12)
    with torch.no_grad():
        p = model(input_ids=ids).logits.double().softmax(-1)
    torch.testing.assert_close(targets.probs.double(), p.gather(-1, targets.indices), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        targets.rest.double(), 1.0 - p.gather(-1, targets.indices).sum(-1), rtol=1e-4, atol=1e-6
    )


def test_recover_from_cached_targets_without_a_dense_model() -> None:
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    keep = magnitude_prune(model)
    ids = chain_windows()
    targets = topk_targets(dense, ids, k=16)
    del dense  # nothing of the teacher is needed any more
    res = recover(model, input_ids=ids, teacher_targets=targets, steps=8, lr=1e-2, batch_size=4)
    assert res.options["distill"] == 1.0 and res.steps_done == 8  # distilled, with no dense model at hand
    for name, k in keep.items():
        w = model.get_submodule(name).weight
        assert bool((w[~k] == 0).all()) and bool((w[k] != 0).all())
    with pytest.raises(ConfigError, match="other windows"):
        recover(model, input_ids=chain_windows(seed=3), teacher_targets=targets, steps=1)


def test_teacher_top_k_on_a_live_dense_model_gives_the_same_as_cached_targets() -> None:
    dense = tiny_llama()
    runs = []
    for kwargs in (
        {"dense_model": dense, "teacher_top_k": 16},
        {"teacher_targets": topk_targets(dense, chain_windows(), 16)},
    ):
        model = copy.deepcopy(dense)
        magnitude_prune(model)
        # float32: the live path's teacher pass runs under the same autocast as training
        recover(model, input_ids=chain_windows(), steps=3, lr=1e-2, precision="float32", **kwargs)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1])
