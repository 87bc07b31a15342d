"""keep_sparsity: pruned weights stay exactly +0.0 through real training loops, and only while held."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_model

import llmprune
from llmprune.finetune.sources import block_linears
from llmprune.io.save import save_keep_masks


def pruned(arch: str, sparsity: float = 0.5):
    """A tiny model pruned by the real engine (magnitude: no data) and its PruneResult."""
    model = make_model(arch)
    result = llmprune.prune(model, None, method="magnitude", sparsity=sparsity, progress=False)
    return model, result


def weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in block_linears(model).items()}


def pruned_entries(model, result) -> dict[str, torch.Tensor]:
    """Values at pruned positions, (out, in) layout, per Linear."""
    out = {}
    for name, module in block_linears(model).items():
        w = module.weight.detach()
        w = w.t() if type(module).__name__ == "Conv1D" else w
        out[name] = w[~result.keep_masks[name]]
    return out


def assert_exact_zeros(model, result) -> None:
    for name, values in pruned_entries(model, result).items():
        assert values.numel() > 0
        assert bool((values == 0).all()), f"{name}: {int((values != 0).sum())} pruned weights moved"
        assert not bool(torch.signbit(values).any()), f"{name}: -0.0 at a pruned entry"


def assert_kept_changed(model, before) -> None:
    after = weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before), "kept weights did not train"


def batches(n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_plain_loop_adamw_decay_clip_accumulate_bf16(arch, one_thread):
    """AdamW + weight decay, clipping, 2-batch accumulation, bf16 autocast: zeros stay +0.0."""
    model, result = pruned(arch)
    handle = llmprune.keep_sparsity(model, result)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = weights(model)
    model.train()
    for i, ids in enumerate(batches(6)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss / 2
        loss.backward()
        if i % 2 == 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
    assert_exact_zeros(model, result)
    assert_kept_changed(model, before)
    stats = handle.stats()
    assert stats.optimizer_steps == 3 and stats.violations == 0
    assert stats.gradient_entries_blocked > 0  # the mask did block updates
    handle.remove()


def test_without_protection_the_same_loop_unprunes(one_thread):
    """The control for the test above: the scenario does un-prune when nothing holds the mask."""
    model, result = pruned("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for ids in batches(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = sum(int((v != 0).sum()) for v in pruned_entries(model, result).values())
    assert moved > 0.9 * sum(int((~k).sum()) for k in result.keep_masks.values())


def test_adamw_first_moment_cannot_resurrect(one_thread):
    """Moments built before the mask move a zero-gradient weight; the post-step hook puts it back."""
    model = make_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # dense step: exp_avg nonzero everywhere
    opt.zero_grad()
    result = llmprune.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    name, module = next(iter(block_linears(model).items()))
    pruned_moment = opt.state[module.weight]["exp_avg"][~result.keep_masks[name]]
    assert bool((pruned_moment != 0).all())  # the precondition: a nonzero first moment on pruned weights
    with llmprune.keep_sparsity(model, result) as handle:
        for ids in batches(2, seed=1):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        assert handle.stats().rezeroed > 0  # AdamW did move them; they were put back
    assert_exact_zeros(model, result)


def test_gradients_masked_before_accumulation_and_clipping(one_thread):
    """.grad is zero at pruned entries after two backwards, and clipping sees only the kept gradients."""
    model, result = pruned("llama")
    model.train()
    ids = batches(2)
    for x in ids:  # reference: unprotected gradients, masked by hand
        model(input_ids=x, labels=x).loss.backward()
    modules = block_linears(model)
    expected = {n: m.weight.grad.masked_fill(~result.keep_masks[n], 0.0) for n, m in modules.items()}
    reference = []
    for pname, p in model.named_parameters():
        owner = pname.removesuffix(".weight")
        reference.append(
            expected[owner] if pname.endswith(".weight") and owner in expected else p.grad.clone()
        )
    ref_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in reference]))
    model.zero_grad()
    with llmprune.keep_sparsity(model, result):
        for x in ids:
            model(input_ids=x, labels=x).loss.backward()
        for name, module in modules.items():
            torch.testing.assert_close(module.weight.grad, expected[name])
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(norm, ref_norm)


def test_momentum_sgd_with_coupled_decay(one_thread):
    """SGD momentum buffers from before the mask would move pruned weights; they stay +0.0."""
    model = make_model("gpt2")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    model.train()
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    result = llmprune.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    with llmprune.keep_sparsity(model, result):
        for x in batches(2, seed=2):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    assert_exact_zeros(model, result)


def test_remove_restores_ordinary_training(one_thread):
    model, result = pruned("llama")
    handle = llmprune.keep_sparsity(model)  # masks from the current zeros
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    assert_exact_zeros(model, result)
    handle.remove()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    moved = sum(int((v != 0).sum()) for v in pruned_entries(model, result).values())
    assert moved > 0


def test_accelerate_loop(one_thread):
    accelerate = pytest.importorskip("accelerate")
    model, result = pruned("mistral")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(torch.cat(batches(4)), batch_size=2)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    handle = llmprune.keep_sparsity(model, result)
    before = weights(model)
    model.train()
    for x in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=x, labels=x).loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    assert handle.stats().optimizer_steps >= 2
    handle.remove()
    assert_exact_zeros(model, result)
    assert_kept_changed(model, before)


def test_masks_from_file_result_and_zeros_agree(tmp_path):
    model, result = pruned("gpt2")
    save_keep_masks(result.keep_masks, tmp_path / "masks.safetensors")
    handles = [
        llmprune.keep_sparsity(model, tmp_path),  # the pruned folder
        llmprune.keep_sparsity(model, tmp_path / "masks.safetensors"),
        llmprune.keep_sparsity(model, result),
        llmprune.keep_sparsity(model),
    ]
    masks = [h.keep_masks for h in handles]
    for h in handles:
        h.remove()
    for other in masks[1:]:
        assert other.keys() == masks[0].keys() == result.keep_masks.keys()
        assert all(torch.equal(other[n], masks[0][n]) for n in other)
    assert all(torch.equal(masks[0][n], result.keep_masks[n]) for n in masks[0])


def test_masks_cost_one_bool_per_weight():
    model, result = pruned("llama")
    with llmprune.keep_sparsity(model, result) as handle:
        numel = sum(m.weight.numel() for m in block_linears(model).values())
        assert handle.mask_bytes == numel  # torch.bool: one byte per weight, no float copy
        assert handle.num_pruned == sum(int((~k).sum()) for k in result.keep_masks.values())


def raises_one_line(match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(llmprune.LlmpruneError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_input_names_the_fix():
    model, result = pruned("llama")
    name = next(iter(result.keep_masks))
    keep = result.keep_masks[name]
    raises_one_line("another model", llmprune.keep_sparsity, model, {name: keep[:, :-1]})
    raises_one_line("another model", llmprune.keep_sparsity, model, {"model.layers.9.mlp.up_proj": keep})
    raises_one_line("prune it first", llmprune.keep_sparsity, make_model("llama"))
    raises_one_line("bool", llmprune.keep_sparsity, model, {name: keep.float()})
    raises_one_line("masks.safetensors", llmprune.keep_sparsity, model, 0.5)
    dense = make_model("llama")
    raises_one_line("apply=True", llmprune.keep_sparsity, dense, result)
    with llmprune.keep_sparsity(dense, result, apply=True):
        assert_exact_zeros(dense, result)


def test_failed_setup_leaves_no_hook():
    model, result = pruned("llama")
    masks = dict(result.keep_masks)
    with torch.no_grad():
        next(iter(block_linears(model).values())).weight.add_(1.0)  # masks no longer match the weights
    with pytest.raises(llmprune.LlmpruneError):
        llmprune.keep_sparsity(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    grads = [m.weight.grad for m in block_linears(model).values()]
    assert all(bool((g != 0).any()) for g in grads)  # no gradient mask left behind
    opt.step()
