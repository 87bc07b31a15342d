"""Recovery's memory and speed levers: bf16 autocast, block checkpointing, teacher targets paid from the
budget, and targets computed before pruning instead of a dense copy (``llmprune prune --recover``)."""

from __future__ import annotations

import pytest
import torch
from helpers import chain_windows, lm_loss, magnitude_prune
from helpers import tiny_gpt2 as gpt2
from helpers import tiny_llama as llama

from llmprune.errors import ConfigError
from llmprune.recovery import recover
from llmprune.recovery.api import dense_targets
from llmprune.recovery.checkpointing import checkpointed_blocks
from llmprune.recovery.losses import retraining_loss
from llmprune.recovery.masking import block_linears, decoder_blocks, weight_2d
from llmprune.recovery.precision import native_bf16, resolve_precision
from llmprune.recovery.teacher import topk_targets

needs_bf16 = pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="no native bf16 on this CPU")


@needs_bf16
@pytest.mark.parametrize("method", ["perp", "lift"])
def test_bf16_training_follows_fp32_and_keeps_every_zero(method: str) -> None:
    """Catches training a stale bf16 copy of the adapters (one autocast context around the whole loop
    caches the casts of trained leaves: the loss then never moves), a loss rounded to bf16, and any
    pruned weight or mask bit that the bf16 path loses."""
    runs = {}
    for precision in ("float32", "bfloat16"):
        model = llama()
        keep = magnitude_prune(model)
        ids = chain_windows()
        before = lm_loss(model, ids)
        res = recover(model, input_ids=ids, method=method, steps=20, lr=1e-2, precision=precision)
        assert res.options["precision"] == precision
        runs[precision] = (res.losses, lm_loss(model, ids))
        for name, m in block_linears(model).items():
            w = weight_2d(m)
            assert torch.equal(w != 0, keep[name])  # no kept weight lost, no pruned one revived
            assert not torch.signbit(w[~keep[name]]).any()  # +0.0, not -0.0
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    assert bf16[1] < before - 0.5, (before, bf16[1])  # it trains
    assert abs(bf16[1] - fp32[1]) < 0.15 * fp32[1], (fp32[1], bf16[1])
    assert fp32[0][0] == pytest.approx(bf16[0][0], rel=2e-2)
    assert bf16[0][1] != bf16[0][2] or bf16[0][2] != bf16[0][3]  # a float32 loss, not a bf16 staircase


@pytest.mark.parametrize("make", [llama, gpt2])
def test_block_checkpointing_gives_the_same_loss_and_gradients_and_unwraps(make) -> None:
    """Catches a wrapper that drops or changes a block argument (positions, mask, rotary embeddings),
    recomputes differently, or stays installed after the run."""
    grads = []
    for enabled in (False, True):
        model = make()
        ids = chain_windows(4, 16)
        for p in model.parameters():
            p.requires_grad_(True)
        with checkpointed_blocks(model, enabled):
            loss = retraining_loss(model(input_ids=ids, use_cache=False).logits, ids)
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert all("forward" not in block.__dict__ for _, block in decoder_blocks(model))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpointed_recovery_equals_plain_recovery() -> None:
    """The whole loop with and without checkpointing: same losses, same merged weights (float32)."""
    out = []
    for enabled in (False, True):
        model = llama()
        magnitude_prune(model)
        res = recover(
            model, input_ids=chain_windows(), steps=5, lr=1e-2, precision="float32",
            gradient_checkpointing=enabled,
        )  # fmt: skip
        out.append((res.losses, [m.weight.detach().clone() for m in block_linears(model).values()]))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_teacher_pass_is_paid_from_the_time_budget() -> None:
    """Catches a budget that leaves the teacher pass out (a 10-minute run that takes 10 minutes plus the
    pass) and a dense copy that is still run at each step after the targets exist."""
    dense = llama()
    ids = chain_windows()
    targets = topk_targets(dense, ids, 8)
    targets.seconds = 30.0  # as if the pass had taken 30 s of a 100 s budget
    model = llama()
    magnitude_prune(model)
    res = recover(model, input_ids=ids, teacher_targets=targets, steps=3, max_seconds=100.0)
    assert res.options["max_seconds"] == pytest.approx(70.0)
    assert res.details["teacher_seconds"] == 30.0 and res.options["teacher_top_k"] == 8

    calls = []
    hook = dense.register_forward_hook(lambda *_: calls.append(1))
    model = llama()
    magnitude_prune(model)
    res = recover(model, input_ids=ids, dense_model=dense, steps=6, batch_size=4)  # default: top-k
    hook.remove()
    assert len(calls) == len(ids) // 4  # one pass over the windows, none per step
    assert res.options["teacher_top_k"] == 64 and res.details["teacher_seconds"] > 0


def test_dense_targets_follow_the_recover_settings() -> None:
    """``llmprune prune --recover``'s path: targets from the model before it is pruned (no copy), or
    None when the settings ask for a live teacher or no distillation."""
    model = llama()
    ids = chain_windows()
    targets = dense_targets(model, ids, {"teacher_top_k": 5, "precision": "float32"})
    reference = topk_targets(model, ids, 5)
    torch.testing.assert_close(targets.probs, reference.probs)
    assert torch.equal(targets.indices, reference.indices)
    assert dense_targets(model, ids, {"teacher_top_k": None}) is None
    assert dense_targets(model, ids, {"distill": 0}) is None


def test_a_timed_teacher_pass_keeps_the_first_windows_it_reached() -> None:
    """With ``max_seconds`` the pass stops after the batch that reaches it, once it holds ``min_windows``
    windows: the targets are then the full pass's first rows, and name those windows as theirs."""
    model = llama()
    ids = chain_windows(10)
    full = topk_targets(model, ids, 5, batch_size=2)
    settings = {"teacher_top_k": 5, "precision": "float32", "batch_size": 2}
    cut = dense_targets(model, ids, settings, max_seconds=0.0, min_windows=3)  # reached at once
    assert torch.equal(cut.input_ids, ids[:4])  # batches of 2: the one that reached 3 windows ends it
    assert torch.equal(cut.indices, full.indices[:4])
    torch.testing.assert_close(cut.probs, full.probs[:4])
    torch.testing.assert_close(cut.rest, full.rest[:4])
    late = dense_targets(model, ids, settings, max_seconds=1e6, min_windows=3)
    assert torch.equal(late.input_ids, ids)  # a budget not reached: every window


def test_bad_precision_fails_before_work() -> None:
    model = llama()
    magnitude_prune(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match="precision.*bfloat16"):
        recover(model, input_ids=chain_windows(), steps=1, precision="bf17")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert resolve_precision("float32", torch.device("cpu")) == "float32"


def test_compact_lift_gradients_give_the_same_steps_as_full_ones() -> None:
    """Catches the compacted gradient (selected entries only, kept by a hook as backward writes it) being
    accumulated wrongly over micro-batches, clipped differently, or left over into the next step."""
    from llmprune.recovery.lift import SparseAdamW

    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 6, generator=gen)
    index = torch.tensor([1, 5, 7, 20, 33, 47])
    data = [torch.randn(8, 6, generator=gen) for _ in range(6)]
    results = []
    for compact in (False, True):
        p = torch.nn.Parameter(w0.clone())
        opt = SparseAdamW([(p, index)], lr=0.05, weight_decay=0.1)
        handles = opt.compact_gradients() if compact else []
        for step in range(3):
            for micro in range(2):  # gradient accumulation: the two micro-batches' gradients add up
                ((p * data[2 * step + micro]) ** 2).sum().backward()
            assert (p.grad is None) == compact  # the full gradient is freed as soon as it is made
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        for h in handles:
            h.remove()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1])


def test_failed_lift_run_puts_back_every_entry_it_trained() -> None:
    """LIFT backs up only the entries it ever selects (not every weight); catches an entry first selected
    at a refresh that the backup misses, so a failed run would leave it trained."""
    model = llama()
    magnitude_prune(model)
    before = {n: m.weight.detach().clone() for n, m in block_linears(model).items()}

    def fail(step: int, m) -> None:
        if step == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        recover(
            model, input_ids=chain_windows(), method="lift", steps=10, lr=5e-2, update_interval=1,
            density=0.2, callback=fail,
        )  # fmt: skip
    for name, m in block_linears(model).items():
        assert torch.equal(m.weight, before[name]), name
    assert all(p.grad is None for p in model.parameters())
