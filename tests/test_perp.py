"""PERP: sparsity survives training and merging, the trained subset is the paper's, the loss drops."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import make_model
from helpers import VOCAB as V
from helpers import chain_windows, lm_loss, magnitude_prune
from helpers import tiny_gpt2 as gpt2
from helpers import tiny_llama as llama
from torch import nn
from transformers import LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from llmprune.errors import ConfigError
from llmprune.recovery import recover
from llmprune.recovery.masking import block_linears, keep_masks_from_zeros, resolve_targets, weight_2d
from llmprune.recovery.perp import PerpOptions, PerpSession
from llmprune.recovery.train import TrainSettings, lr_factor

D, R = 32, 16


pytestmark = pytest.mark.usefixtures("one_thread")


MODELS = {"llama": llama, "gpt2": gpt2}


def assert_sparsity_kept(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, k in keep.items():
        w = weight_2d(modules[name]).detach()
        assert torch.equal(w != 0, k), name
        assert not torch.signbit(w[~k]).any(), f"{name}: -0.0 left at pruned entries"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", ["mask", "scale"])
def test_training_and_merge_keep_every_zero(arch: str, lora: str) -> None:
    model = MODELS[arch]()
    keep = magnitude_prune(model)
    res = recover(model, input_ids=chain_windows(), steps=12, lr=1e-2, lora=lora)
    assert res.steps_done == 12
    assert_sparsity_kept(model, keep)
    # plain modules again: no adapters, no peft bookkeeping, nothing left trainable by us
    for m in block_linears(model).values():
        assert type(m) in (nn.Linear, Conv1D)
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())  # HF models start all-trainable; restored


@pytest.mark.parametrize("lora", ["mask", "scale"])
def test_merge_equals_the_papers_formula(lora: str) -> None:
    """Merged weight == W + s·(BA ⊙ keep) (MaskLoRA) or W ⊙ BA (ScaleLoRA), computed here by hand."""
    model = llama()
    keep = magnitude_prune(model)
    before = {n: m.weight.detach().clone() for n, m in block_linears(model).items()}
    session = PerpSession(model, resolve_targets(model, None), PerpOptions(lora=lora))
    session.attach()
    gen = torch.Generator().manual_seed(1)
    expected, ids = {}, chain_windows(2)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in keep:
            layer = modules[name]
            a, b = layer.lora_A["perp"].weight, layer.lora_B["perp"].weight
            b.copy_(torch.randn(b.shape, generator=gen))  # nonzero product everywhere
            prod = b @ a  # (out, in)
            if lora == "mask":
                expected[name] = before[name] + (32 / R) * prod * keep[name]
            else:
                expected[name] = before[name] * prod
        logits_adapted = model(input_ids=ids).logits
    session.finish()  # no enforcement after this in the session: the merge alone must keep the zeros
    for name in keep:
        w = modules[name].weight.detach()
        assert torch.equal(w[~keep[name]], torch.zeros_like(w[~keep[name]])), name
        torch.testing.assert_close(w, expected[name], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits_adapted, rtol=1e-4, atol=1e-4)


def test_adapters_start_as_identity_for_both_variants() -> None:
    for lora in ("mask", "scale"):
        model = llama()
        magnitude_prune(model)
        ids = chain_windows(2)
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        session = PerpSession(model, resolve_targets(model, None), PerpOptions(lora=lora))
        session.attach()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref), lora
        session.finish()


def test_trainable_fraction_matches_the_configuration_llama_untied() -> None:
    model = llama(tied=False)
    magnitude_prune(model)
    total = sum(p.numel() for p in model.parameters())
    res = recover(model, input_ids=chain_windows(), steps=1)
    # per layer: q (D->D), k, v (D->16), o (D->D), gate, up (D->64), down (64->D)
    shapes = [(D, D), (D, 16), (D, 16), (D, D), (D, 64), (D, 64), (64, D)]
    lora = 2 * sum(R * (i + o) for i, o in shapes) + R * (D + V)  # + plain LoRA on the untied lm_head
    norms = 2 * (2 * D) + D  # input/post-attention RMSNorm per layer + final norm; Llama has no biases
    assert res.trainable_params == lora + norms
    assert res.total_params == total
    assert res.trainable_fraction == pytest.approx((lora + norms) / total)


def test_trainable_fraction_matches_the_configuration_gpt2_tied() -> None:
    model = gpt2()
    magnitude_prune(model)
    res = recover(model, input_ids=chain_windows(), steps=1)
    per_layer_lora = R * ((D + 3 * D) + (D + D) + (D + 4 * D) + (4 * D + D))  # c_attn, c_proj, c_fc, c_proj
    per_layer_bias = 3 * D + D + 4 * D + D
    per_layer_norm = 2 * (2 * D)  # ln_1, ln_2: weight + bias
    expected = 2 * (per_layer_lora + per_layer_bias + per_layer_norm) + 2 * D  # + ln_f; tied lm_head left out
    assert res.trainable_params == expected


def test_tied_lm_head_is_left_alone_and_untied_one_is_trained() -> None:
    tied = gpt2()
    magnitude_prune(tied)
    emb = tied.transformer.wte.weight.detach().clone()
    recover(tied, input_ids=chain_windows(), steps=5, lr=1e-2)
    assert torch.equal(tied.transformer.wte.weight, emb)
    assert tied.lm_head.weight is tied.transformer.wte.weight

    untied = llama(tied=False)
    magnitude_prune(untied)
    emb, head = untied.model.embed_tokens.weight.detach().clone(), untied.lm_head.weight.detach().clone()
    recover(untied, input_ids=chain_windows(), steps=5, lr=1e-2)
    assert torch.equal(untied.model.embed_tokens.weight, emb)
    assert not torch.equal(untied.lm_head.weight, head)
    assert type(untied.lm_head) is nn.Linear


@pytest.mark.parametrize("lora", ["mask", "scale"])
def test_retraining_lowers_the_loss_on_a_fixed_batch(lora: str) -> None:
    model = llama()
    magnitude_prune(model)
    ids = chain_windows()
    before = lm_loss(model, ids)
    res = recover(model, input_ids=ids, steps=25, lr=1e-2, lora=lora)
    after = lm_loss(model, ids)
    assert after < before - 0.5, (before, after)
    assert res.last_loss < res.first_loss


def test_deterministic_for_a_seed() -> None:
    runs = []
    for seed in (3, 3, 4):
        model = llama()
        magnitude_prune(model)
        recover(model, input_ids=chain_windows(), steps=6, lr=1e-2, seed=seed)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_reconstruct_mode_matches_dense_blocks_better() -> None:
    dense = llama()
    model = copy.deepcopy(dense)
    keep = magnitude_prune(model)
    res = recover(model, input_ids=chain_windows(), mode="reconstruct", dense_model=dense, steps=15, lr=1e-2)
    blocks = res.details["blocks"]
    assert [b["block"] for b in blocks] == ["model.layers.0", "model.layers.1"]
    for b in blocks:
        assert b["final_error"] < 0.5 * b["initial_error"], b
        assert b["trainable"] > 0
    assert res.steps_done == 30
    assert_sparsity_kept(model, keep)
    # the dense copy is untouched and no adapter leaked into it
    assert all(type(m) is nn.Linear for m in block_linears(dense).values())


def test_reconstruct_steps_take_micro_batch_windows_and_retrain_refuses_it() -> None:
    dense = llama()
    model = copy.deepcopy(dense)
    magnitude_prune(model)
    ids = chain_windows()
    res = recover(
        model, input_ids=ids, mode="reconstruct", dense_model=dense, steps=2, batch_size=4, micro_batch=1
    )
    assert [b["windows_per_step"] for b in res.details["blocks"]] == [1, 1]
    res = recover(model, input_ids=ids, mode="reconstruct", dense_model=dense, steps=2, batch_size=3)
    assert [b["windows_per_step"] for b in res.details["blocks"]] == [3, 3]  # default: the batch
    with pytest.raises(ConfigError, match="retrain's step is batch_size"):
        recover(model, input_ids=ids, steps=1, micro_batch=2)


def test_reconstruct_needs_a_dense_model() -> None:
    model = llama()
    magnitude_prune(model)
    with pytest.raises(ConfigError, match="dense_model"):
        recover(model, input_ids=chain_windows(), mode="reconstruct")


def test_explicit_keep_masks_and_their_validation() -> None:
    model = llama()
    keep = magnitude_prune(model)
    assert set(keep_masks_from_zeros(model)) == set(keep)
    res = recover(model, input_ids=chain_windows(), keep_masks=keep, steps=3)
    assert res.sparsity == pytest.approx(0.5, abs=0.01)
    wrong = {k: torch.ones_like(v) for k, v in keep.items()}
    wrong[next(iter(wrong))][0, 0] = False
    name = next(iter(wrong))
    with torch.no_grad():
        dict(model.named_modules())[name].weight[0, 0] = 1.0  # marked pruned but not zero
    with pytest.raises(ConfigError, match="prune the model first"):
        recover(model, input_ids=chain_windows(), keep_masks=wrong, steps=1)


def test_option_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama()
    magnitude_prune(model)
    ids = chain_windows()
    with pytest.raises(ConfigError, match="did you mean 'perp'"):
        recover(model, input_ids=ids, method="perpp")
    with pytest.raises(ConfigError, match="accepts: lora, r, alpha"):
        recover(model, input_ids=ids, rank=4)
    with pytest.raises(ConfigError, match="use mask or scale"):
        recover(model, input_ids=ids, lora="plain")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not importable, whether installed or not
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        recover(model, input_ids=ids, optim="adamw_8bit", steps=1)
    assert_sparsity_kept(model, keep_masks_from_zeros(model))  # a failed start leaves no adapters behind
    assert all(type(m) is nn.Linear for m in block_linears(model).values())


def test_time_budget_stops_training() -> None:
    model = llama()
    magnitude_prune(model)
    res = recover(model, input_ids=chain_windows(), steps=10_000, max_seconds=0.5)
    assert 1 <= res.steps_done < 10_000
    assert res.seconds < 5


def test_schedule_warmup_then_linear_decay() -> None:
    # 10 steps, 20 % warmup: 0.5, 1.0, then (1 - step/10) / 0.8
    got = [lr_factor(s, 10, 0.0, None, 0.2) for s in range(10)]
    want = [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert got == pytest.approx(want)
    # time progress dominates when the time budget runs out first
    assert lr_factor(1, 10, 45.0, 60.0, 0.2) == pytest.approx(0.25 / 0.8)
    # never above the base rate, even when warmup is shorter than one step
    assert max(lr_factor(s, 3, 0.0, None, 0.1) for s in range(3)) == 1.0
    with pytest.raises(ConfigError):
        TrainSettings(warmup_ratio=1.0)


def prune_any(model: nn.Module) -> dict[str, torch.Tensor]:
    """Magnitude-prune half of every block Linear of any architecture; keep masks (out, in)."""
    keep = {}
    with torch.no_grad():
        for name, m in block_linears(model).items():
            w = weight_2d(m)
            thr = w.abs().flatten().kthvalue(w.numel() // 2).values
            m.weight.masked_fill_(m.weight.abs() <= thr, 0.0)
            keep[name] = weight_2d(m) != 0
    return keep


@pytest.mark.parametrize("method", ["perp", "lift"])
def test_every_architecture_keeps_its_zeros(arch: str, method: str, token_ids: torch.Tensor) -> None:
    model = make_model(arch)
    keep = prune_any(model)
    res = recover(model, method=method, input_ids=token_ids, steps=4, lr=1e-2, batch_size=2)
    assert res.steps_done == 4 and res.trainable_params > 0
    assert_sparsity_kept(model, keep)


def test_reconstruct_mode_on_every_architecture(arch: str, token_ids: torch.Tensor) -> None:
    dense = make_model(arch)
    model = copy.deepcopy(dense)
    keep = prune_any(model)
    res = recover(
        model, input_ids=token_ids, mode="reconstruct", dense_model=dense, steps=10, lr=1e-3, batch_size=3
    )
    for b in res.details["blocks"]:  # the error over all windows, before and after training the block
        assert b["final_error"] < b["initial_error"], b
    assert_sparsity_kept(model, keep)


def test_cli_recovers_and_saves(tmp_path, tiny_tokenizer) -> None:
    import argparse

    import yaml

    from llmprune.cli import recover as cli_recover

    model = llama()
    keep = magnitude_prune(model)
    src = tmp_path / "pruned"
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 30)
    parser = argparse.ArgumentParser()
    cli_recover.register(parser.add_subparsers())
    args = parser.parse_args(
        ["recover", "--model", str(src), "--device", "cpu", "--dataset", str(text)]
        + ["--num_calibration_samples", "4", "--max_seq_length", "16", "--recover_steps", "3"]
        + ["--eval_dataset", str(text), "--eval_max_seq_length", "16", "--eval_limit", "2"]
        + ["--option", "r=4", "--output_dir", str(tmp_path / "out"), "--json"]
    )
    assert args.func(args) == 0
    out = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert_sparsity_kept(out, keep)
    recipe = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert recipe["recover"]["method"] == "perp" and recipe["recover"]["options"]["r"] == 4
    assert recipe["recover"]["lr"] == 3e-3  # the resolved default, so a rerun of the recipe matches


def test_rank_zero_trains_only_norms_and_biases() -> None:
    model = gpt2()
    keep = magnitude_prune(model)
    before = {n: m.weight.detach().clone() for n, m in block_linears(model).items()}
    res = recover(model, input_ids=chain_windows(), steps=5, lr=1e-2, r=0)
    per_layer = (3 * D + D + 4 * D + D) + 2 * (2 * D)  # Conv1D biases + ln_1, ln_2 (weight, bias)
    assert res.trainable_params == 2 * per_layer + 2 * D  # + ln_f
    assert all(torch.equal(m.weight, before[n]) for n, m in block_linears(model).items())
    assert_sparsity_kept(model, keep)


@pytest.mark.parametrize("method", ["perp", "lift", "full"])
@pytest.mark.parametrize("failure", ["interrupted", "diverged"])
def test_a_failed_run_gives_the_model_back_unchanged(method: str, failure: str) -> None:
    """PERP drops its adapters; LIFT, which trains weights in place, restores them (before: it left the
    interrupted or diverged weights in the caller's model)."""
    from llmprune.recovery.train import TrainingDiverged

    model = llama()
    magnitude_prune(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def boom(step: int, m: nn.Module) -> None:
        if step == 2:
            raise RuntimeError("interrupted")

    kwargs = {"callback": boom, "lr": 1e-2} if failure == "interrupted" else {"lr": 1e30}
    with pytest.raises((RuntimeError, TrainingDiverged)):
        recover(model, method=method, input_ids=chain_windows(), steps=5, **kwargs)
    after = dict(model.named_parameters())
    assert set(after) == set(before)  # no adapter left
    assert all(torch.equal(after[n], before[n]) for n in before)  # norms restored, adapters dropped
