"""merge_adapter: a peft LoRA trained on a pruned model merges as W + s·(BA) ⊙ keep, every zero kept."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_finetune_keep import assert_exact_zeros, batches, pruned, pruned_entries

import llmprune
from llmprune.finetune.sources import block_linears

peft = pytest.importorskip("peft")
# peft 0.21's get_peft_model reads model.is_gradient_checkpointing, deprecated in transformers 5: peft's drift
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "opt": ["q_proj", "fc1"]}


def trained_lora(arch: str, r: int = 4, alpha: int = 8):
    """A pruned tiny model with a plain LoRA adapter trained for a few AdamW steps (B nonzero)."""
    model, result = pruned(arch)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[arch], lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for x in batches(3):
        peft_model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model, result


def closed_form(peft_model, result, scale: float) -> tuple[dict[str, torch.Tensor], float]:
    """W + s·(B@A)⊙keep as (out, in) per LoRA layer, and ||dropped|| / ||update|| computed by hand."""
    expected, dropped_sq, total_sq = {}, 0.0, 0.0
    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        A, B = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
        delta = scale * (B @ A)  # (out, in)
        w = module.get_base_layer().weight.detach()
        w = w.t() if type(module.get_base_layer()).__name__ == "Conv1D" else w
        keep = result.keep_masks[name]
        expected[name] = w + torch.where(keep, delta, torch.zeros_like(delta))
        dropped_sq += float((delta[~keep] ** 2).sum())
        total_sq += float((delta**2).sum())
    return expected, math.sqrt(dropped_sq / total_sq)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_merge_is_masked_closed_form_and_keeps_zeros(arch, one_thread):
    peft_model, result = trained_lora(arch)
    expected, fraction = closed_form(peft_model, result, scale=8 / 4)
    with pytest.warns(UserWarning, match="dropped"):  # a mask-oblivious LoRA loses ~sqrt(0.5) of its norm
        model, report = llmprune.merge_adapter(peft_model, return_report=True)
    assert not any(hasattr(m, "lora_A") for m in model.modules())  # a plain transformers model
    assert_exact_zeros(model, result)
    linears = block_linears(model)
    for name, want in expected.items():
        w = linears[name].weight.detach()
        w = w.t() if type(linears[name]).__name__ == "Conv1D" else w
        torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)
    assert report.dropped_fraction == pytest.approx(fraction, rel=1e-5)
    assert set(report.modules) == set(expected)
    assert 0.5 < report.dropped_fraction < 0.9  # the sanity range for a dense update on a 50 % mask


def test_peft_merge_and_unload_unprunes(one_thread):
    """Why merge_adapter exists: peft's own merge makes every pruned weight nonzero."""
    peft_model, result = trained_lora("llama")
    merged = copy.deepcopy(peft_model).merge_and_unload()
    moved = {n: int((v != 0).sum()) for n, v in pruned_entries(merged, result).items()}
    lora_layers = [n for n in moved if any(t in n for t in TARGETS["llama"])]
    assert all(moved[n] == int((~result.keep_masks[n]).sum()) for n in lora_layers)


def test_merge_with_masks_from_file_and_lm_head_unmasked(tmp_path, one_thread):
    from llmprune.io.save import save_keep_masks

    model, result = pruned("llama")
    save_keep_masks(result.keep_masks, tmp_path / "masks.safetensors")
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, config)
    head = peft_model.get_base_model().lm_head
    want_head = head.get_base_layer().weight.detach() + head.get_delta_weight("default").detach()
    merged, report = llmprune.merge_adapter(
        peft_model, tmp_path / "masks.safetensors", warn_above=1.0, return_report=True
    )
    assert report.modules["lm_head"].masked is False and report.modules["lm_head"].dropped_norm == 0
    torch.testing.assert_close(merged.lm_head.weight.detach(), want_head)  # merged as peft would
    assert_exact_zeros(merged, result)


def test_bad_adapters_fail_before_any_change():
    model, _ = pruned("llama")
    ia3 = peft.get_peft_model(
        copy.deepcopy(model),
        peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    with pytest.raises(llmprune.LlmpruneError, match="LoRA") as info:
        llmprune.merge_adapter(ia3)
    assert "\n" not in str(info.value)
    dora = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"], use_dora=True)
    )
    with pytest.raises(llmprune.LlmpruneError, match="DoRA"):
        llmprune.merge_adapter(dora)
    with pytest.raises(llmprune.LlmpruneError, match="peft model"):
        llmprune.merge_adapter(model)
    lora = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    lora.merge_adapter()  # peft's in-place merge: already un-pruned
    with pytest.raises(llmprune.LlmpruneError, match="unmerge_adapter"):
        llmprune.merge_adapter(lora)
    dense = peft.get_peft_model(llmprune_dense(), peft.LoraConfig(target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    with pytest.raises(llmprune.LlmpruneError, match="prune it first"):
        llmprune.merge_adapter(dense)
    assert all(torch.equal(p, before[n]) for n, p in dense.named_parameters())  # untouched


def llmprune_dense():
    from conftest import make_model

    return make_model("llama")
