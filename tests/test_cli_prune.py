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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.evaluation.perplexity import perplexity

    dense = AutoModelForCausalLM.from_pretrained(folder).eval()  # the CLI's dense score, measured apart
    tok = AutoTokenizer.from_pretrained(folder)
    expected = perplexity(dense, tok, str(text), 16, limit=4, progress=False)
    assert summary["perplexity"]["dense"]["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    assert summary["perplexity"]["pruned"]["ppl"] != pytest.approx(expected["ppl"], rel=1e-3)


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


# ---------------------------------------------------------------- large models


def _weights_and_masks(folder):
    from transformers import AutoModelForCausalLM

    from llmprune.io.save import load_keep_masks

    return AutoModelForCausalLM.from_pretrained(folder).state_dict(), load_keep_masks(folder)


def _assert_same_checkpoint(a, b) -> None:
    (state_a, masks_a), (state_b, masks_b) = _weights_and_masks(a), _weights_and_masks(b)
    assert state_a.keys() == state_b.keys() and masks_a.keys() == masks_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


def test_streaming_writes_the_model_pruning_in_memory_writes(tiny_checkpoint, tmp_path, capsys):
    folder, text = tiny_checkpoint
    streamed, in_memory = tmp_path / "streamed", tmp_path / "in-memory"
    flags = ["--sparsity", "2:4", "--max_memory", "1KiB", "--offload_dir", str(tmp_path / "acts")]
    assert main(_args(folder, text, *flags, "--streaming", "--output_dir", str(streamed))) == 0
    table = capsys.readouterr().out
    assert "50.00%" in table and f"saved to {streamed}" in table and "perplexity" not in table
    assert main(_args(folder, text, *flags, "--skip_eval", "--output_dir", str(in_memory))) == 0
    _assert_same_checkpoint(streamed, in_memory)
    recipe = (streamed / "recipe.yaml").read_text()
    assert "streaming: true" in recipe and "max_memory: 1KiB" in recipe  # it reproduces the run
    assert json.loads((streamed / "run_info.json").read_text())["streaming"] is True


def test_killed_run_continues_with_resume(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from llmprune.calibration import resume

    folder, text = tiny_checkpoint
    out, plain = tmp_path / "out", tmp_path / "plain"
    assert main(_args(folder, text, "--skip_eval", "--output_dir", str(plain))) == 0
    real = resume.Progress.save_block

    def crash_after_block_0(self, index, *args, **kwargs):
        real(self, index, *args, **kwargs)
        if index == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(resume.Progress, "save_block", crash_after_block_0)
        with pytest.raises(KeyboardInterrupt):
            main(_args(folder, text, "--skip_eval", "--output_dir", str(out), "--resume"))
    progress = resume.default_checkpoint_dir(out)
    assert (progress / "state.json").is_file()
    capsys.readouterr()
    assert (
        main(_args(folder, text, "--skip_eval", "--output_dir", str(out), "--checkpoint_dir", str(progress)))
        == 2
    )
    assert "--resume" in capsys.readouterr().err
    assert main(_args(folder, text, "--skip_eval", "--output_dir", str(out), "--resume")) == 0
    assert not progress.exists(), "progress is removed once the run is saved"
    _assert_same_checkpoint(out, plain)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--streaming"], "needs output_dir"),
        (["--streaming", "--output_dir", "o", "--recover", "perp"], "llmprune recover --model OUT"),
        (["--max_memory", "lots"], "cannot read memory size 'lots'"),
        (["--offload_dir", "acts"], "set calibration.max_memory too"),
        (["--resume"], "needs checkpoint_dir"),
    ],
)
def test_impossible_large_model_flags_exit_2_with_the_fix(tiny_checkpoint, capsys, flags, message):
    folder, text = tiny_checkpoint
    assert main(_args(folder, text, "--skip_eval", *flags)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--distill", "0.5"], ["--recover_mode", "reconstruct"]])
def test_recovery_that_needs_the_dense_model_gets_a_copy(tiny_checkpoint, capsys, extra):
    """Distillation (the default) and reconstruction take targets from the model as it was before pruning."""
    folder, text = tiny_checkpoint
    args = _args(folder, text, "--recover", "perp", "--recover_steps", "2", *extra, "--json")
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["recovery"]["mode"] == ("reconstruct" if "reconstruct" in extra else "retrain")
    assert summary["recovery"]["steps_done"] >= 2  # reconstruct makes its steps per block
    expected = 0.0 if "reconstruct" in extra else float(extra[1]) if extra else 1.0  # default: distil
    assert summary["recovery"]["options"]["distill"] == expected


def test_a_time_budget_distils_on_more_windows_and_the_recipe_names_them(tiny_checkpoint, capsys, tmp_path):
    """``--recover_max_seconds`` with distillation: the teacher pass takes its windows from a pool of
    MAX_WINDOWS for a fifth of the budget (a tiny model gets through all of them), not the 64 of a
    step-counted run, and the saved recipe names the count so a rerun trains on as many."""
    import yaml

    from llmprune.recovery.windows import MAX_WINDOWS, NUM_WINDOWS

    folder, text = tiny_checkpoint
    out = tmp_path / "out"
    budget = ["--recover", "perp", "--recover_steps", "2", "--recover_max_seconds", "60"]
    assert main(_args(folder, text, "--skip_eval", *budget, "--output_dir", str(out), "--json")) == 0
    windows = json.loads(capsys.readouterr().out)["recovery"]["options"]["windows"]
    assert NUM_WINDOWS < windows <= MAX_WINDOWS
    assert yaml.safe_load((out / "recipe.yaml").read_text())["recover"]["num_samples"] == windows
    assert (
        main(_args(folder, text, "--skip_eval", "--recover", "perp", "--recover_steps", "2", "--json")) == 0
    )
    assert json.loads(capsys.readouterr().out)["recovery"]["options"]["windows"] == NUM_WINDOWS


def test_distilling_recovery_keeps_no_dense_copy(tiny_checkpoint, capsys, monkeypatch):
    """Catches ``prune --recover`` going back to a deep-copied live teacher (the model twice in memory):
    the dense model's top-k targets are computed before pruning instead."""
    import types

    import llmprune.cli.prune as cli_prune

    def no_copy(obj, memo=None):
        raise AssertionError("a dense copy was made")

    monkeypatch.setattr(cli_prune, "copy", types.SimpleNamespace(deepcopy=no_copy))
    folder, text = tiny_checkpoint
    assert main(_args(folder, text, "--recover", "perp", "--recover_steps", "2", "--json")) == 0
    options = json.loads(capsys.readouterr().out)["recovery"]["options"]
    assert options["teacher_top_k"] == 64 and options["distill"] == 1.0


def test_recover_distill_without_a_teacher_fails_before_loading(tmp_path, capsys):
    assert main(["recover", "--model", str(tmp_path / "missing"), "--distill", "0.5"]) == 2
    assert "--distill needs --dense_model" in capsys.readouterr().err  # not "model not found"
    args = ["recover", "--model", str(tmp_path / "missing"), "--option", "hidden_distill=1"]
    assert main(args) == 2
    assert "hidden_distill needs --dense_model" in capsys.readouterr().err
