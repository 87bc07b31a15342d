"""KeepSparsityCallback and GradualPruningCallback inside transformers.Trainer (and TRL's SFTTrainer)."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_TEXT, VOCAB, make_model
from test_finetune_keep import assert_exact_zeros, assert_kept_changed, pruned, pruned_entries, weights
from transformers import Trainer, TrainingArguments

import llmprune
from llmprune.finetune.sources import block_linears


def rows(n: int = 8, length: int = 16) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (n, length), generator=gen)
    return [{"input_ids": x, "labels": x} for x in ids]


def train(model, tmp_path, callbacks, max_steps: int = 3, **overrides) -> Trainer:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        max_steps=max_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
        seed=0,
    )
    settings.update(overrides)
    trainer = Trainer(
        model=model, args=TrainingArguments(**settings), train_dataset=rows(), callbacks=callbacks
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_trainer_keeps_every_zero(arch, tmp_path, one_thread):
    model, result = pruned(arch)
    before = weights(model)
    callback = llmprune.KeepSparsityCallback()
    train(model, tmp_path, [callback])
    assert_exact_zeros(model, result)
    assert_kept_changed(model, before)
    report = callback.report
    assert report["nonzero_pruned_weights"] == 0
    assert report["pruned_weights"] == sum(int((~k).sum()) for k in result.keep_masks.values())
    assert report["gradient_entries_blocked"] > 0 and report["optimizer_steps"] == 3
    assert not callback.handle.active  # removed at train end


def test_trainer_without_callback_unprunes(tmp_path, one_thread):
    """The control: the same Trainer run destroys the mask when nothing holds it."""
    model, result = pruned("llama")
    train(model, tmp_path, [])
    moved = sum(int((v != 0).sum()) for v in pruned_entries(model, result).values())
    assert moved > 0.9 * sum(int((~k).sum()) for k in result.keep_masks.values())


def test_gradual_pruning_callback_reaches_target_monotonically(tmp_path, one_thread):
    model = make_model("qwen2")
    callback = llmprune.GradualPruningCallback(sparsity=0.5, start_step=1, end_step=4, every=1)
    seen: list[dict[str, torch.Tensor]] = []

    class Snapshot(llmprune.KeepSparsityCallback.__mro__[1]):  # a plain TrainerCallback
        def on_step_end(self, args, state, control, **kwargs):
            seen.append({n: k.clone() for n, k in callback.pruner.keep_masks.items()})

    train(model, tmp_path, [callback, Snapshot()], max_steps=6)
    assert [s for s, _ in callback.pruner.history] == [2, 3, 4]  # step 1 targets 0.0: nothing to do
    masks = callback.pruner.keep_masks
    for name, module in block_linears(model).items():
        keep = masks[name]
        assert int((~keep).sum()) == round(0.5 * keep.numel())  # magnitude per matrix: exact count
        w = module.weight.detach()
        assert bool((w[~keep] == 0).all()) and not bool(torch.signbit(w[~keep]).any())
    for earlier, later in zip(
        seen, seen[1:], strict=False
    ):  # the mask only grows, and is held between pruning steps
        for name in earlier:
            assert bool((later[name] <= earlier[name]).all())
    assert all(torch.equal(seen[-1][n], seen[-2][n]) for n in seen[-1])  # steps 5-6: held fixed


def test_gradual_bad_settings_fail_at_construction():
    with pytest.raises(llmprune.LlmpruneError, match="did you mean"):
        llmprune.GradualPruningCallback(method="wandaa")
    with pytest.raises(llmprune.LlmpruneError, match="end_step"):
        llmprune.GradualPruningCallback(start_step=10, end_step=5)
    with pytest.raises(llmprune.LlmpruneError, match="N:M"):
        llmprune.GradualPruningCallback(sparsity="2:4")


def test_trl_sft_trainer(tmp_path, tiny_tokenizer, one_thread):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, result = pruned("llama")
    before = weights(model)
    lines = [s.strip() + "." for s in SAMPLE_TEXT.split(".") if s.strip()][:16]
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=32,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=100,
        # TRL 1.16 sets gradient_checkpointing, a name transformers 5 deprecated
        gradient_checkpointing=None,
        activation_checkpointing=False,
    )
    callback = llmprune.KeepSparsityCallback(result)
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": lines}),
        processing_class=tiny_tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    assert_exact_zeros(model, result)
    assert_kept_changed(model, before)
    assert callback.report["nonzero_pruned_weights"] == 0


def test_gradual_wanda_uses_training_batch_statistics(one_thread):
    """The Wanda mask equals |W|·sqrt(mean x²) top-half per row, x = the training inputs only."""
    from llmprune.finetune.gradual import GradualPruner
    from llmprune.finetune.schedule import CubicSchedule

    model = make_model("llama")
    pruner = GradualPruner(CubicSchedule(final=0.5, start_step=0, end_step=1), "wanda").attach(model)
    name, module = "model.layers.1.mlp.down_proj", model.get_submodule("model.layers.1.mlp.down_proj")
    seen = []
    hook = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, 64)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for x in [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]:
        model(input_ids=x, labels=x).loss.backward()
    model.eval()
    with torch.no_grad():  # an evaluation pass between steps must not count
        model(input_ids=torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(9)))
    hook.remove()
    opt.step()
    opt.zero_grad()
    weight = module.weight.detach().clone()
    assert pruner.step(1) == 0.5
    x = torch.cat(seen[:2])  # (tokens, in): the two training forwards
    score = weight.abs() * x.pow(2).mean(0).sqrt()  # (out, in)
    expected = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(32, dim=1).indices, True)
    assert torch.equal(pruner.keep_masks[name], expected)
    assert bool((module.weight[~expected] == 0).all())
    pruner.remove()
