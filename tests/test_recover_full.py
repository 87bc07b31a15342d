"""``recover(method="full")``: every remaining weight trained (checked against torch's AdamW); masks kept."""

from __future__ import annotations

import json

import pytest
import test_cli_prune
import torch
import torch.nn.functional as F
from helpers import chain_windows, lm_loss, magnitude_prune
from helpers import tiny_gpt2 as gpt2
from helpers import tiny_llama as llama
from torch import nn

from llmprune.cli import main
from llmprune.errors import ConfigError
from llmprune.recovery import recover
from llmprune.structured.surgery import Removal, rebuild

pytestmark = pytest.mark.usefixtures("one_thread")
tiny_checkpoint = test_cli_prune.tiny_checkpoint


def shrunk(dense: nn.Module) -> nn.Module:
    """The tiny Llama with one block, 16 MLP channels and one KV group removed: another shape."""
    return rebuild(dense, Removal(blocks=[0], channels={1: list(range(16))}, kv_groups={1: [0]}))


def test_one_step_equals_torch_adamw_on_the_kl_to_a_teacher_of_another_shape() -> None:
    dense = llama(tied=True)
    model, reference = shrunk(dense), shrunk(dense)
    with torch.no_grad():  # a teacher far from the student: sharper next-token distributions
        dense.get_output_embeddings().weight.mul_(20.0)
    ids = chain_windows(n=4, length=12)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    with torch.no_grad():
        target = F.log_softmax(dense(input_ids=ids).logits, dim=-1).flatten(0, 1)
    student = F.log_softmax(reference(input_ids=ids).logits, dim=-1).flatten(0, 1)
    F.kl_div(student, target, log_target=True, reduction="batchmean").backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    opt.step()

    res = recover(
        model, method="full", input_ids=ids, dense_model=dense, steps=1, lr=1e-2, batch_size=4,
        warmup_ratio=0.0, max_grad_norm=None, teacher_top_k=None, precision="float32",  # exact full KL
    )  # fmt: skip
    assert res.trainable_params == sum(p.numel() for p in model.parameters())  # every weight, tied once
    assert res.options["distill"] == 1.0
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        # AdamW's first step is lr·g/(|g| + eps): where |g| is near eps, rounding decides; compare elsewhere
        clear = grads[name].abs() > 1e-6
        assert clear.float().mean() > 0.3, name
        torch.testing.assert_close(p[clear], ref[name][clear], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_a_masked_model_keeps_every_zero_while_all_kept_weights_train(arch: str, optimizer: str) -> None:
    model = llama() if arch == "llama" else gpt2()
    keep = magnitude_prune(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = chain_windows()
    loss_before = lm_loss(model, ids)
    res = recover(model, method="full", input_ids=ids, steps=6, lr=1e-2, optimizer=optimizer)
    modules = dict(model.named_modules())
    for name, k in keep.items():
        w, w0 = modules[name].weight, before[f"{name}.weight"]
        w, w0 = (w.t(), w0.t()) if arch == "gpt2" else (w, w0)
        assert bool((w[~k] == 0).all()) and not bool(torch.signbit(w[~k]).any()), name  # exactly +0.0
        assert float((w[k] != w0[k]).float().mean()) > 0.9, name  # the kept weights all train
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before)  # norms, biases, embeddings too
    assert res.sparsity == pytest.approx(0.5, abs=0.02)
    assert lm_loss(model, ids) < loss_before


def test_frozen_embeddings_and_option_errors() -> None:
    model = llama()
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    res = recover(model, method="full", input_ids=chain_windows(), steps=2, lr=1e-2, train_embeddings=False)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.equal(model.get_output_embeddings().weight, head)
    total = sum(p.numel() for p in model.parameters())
    assert res.trainable_params == total - emb.numel() - head.numel()
    with pytest.raises(ConfigError, match="adamw or adafactor"):
        recover(model, method="full", input_ids=chain_windows(), steps=1, optimizer="adam")
    with pytest.raises(ConfigError, match="drop one"):
        ids = chain_windows()
        recover(model, method="full", input_ids=ids, steps=1, optimizer="adafactor", optim="adamw_8bit")


def test_cli_structure_then_full_recovery(tiny_checkpoint, capsys) -> None:
    folder, text = tiny_checkpoint
    args = [
        "prune", "--model", str(folder), "--dataset", str(text), "--eval_dataset", str(text),
        "--num_calibration_samples", "4", "--max_seq_length", "16", "--eval_limit", "4",
        "--structure", "depth", "--sparsity", "0.5", "--recover", "full", "--recover_steps", "2",
        "--skip_eval", "--json",
    ]  # fmt: skip
    assert main(args) == 0
    recovery = json.loads(capsys.readouterr().out)["recovery"]
    assert recovery["method"] == "full" and recovery["steps_done"] == 2
    assert recovery["options"]["distill"] == 1.0 and recovery["trainable_fraction"] == 1.0


def test_recipe_takes_full_and_its_options() -> None:
    from llmprune.recipe import Recipe

    recipe = Recipe.from_dict({"recover": {"method": "full", "options": {"optimizer": "adafactor"}}})
    kwargs = recipe.recover_kwargs()
    assert kwargs["method"] == "full" and kwargs["optimizer"] == "adafactor"
    with pytest.raises(ConfigError, match="did you mean 'optimizer'"):
        Recipe.from_dict({"recover": {"method": "full", "options": {"optimiser": "adafactor"}}})



def test_full_has_no_blockwise_mode_and_says_so():
    """Bug caught: recover(method="full", mode="reconstruct") ended in a KeyError from the block-wise
    learning-rate table instead of a one-line ConfigError naming the modes that work."""
    model = llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with pytest.raises(ConfigError, match="mode='retrain'"):
        recover(model, input_ids=ids, method="full", mode="reconstruct", dense_model=model)
