"""`llmprune prune` on a tiny local checkpoint: flags, recipe precedence, table, saved folder."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_TEXT, make_model

from llmprune.cli import main


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    return folder, text


def _args(folder, text, *extra):
    return [
        "prune",
        "--model",
        str(folder),
        "--dataset",
        str(text),
        "--eval_dataset",
        str(text),
        "--num_calibration_samples",
        "4",
        "--max_seq_length",
        "16",
        "--eval_limit",
        "4",
        *extra,
    ]


def test_prune_prints_table_and_saves(tiny_checkpoint, tmp_path, capsys):
    folder, text = tiny_checkpoint
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(_args(folder, text, "--sparsity", "2:4", "--output_dir", str(out))) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "50.00%" in table and f"saved to {out}" in table
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # input model untouched
    assert (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    info = json.loads((out / "sparsity.json").read_text())
    assert info["overall_sparsity"] == pytest.approx(0.5)


def test_json_summary_and_solver_options(tiny_checkpoint, capsys):
    folder, text = tiny_checkpoint
    assert (
        main(
            _args(
                folder,
                text,
                "--method",
                "magnitude",
                "--option",
                "scope=global",
                "--option",
                "min_density=0.2",
                "--sparsity",
                "0.6",
                "--json",
            )
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert summary["perplexity"]["pruned"]["ppl"] > 0


def test_recipe_then_flags_override(tiny_checkpoint, tmp_path, capsys):
    folder, text = tiny_checkpoint
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nprune:\n  method: magnitude\n  sparsity: '1:4'\n")
    assert main(_args(folder, text, "--recipe", str(recipe), "--json", "--skip_eval")) == 0
    assert json.loads(capsys.readouterr().out)["achieved_sparsity"] == pytest.approx(0.75)
    assert (
        main(_args(folder, text, "--recipe", str(recipe), "--sparsity", "3:4", "--json", "--skip_eval")) == 0
    )
    assert json.loads(capsys.readouterr().out)["achieved_sparsity"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--method", "wnda"], "did you mean 'wanda'"),
        (["--sparsity", "1.5"], "[0, 1)"),
        (["--sparsity", "3:5"], "not divisible by M=5"),
        (["--option", "blok_size=3", "--method", "magnitude"], "no option 'blok_size'"),
    ],
)
def test_bad_input_exits_2_with_the_fix(tiny_checkpoint, capsys, flags, message):
    folder, text = tiny_checkpoint
    assert main(_args(folder, text, "--skip_eval", *flags)) == 2
    assert message in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["prune", "--model", str(tmp_path / "nowhere.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tiny_model_weights_really_pruned(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, text = tiny_checkpoint
    out = tmp_path / "o"
    assert main(_args(folder, text, "--skip_eval", "--output_dir", str(out))) == 0
    w = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.down_proj.weight
    assert int((w == 0).sum()) == w.numel() // 2 and not torch.signbit(w[w == 0]).any()
