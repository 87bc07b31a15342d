"""save_pruned: a plain HF checkpoint that transformers loads alone, provenance beside it, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmprune.errors import ConfigError
from llmprune.io import atomic as atomic_mod
from llmprune.io import save as save_mod
from llmprune.io.save import load_keep_masks, pack_bits, save_pruned, unpack_bits
from llmprune.result import BlockReport, ModuleReport, PruneResult

METRICS = {
    "perplexity": {"dense": 20.5, "pruned": 24.25, "dataset": "wikitext2", "seq_len": 64, "windows": 3}
}
RECIPE = {"method": "wanda", "sparsity": 0.5, "overrides": {"self_attn": "2:4"}, "calibration": {"seed": 3}}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(126)} | {"[UNK]": 126, "[PAD]": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@torch.no_grad()
def prune_by_hand(model: LlamaForCausalLM) -> PruneResult:
    """2:4 on attention (2 largest |w| of every 4 inputs), 50 % per row on the MLP; zeros via masked_fill."""
    result = PruneResult(method="magnitude", sparsity="0.5", options={"scope": "layer"}, seed=3)
    result.calibration_hash, result.num_calibration_samples, result.max_seq_length = "ab" * 32, 4, 16
    for i, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            w = module.weight  # (out, in)
            if "self_attn" in name:
                groups = w.abs().reshape(w.shape[0], -1, 4)  # (out, in/4, 4)
                top = groups.topk(2, dim=-1).indices
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(w.shape)
                target = "2:4"
            else:
                top = w.abs().topk(w.shape[1] // 2, dim=-1).indices
                keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, top, True)
                target = "0.5"
            w.masked_fill_(~keep, 0.0)
            full = f"model.layers.{i}.{name}"
            result.modules[full] = ModuleReport(
                full, tuple(w.shape), target, float((w == 0).float().mean()), 0.1
            )
            result.keep_masks[full] = keep.clone()
        result.blocks.append(BlockReport(i, f"model.layers.{i}", 0.01, 0.02))
    return result


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    model = tiny_llama()
    result = prune_by_hand(model)
    out = tmp_path_factory.mktemp("save") / "pruned"
    run_info = {"command": "llmprune prune --method magnitude", "base_model": "someone/tiny-llama"}
    save_pruned(
        model,
        tiny_tokenizer(),
        out,
        result=result,
        recipe=RECIPE,
        run_info=run_info,
        metrics=METRICS,
        max_shard_size="50KB",
    )
    return model, result, out


LOADER = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    folder, dump = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok("w1 w5 w9 w77 w3 w120 w0 w42")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    out = {"logits": logits.contiguous(), "ids": ids}
    out |= {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(out, dump)
    assert not any(m == "llmprune" or m.startswith("llmprune.") for m in sys.modules), "llmprune was imported"
    """
)


def test_plain_transformers_loads_identical_model(pruned, tmp_path):
    model, _, out = pruned
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    dump = tmp_path / "dump.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(out), str(dump)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_file(str(dump))
    torch.set_num_threads(1)
    with torch.no_grad():
        expected = model(input_ids=loaded["ids"]).logits
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=1e-6)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name  # bit-identical weights, so the same zeros
        assert torch.equal(loaded[name] == 0, tensor == 0), name


def test_config_carries_no_sparsity_or_quantization(pruned):
    _, _, out = pruned
    text = (out / "config.json").read_text()
    for word in ("sparsity", "quantization", "compression", "pruning", "llmprune"):
        assert word not in text.lower()


def test_masks_restore_the_solver_keep_masks_exactly(pruned):
    _, result, out = pruned
    masks = load_keep_masks(out / "masks.safetensors")
    assert masks.keys() == result.keep_masks.keys()
    for name, keep in result.keep_masks.items():
        assert masks[name].dtype == torch.bool and torch.equal(masks[name], keep), name
    assert (out / "masks.safetensors").stat().st_size < sum(m.numel() for m in masks.values()) / 8 + 4096


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1, 1), (7, 13, 3)])
def test_bit_packing_matches_numpy_packbits(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.4
    packed = pack_bits(mask)
    reference = np.packbits(mask.numpy().reshape(-1))  # independent implementation, big-endian bits
    assert np.array_equal(packed.numpy(), reference)
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_sparsity_json_reports_what_is_in_the_weights(pruned):
    model, result, out = pruned
    report = json.loads((out / "sparsity.json").read_text())
    assert report["method"] == "magnitude" and report["num_modules"] == 14
    zeros = total = 0
    for name, info in report["modules"].items():
        w = model.get_submodule(name).weight
        assert info["shape"] == list(w.shape)
        assert info["zeros"] == int((w == 0).sum())
        assert info["sparsity"] == pytest.approx(info["zeros"] / w.numel())
        if "self_attn" in name:
            assert info["target"] == "2:4" and info["nm_valid"] is True and info["sparsity"] == 0.5
        else:
            assert info["target"] == "0.5" and info["nm_valid"] is None
        zeros, total = zeros + info["zeros"], total + w.numel()
    assert report["overall_sparsity"] == pytest.approx(zeros / total)
    assert report["overall_sparsity"] == pytest.approx(result.overall_sparsity)


def test_recipe_and_run_info(pruned):
    _, result, out = pruned
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == RECIPE
    info = json.loads((out / "run_info.json").read_text())
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["transformers"]
    assert info["seed"] == 3 and info["calibration_hash"] == result.calibration_hash
    assert info["metrics"] == METRICS and info["command"].startswith("llmprune prune")
    assert len(info["timings"]["blocks"]) == 2 and info["timings"]["save_seconds"] >= 0


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_interrupted_save_keeps_previous_contents(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    save_pruned(tiny_llama(0), None, out, result=prune_by_hand(tiny_llama(0)))
    before = _snapshot(out)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(save_mod, "save_keep_masks", boom)  # after the weights, before the card
    other = tiny_llama(1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(other, None, out, result=prune_by_hand(other), overwrite=True)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folder left behind

    with pytest.raises(RuntimeError, match="disk full"):  # a first save that fails leaves nothing
        save_pruned(other, None, tmp_path / "fresh", result=prune_by_hand(other))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_swap_restores_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    save_pruned(tiny_llama(0), None, out)
    before = _snapshot(out)
    real_rename = os.rename

    def rename(src, dst):
        name = Path(src).name  # the new folder moving into place (not the old one moving back)
        if name.startswith(".llmprune-tmp-") and "-old-" not in name:
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic_mod.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_pruned(tiny_llama(1), None, out, overwrite=True)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_successful_save_replaces_a_previous_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    save_pruned(tiny_llama(0), None, out, max_shard_size="50KB")
    model = tiny_llama(1)
    with pytest.raises(ConfigError, match="--overwrite"):  # an earlier output is replaced only when asked
        save_pruned(model, None, out)
    save_pruned(model, None, out, overwrite=True)  # unsharded this time: no old shard may survive
    assert not list(out.glob("model-*.safetensors"))
    assert torch.equal(load_file(str(out / "model.safetensors"))["lm_head.weight"], model.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_refuses_to_overwrite_the_input_model(tmp_path, monkeypatch):
    src = tmp_path / "base"
    tiny_llama().save_pretrained(src)
    model = LlamaForCausalLM.from_pretrained(src)
    before = _snapshot(src)
    # the folder itself, a parent that would be replaced, or a folder inside it (which changes it)
    for target in (src, tmp_path, src / "pruned"):
        with pytest.raises(ConfigError, match="input model"):
            save_pruned(model, None, target)
    assert _snapshot(src) == before
    save_pruned(model, None, tmp_path / "pruned")  # a sibling is clearly a different folder
    assert (tmp_path / "pruned" / "config.json").is_file()


def test_an_earlier_output_with_foreign_files_is_never_replaced(tmp_path):
    """Before: any folder holding a config.json was replaced whole, the user's files with it."""
    out = tmp_path / "ckpt"
    save_pruned(tiny_llama(0), None, out)
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="notes.txt, plots"):
        save_pruned(tiny_llama(1), None, out, overwrite=True)
    assert _snapshot(out) == before and (out / "plots").is_dir()
    other = tmp_path / "other-model"  # a checkpoint llmprune did not write: refused even with overwrite
    tiny_llama().save_pretrained(other)
    (other / "train_log.txt").write_text("mine")
    snapshot = _snapshot(other)
    with pytest.raises(ConfigError, match="not written by llmprune"):
        save_pruned(tiny_llama(1), None, other, overwrite=True)
    assert _snapshot(other) == snapshot


def test_refuses_folders_that_are_not_checkpoints(tmp_path, monkeypatch):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="new or empty folder"):
        save_pruned(tiny_llama(), None, tmp_path / "notes")
    monkeypatch.chdir(tmp_path / "notes")
    with pytest.raises(ConfigError, match="current directory"):
        save_pruned(tiny_llama(), None, ".")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


def test_gguf_quantization_leftovers_are_dropped(tmp_path):
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    save_pruned(model, None, tmp_path / "out", save_masks=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and not (tmp_path / "out" / "masks.safetensors").exists()


def test_without_a_result_masks_come_from_the_zeros_in_gpt2_layout(tmp_path):
    """GPT-2's Conv1D stores (in, out): masks and shapes must still be (out, in)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).eval()
    attn = model.transformer.h[0].attn.c_attn  # weight (in=16, out=48)
    with torch.no_grad():
        attn.weight[:, :5] = 0.0  # outputs 0..4 fully pruned
    save_pruned(model, None, tmp_path / "out")
    masks = load_keep_masks(tmp_path / "out")
    keep = masks["transformer.h.0.attn.c_attn"]
    assert keep.shape == (48, 16) and not keep[:5].any() and keep[5:].all()
    info = json.loads((tmp_path / "out" / "sparsity.json").read_text())["modules"][
        "transformer.h.0.attn.c_attn"
    ]
    assert info["shape"] == [48, 16] and info["zeros"] == 5 * 16


def test_without_a_recipe_the_result_is_saved_in_recipe_layout(tmp_path):
    from llmprune.recipe import Recipe

    model = tiny_llama()
    result = prune_by_hand(model)
    save_pruned(model, None, tmp_path / "out", result=result)
    recipe = Recipe.from_dict(yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text()))
    assert (recipe.prune.method, recipe.prune.sparsity, recipe.prune.options) == (
        "magnitude",
        0.5,
        {"scope": "layer"},
    )
    assert (recipe.calibration.seed, recipe.calibration.num_calibration_samples) == (3, 4)
    save_pruned(model, None, tmp_path / "again", recipe=recipe)  # a Recipe object is accepted as is
    assert yaml.safe_load((tmp_path / "again" / "recipe.yaml").read_text()) == recipe.to_dict()
    assert json.loads((tmp_path / "again" / "sparsity.json").read_text())["method"] == "magnitude"
