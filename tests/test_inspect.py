"""inspect_checkpoint: sparsity and N:M validity read straight from safetensors, checked by hand."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
from helpers import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from llmprune.cli import inspect as inspect_cli
from llmprune.errors import ConfigError, ModelLoadError
from llmprune.io.inspect import format_inspection, inspect_checkpoint, weight_stats
from llmprune.io.save import save_pruned


def brute_force_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Reference: walk every row and every aligned group of m columns, count nonzeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    values = weight.tolist()
    for r in range(rows):
        for start in range(0, cols, m):
            if sum(1 for v in values[r][start : start + m] if v != 0) > n:
                return False
    return True


@pytest.mark.parametrize("seed", range(6))
def test_weight_stats_agree_with_brute_force(seed):
    rng = random.Random(seed)
    rows, m = rng.randint(1, 6), rng.choice([4, 8])
    w = torch.randn(rows, m * rng.randint(1, 4), generator=torch.Generator().manual_seed(seed))
    kind = seed % 3
    if kind == 0:  # a valid n:m pattern with n picked at random
        n = rng.randint(1, m - 1)
        for r in range(rows):
            for start in range(0, w.shape[1], m):
                for j in rng.sample(range(m), m - n):
                    w[r, start + j] = 0.0
    elif kind == 1:  # unstructured
        w[torch.rand(w.shape, generator=torch.Generator().manual_seed(seed + 99)) < 0.5] = 0.0
    stats = weight_stats(w)
    expected = [
        f"{n}:{mm}"
        for n, mm in ((1, 4), (2, 4), (3, 4), (4, 8))
        if (w == 0).any() and brute_force_nm(w, n, mm)
    ]
    assert stats["nm_patterns"] == expected
    assert stats["zeros"] == sum(1 for v in w.flatten().tolist() if v == 0)


@torch.no_grad()
def known_pattern(model: LlamaForCausalLM) -> None:
    """q_proj: zero columns 0,1 of every 4 (keep 2:4); k_proj: keep only column 3 of every 4 (1:4);
    down_proj: first half of every row zero (50 %, not N:M); everything else dense."""
    for layer in model.model.layers:
        q = layer.self_attn.q_proj.weight.view(32, 8, 4)  # (out, in/4, 4)
        q[..., :2] = 0.0
        k = layer.self_attn.k_proj.weight.view(16, 8, 4)
        k[..., :3] = 0.0
        layer.mlp.down_proj.weight[:, :32] = 0.0  # (32, 64)


def test_hand_built_pattern_on_a_plain_hf_checkpoint(tmp_path):
    model = tiny_llama()
    known_pattern(model)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")  # sharded: several files to read
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["sparsity_config"] = {"format": "dense"}  # what older compressed-tensors exports carried
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    report = inspect_checkpoint(tmp_path / "ckpt")
    mods = report["modules"]
    assert len(mods) == 2 * 7 + 1  # 7 Linears per block, plus lm_head (embeddings and norms excluded)
    names = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "self_attn.v_proj")
    q, k, d, v = (mods[f"model.layers.1.{n}"] for n in names)
    assert q["sparsity"] == 0.5 and q["nm_patterns"] == ["2:4", "3:4", "4:8"]
    assert k["sparsity"] == 0.75 and k["nm_patterns"] == ["1:4", "2:4", "3:4", "4:8"]
    assert d["sparsity"] == 0.5 and d["nm_patterns"] == []
    assert v["sparsity"] == 0.0 and v["nm_patterns"] == [] and q["shape"] == [32, 32]
    zeros = 2 * (32 * 32 // 2 + 16 * 32 * 3 // 4 + 32 * 64 // 2)
    total = 2 * (32 * 32 + 2 * 16 * 32 + 32 * 32 + 3 * 64 * 32)
    assert report["overall_sparsity"] == pytest.approx(zeros / total)
    assert report["all_linear_sparsity"] == pytest.approx(zeros / (total + 128 * 32))
    assert report["nm_patterns"] == [] and report["method"] is None and not report["has_masks"]
    assert report["config_flags"] == ["sparsity_config"]
    table = format_inspection(report)
    assert "warning: config.json carries sparsity_config" in table
    assert "model.layers.1.self_attn.k_proj" in table and "1:4,2:4,3:4,4:8" in table and "75.00%" in table


def test_llmprune_folder_shows_recipe_targets_and_metrics(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.view(module.weight.shape[0], -1, 4)[..., 1::2] = 0.0  # 2:4 everywhere
    metrics = {"perplexity": {"dense": 9.5, "pruned": 10.25}}
    save_pruned(model, None, tmp_path / "out", recipe={"method": "wanda", "sparsity": "2:4"}, metrics=metrics)
    report = inspect_checkpoint(tmp_path / "out")
    assert report["method"] == "wanda" and report["target"] == "2:4" and report["has_masks"]
    assert report["recipe"] == {"method": "wanda", "sparsity": "2:4"} and report["metrics"] == metrics
    assert report["nm_patterns"] == ["2:4", "3:4", "4:8"] and report["overall_sparsity"] == 0.5
    assert report["config_flags"] == []
    assert "perplexity: dense 9.500, pruned 10.250" in format_inspection(report)


def test_gpt2_conv1d_is_read_as_out_by_in(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with torch.no_grad():  # Conv1D weight is (in=16, out=48): groups of 4 run along dim 0
        model.transformer.h[0].attn.c_attn.weight.view(4, 4, 48)[:, :2, :] = 0.0
    model.save_pretrained(tmp_path / "gpt2")
    info = inspect_checkpoint(tmp_path / "gpt2")["modules"]["transformer.h.0.attn.c_attn"]
    assert info["shape"] == [48, 16] and info["nm_patterns"] == ["2:4", "3:4", "4:8"]


def test_cli_json_and_table(tmp_path, capsys):
    model = tiny_llama()
    known_pattern(model)
    model.save_pretrained(tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    inspect_cli.register(parser.add_subparsers())
    args = parser.parse_args(["inspect", str(tmp_path / "ckpt"), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(
        json.dumps(inspect_checkpoint(tmp_path / "ckpt"))
    )
    args = parser.parse_args(["inspect", str(tmp_path / "ckpt" / "model.safetensors")])
    assert args.func(args) == 0
    assert "decoder-block matrices" in capsys.readouterr().out


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="check the path"):
        inspect_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        inspect_checkpoint(tmp_path / "empty")
