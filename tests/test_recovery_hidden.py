"""Intermediate distillation (``hidden_distill``): which blocks, what the dense pass keeps, the error
term, and that recovery with it trains towards the dense block outputs without losing a zero."""

from __future__ import annotations

import pytest
import torch
from helpers import chain_windows, magnitude_prune
from helpers import tiny_llama as llama

from llmprune.errors import ConfigError
from llmprune.recovery import recover
from llmprune.recovery.api import dense_targets
from llmprune.recovery.hidden import hidden_error, tapped_blocks
from llmprune.recovery.masking import block_linears, weight_2d
from llmprune.recovery.teacher import topk_targets


def test_tapped_blocks_count_down_from_the_last() -> None:
    assert tapped_blocks(30, 3) == (2, 5, 8, 11, 14, 17, 20, 23, 26, 29)
    assert tapped_blocks(2, 1) == (0, 1)
    assert tapped_blocks(5, 10) == (4,)
    with pytest.raises(ConfigError, match="hidden_stride"):
        tapped_blocks(30, 0)


def test_teacher_pass_keeps_the_block_outputs_transformers_reports() -> None:
    """Catches a hook on the wrong module (attention, norm), outputs of another batch, or blocks out of
    order: block 0's output is transformers' ``hidden_states[1]``; the last block's is the stream before
    the final norm (``hidden_states[-1]`` is after it)."""
    model = llama()
    ids = chain_windows()
    targets = topk_targets(model, ids, 8, batch_size=3, hidden_blocks=(0, 1))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert targets.hidden.shape == (8, 2, 24, 32) and targets.hidden.dtype == torch.bfloat16
        torch.testing.assert_close(targets.hidden[:, 0].float(), states[1], rtol=1e-2, atol=1e-3)
        normed = model.model.norm(targets.hidden[:, 1].float())
        torch.testing.assert_close(normed, states[2], rtol=2e-2, atol=2e-2)
    rows = torch.tensor([5, 1])
    assert torch.equal(targets.hidden_rows(rows), targets.hidden[rows])
    assert topk_targets(model, ids, 8).hidden is None  # nothing kept unless asked


def test_hidden_error_is_per_token_relative() -> None:
    """Closed form: a uniform 10 % error is 0.01 whatever the scale; a 10 % error on one ordinary token
    beside a token 1000x larger still counts 0.01 / L (a per-layer norm would make it ~1e-8)."""
    torch.manual_seed(0)
    t = torch.randn(2, 3, 5, 8)  # (B, T, L, H)
    outputs = [1.1 * t[:, i] for i in range(3)]
    assert float(hidden_error(outputs, t)) == pytest.approx(0.01, rel=1e-5)
    t = torch.ones(1, 1, 4, 8)
    t[0, 0, 0] *= 1000.0
    h = t[:, 0].clone()
    h[0, 2] *= 1.1
    assert float(hidden_error([h], t)) == pytest.approx(0.01 / 4, rel=1e-5)
    assert float(hidden_error([t[:, 0]], t)) == 0.0


def _block_error(model, dense, ids) -> float:
    ref = topk_targets(dense, ids, 4, hidden_blocks=(0, 1))
    own = topk_targets(model, ids, 4, hidden_blocks=(0, 1))
    return float(hidden_error([own.hidden[:, i].float() for i in range(2)], ref.hidden.float()))


def test_recovery_with_hidden_distill_moves_the_blocks_towards_the_dense_ones() -> None:
    """Catches a term that is computed but not trained on (no gradient), outputs of the teacher where the
    student's belong, or a lost zero: with a large weight the block outputs end closer to the dense
    ones than plain distillation brings them, and every pruned weight stays +0.0."""
    dense = llama()
    ids = chain_windows()
    errors = {}
    for weight in (0.0, 20.0):
        model = llama()
        keep = magnitude_prune(model, 0.7)
        settings = {"teacher_top_k": 8, "precision": "float32", "hidden_distill": weight, "hidden_stride": 1}
        targets = dense_targets(dense, ids, settings)
        before = _block_error(model, dense, ids)
        res = recover(
            model, input_ids=ids, teacher_targets=targets, steps=25, lr=1e-2, precision="float32",
            hidden_distill=weight, hidden_stride=1,
        )  # fmt: skip
        errors[weight] = _block_error(model, dense, ids)
        assert res.options["hidden_distill"] == weight
        assert res.options["hidden_blocks"] == ([0, 1] if weight else [])
        for name, m in block_linears(model).items():
            w = weight_2d(m)
            assert torch.equal(w != 0, keep[name])
            assert not torch.signbit(w[~keep[name]]).any()
    assert errors[20.0] < 0.8 * errors[0.0] and errors[20.0] < before, (before, errors)


def test_live_teacher_gives_the_same_first_loss_as_cached_targets() -> None:
    """The live-teacher path (``teacher_top_k=None``) reads the same dense block outputs as the cached
    ones: same first loss with the full vocabulary kept (k = V)."""
    dense = llama()
    ids = chain_windows()
    first = []
    for cached in (True, False):
        model = llama()
        magnitude_prune(model)
        kwargs = {"teacher_top_k": None, "dense_model": dense}
        if cached:
            settings = {
                "teacher_top_k": dense.config.vocab_size,
                "precision": "float32",
                "hidden_distill": 1.0,
            }
            kwargs = {"teacher_targets": dense_targets(dense, ids, settings)}
        res = recover(model, input_ids=ids, steps=1, precision="float32", hidden_distill=1.0, **kwargs)
        first.append(res.first_loss)
    assert first[0] == pytest.approx(first[1], rel=1e-2)


def test_bad_hidden_settings_fail_before_work() -> None:
    model = llama()
    magnitude_prune(model)
    before = [p.detach().clone() for p in model.parameters()]
    ids = chain_windows()
    with pytest.raises(ConfigError, match="hidden_distill=1.0 needs dense_model"):
        recover(model, input_ids=ids, steps=1, hidden_distill=1.0)
    plain = topk_targets(llama(), ids, 4)  # no block outputs kept
    with pytest.raises(ConfigError, match="same hidden settings"):
        recover(model, input_ids=ids, steps=1, teacher_targets=plain, hidden_distill=1.0)
    with pytest.raises(ConfigError, match="hidden_distill must be >= 0"):
        recover(model, input_ids=ids, steps=1, teacher_targets=plain, hidden_distill=-1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
