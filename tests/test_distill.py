"""Distillation during retraining: the loss is the one documented, it pulls the pruned model towards the
dense teacher, and no zero is lost."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import chain_windows, magnitude_prune
from helpers import tiny_gpt2 as gpt2
from helpers import tiny_llama as llama
from torch import nn

from llmprune.errors import ConfigError
from llmprune.recovery import heap, losses, recover
from llmprune.recovery.losses import retraining_loss
from llmprune.recovery.masking import weight_2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl_by_hand(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Sum over the vocabulary of p_t·(log p_t − log p_s), averaged over positions, in float64 loops."""
    s = student.double().reshape(-1, student.shape[-1])
    t = teacher.double().reshape(-1, teacher.shape[-1])
    total = 0.0
    for row_s, row_t in zip(s, t, strict=True):
        log_ps = row_s - torch.logsumexp(row_s, 0)
        log_pt = row_t - torch.logsumexp(row_t, 0)
        total += float((log_pt.exp() * (log_pt - log_ps)).sum())
    return total / s.shape[0]


def _reference(logits: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor, distill: float):
    """The same loss from torch's own functions on the whole tensors (what losses.py avoids for speed)."""
    v = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    kl = F.kl_div(
        F.log_softmax(logits.reshape(-1, v), -1),
        F.log_softmax(teacher.reshape(-1, v), -1),
        log_target=True,
        reduction="batchmean",
    )
    return (1 - distill) * ce + distill * kl


@pytest.mark.parametrize("distill", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("rows", [3, 128])  # chunks that do and do not divide the 2 x 5 positions
def test_loss_and_gradient_match_torch(monkeypatch, distill: float, rows: int) -> None:
    monkeypatch.setattr(losses, "ROWS_PER_CHUNK", rows)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    teacher = 3 * torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    ids = torch.randint(11, (2, 5), generator=gen)
    ours_in, ref_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = retraining_loss(ours_in, ids, teacher, distill)
    ref = _reference(ref_in, ids, teacher, distill)
    (2.5 * ours).backward()
    (2.5 * ref).backward()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-9, atol=1e-12)


def test_masked_teacher_tokens_give_finite_loss_and_gradient() -> None:
    """A teacher that rules tokens out (logit −inf) contributes 0 · log 0 = 0 there, not NaN."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(1, 4, 7, generator=gen), torch.randn(1, 4, 7, generator=gen)
    teacher[..., :3] = float("-inf")
    x = student.clone().requires_grad_(True)
    loss = retraining_loss(x, torch.zeros(1, 4, dtype=torch.long), teacher, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    by_hand = _kl_by_hand(student, teacher.clamp_min(-1e4))  # a finite stand-in for −inf: p = 0 exactly
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-5)


def test_kl_matches_the_definition_and_vanishes_for_the_teacher_itself() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), 3 * torch.randn(2, 5, 11, generator=gen)
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert float(retraining_loss(student, ids, teacher, 1.0)) == pytest.approx(
        _kl_by_hand(student, teacher), rel=1e-5
    )
    assert float(retraining_loss(teacher, ids, teacher, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(retraining_loss(student + 7.0, ids, teacher, 1.0)) == pytest.approx(  # shift-invariant
        _kl_by_hand(student, teacher), rel=1e-5
    )


def _kl_to(model: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return _kl_by_hand(model(input_ids=ids).logits, teacher(input_ids=ids).logits)


@pytest.mark.parametrize("distill", [0.5, 1.0])
def test_first_loss_is_the_documented_mixture(distill: float) -> None:
    """Step 0's loss is computed before any update: (1 − d)·CE + d·KL of the model as pruned."""
    dense = llama()
    model = copy.deepcopy(dense)
    magnitude_prune(model)
    ids = chain_windows(4)
    with torch.no_grad():
        ce = float(model(input_ids=ids, labels=ids).loss)  # transformers' own shifted LM loss
    expected = (1 - distill) * ce + distill * _kl_to(model, dense, ids)
    res = recover(
        model, input_ids=ids, steps=1, batch_size=4, dense_model=dense, distill=distill,
        teacher_top_k=None, precision="float32",  # the exact full KL to a live teacher, in float32
    )  # fmt: skip
    assert res.first_loss == pytest.approx(expected, rel=1e-4)
    assert res.options["distill"] == distill


def _trained_teacher(arch: str, ids: torch.Tensor) -> nn.Module:
    """A dense model that has learnt the chain, so its next-token distributions are far from uniform."""
    model = {"llama": llama, "gpt2": gpt2}[arch]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("method", ["perp", "lift"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_distillation_pulls_the_pruned_model_to_the_teacher(method: str, arch: str) -> None:
    train = chain_windows(8)
    dense = _trained_teacher(arch, train)
    model = copy.deepcopy(dense)
    keep = magnitude_prune(model, 0.6)
    before = _kl_to(model, dense, train)
    teacher_state = {k: v.clone() for k, v in dense.state_dict().items()}
    recover(model, method=method, input_ids=train, steps=30, lr=1e-2, dense_model=dense, distill=1.0)
    after = _kl_to(model, dense, train)
    assert after < 0.5 * before
    modules = dict(model.named_modules())
    for name, k in keep.items():
        assert torch.equal(weight_2d(modules[name]).detach() != 0, k), name  # every zero kept, no other lost
    for key, value in dense.state_dict().items():  # the teacher is never trained
        assert torch.equal(value, teacher_state[key]), key


def test_distill_errors_name_the_fix() -> None:
    model, ids = llama(), chain_windows(2)
    magnitude_prune(model)
    with pytest.raises(ConfigError, match="dense_model"):
        recover(model, input_ids=ids, steps=1, distill=1.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        recover(model, input_ids=ids, steps=1, distill=1.5, dense_model=llama())
    with pytest.raises(ConfigError, match="retrain"):
        recover(model, input_ids=ids, steps=1, distill=1.0, dense_model=llama(), mode="reconstruct")


def _anonymous_bytes() -> int:
    """Bytes of anonymous mappings outside the brk heap (where glibc puts its large-block mmaps).

    Bytes, not a count of mappings: the kernel merges adjacent anonymous mappings, so a fresh mmap
    next to an old one adds no mapping but always adds its bytes.
    """
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps.read().splitlines():
            fields = line.split()
            if len(fields) < 6:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                total += end - start
    return total


def _fresh_mapping_for_one_block() -> bool:
    before = _anonymous_bytes()
    block = torch.ones(25 * 2**20)  # 100 MB
    grew = _anonymous_bytes() - before >= 100 * 2**20
    del block
    return grew


@pytest.mark.skipif(heap._glibc() is None, reason="needs Linux with glibc")
def test_large_blocks_come_from_the_heap_inside_the_training_context() -> None:
    assert _fresh_mapping_for_one_block()  # the default: its own mmap, returned to the OS on free
    with heap.reuse_freed_memory():
        _fresh_mapping_for_one_block()  # the heap may grow once
        # then a freed block is reused: one of three tries suffices (a busy machine can refuse the heap's
        # growth once, and glibc then falls back to a mapping), while without the context every try maps
        assert not all(_fresh_mapping_for_one_block() for _ in range(3))
    # what comes back on exit is checked on the mallopt calls (next test): whether a later block gets a
    # fresh mapping also depends on where earlier tests left the heap's free space


@pytest.mark.skipif(heap._glibc() is None, reason="needs Linux with glibc")
def test_nested_use_keeps_the_outer_setting_and_restores_the_users(monkeypatch) -> None:
    """Before: an inner context restored glibc's defaults inside the outer one, and the user's
    MALLOC_MMAP_MAX_ was replaced by a hard-coded 65536 on exit."""
    calls = []
    libc = heap._glibc()
    real = libc.mallopt

    class Recording:
        def __getattr__(self, name):
            return getattr(libc, name)

        def mallopt(self, param, value):
            calls.append((param, value))
            return real(param, value)

    monkeypatch.setattr(heap, "_glibc", lambda: Recording())
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "1234")
    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            pass
        assert calls == [(heap.M_MMAP_MAX, 0), (heap.M_TRIM_THRESHOLD, 2**31 - 1)]  # inner: no change
        assert not _fresh_mapping_for_one_block() or not _fresh_mapping_for_one_block()
    assert calls[2:] == [(heap.M_MMAP_MAX, 1234), (heap.M_TRIM_THRESHOLD, heap.DEFAULT_TRIM_THRESHOLD)]
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    real(heap.M_MMAP_MAX, heap.DEFAULT_MMAP_MAX)
