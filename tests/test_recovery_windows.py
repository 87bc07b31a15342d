"""Recovery trains on its own windows: short ones, drawn from the user's calibration text (else the built-in
recovery corpus) with another seed than the pruning's, unless the user says otherwise (recipe
``recover.*``, ``llmprune recover`` flags)."""

from __future__ import annotations

import json

import pytest
import torch
from test_harness import TEXT, tiny_lm

from llmprune.calibration.data import calibration_tokens
from llmprune.cli import main
from llmprune.errors import ConfigError
from llmprune.recipe import recipe_from_yaml
from llmprune.recovery import windows as win


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(TEXT * 4, encoding="utf-8")
    return path


def test_defaults_are_recovery_windows_not_the_calibration_ones():
    r = recipe_from_yaml("calibration: {num_calibration_samples: 8, max_seq_length: 48, seed: 3}\n")
    assert r.recover_windows_kwargs() == {"source": "recovery", "num_samples": 64, "seq_len": None, "seed": 4}
    r = recipe_from_yaml("calibration: {dataset: mine.txt}\n")  # the user's text: recovery reads it too
    assert r.recover_windows_kwargs()["source"] == "mine.txt"


def test_no_text_given_draws_from_the_builtin_recovery_corpus(monkeypatch):
    """``recovery_windows(None, …)`` (``llmprune recover`` without ``--dataset``) must not fall back to the
    calibration text alone."""
    model, tok = tiny_lm(max_positions=64)
    monkeypatch.setattr(win, "calibration_tokens", lambda source, *a, **k: source)
    assert win.recovery_windows(None, tok, model, 4, 32, 1) == "recovery"
    assert win.recovery_windows("mine.txt", tok, model, 4, 32, 1) == "mine.txt"


def test_explicit_recover_data_settings_win():
    r = recipe_from_yaml(
        "calibration: {seed: 3, dataset: a.txt}\n"
        "recover: {method: perp, num_samples: 5, max_seq_length: 40, seed: 3, dataset: b.txt}\n"
    )
    assert r.recover_windows_kwargs() == {"source": "b.txt", "num_samples": 5, "seq_len": 40, "seed": 3}


def test_fresh_windows_differ_from_the_pruning_ones(text_file):
    """Catches the seed offset lost: recovery would distil on exactly the windows the solver fitted."""
    model, tok = tiny_lm(max_positions=64)
    calib = calibration_tokens(str(text_file), tok, 6, 48, seed=0)
    w = win.window_settings(str(text_file), 6, 48, None, calibration_seed=0)
    fresh = win.recovery_windows(tokenizer=tok, model=model, **w)
    assert fresh.shape == calib.shape
    shared = {tuple(row.tolist()) for row in calib} & {tuple(row.tolist()) for row in fresh}
    assert len(shared) < len(calib)
    same = win.recovery_windows(str(text_file), tok, model, 6, 48, 0)  # the user may ask for the same
    assert torch.equal(same, calib)


def test_default_length_is_capped_by_the_model_positions(text_file):
    model, tok = tiny_lm(max_positions=64)
    ids = win.recovery_windows(str(text_file), tok, model, 3, None, 1)
    assert ids.shape == (3, 64)  # 256 by default, the model has 64 positions
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        win.recovery_windows(str(text_file), tok, model, 3, 65, 1)


def test_recover_cli_draws_other_windows_than_its_seed(tmp_path, text_file, capsys, monkeypatch):
    """``llmprune recover --seed 0`` must not train on ``llmprune prune --seed 0``'s windows."""
    import llmprune.cli.recover as cli_recover

    model, tok = tiny_lm(max_positions=64)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    seen = {}

    def spy(source, tokenizer, m, num, seq_len, seed):
        seen["seed"], seen["num"] = seed, num
        return calibration_tokens(source, tokenizer, num, seq_len or 32, seed)

    monkeypatch.setattr(cli_recover, "recovery_windows", spy)
    args = ["recover", "--model", str(folder), "--dataset", str(text_file), "--recover_steps", "1"]
    assert main([*args, "--skip_eval", "--max_seq_length", "32", "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert seen == {"seed": 1, "num": 64}


def test_recover_cli_with_a_budget_and_a_teacher_draws_the_pool(tmp_path, text_file, capsys):
    """``llmprune recover --dense_model D --recover_max_seconds T``: the teacher pass takes up to
    MAX_WINDOWS windows for a fifth of T (a tiny model gets through more than 64), and the saved recipe
    names the count it trained on."""
    import yaml

    model, tok = tiny_lm(max_positions=64)
    folder, out = tmp_path / "m", tmp_path / "out"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    args = ["recover", "--model", str(folder), "--dense_model", str(folder), "--dataset", str(text_file)]
    args += ["--recover_steps", "1", "--recover_max_seconds", "60", "--max_seq_length", "32"]
    assert main([*args, "--skip_eval", "--output_dir", str(out), "--json"]) == 0
    windows = json.loads(capsys.readouterr().out)["recovery"]["options"]["windows"]
    assert win.NUM_WINDOWS < windows <= win.MAX_WINDOWS
    assert yaml.safe_load((out / "recipe.yaml").read_text())["recover"]["num_samples"] == windows


def test_recovery_window_longer_than_the_model_fails_before_loading(tmp_path, text_file, capsys, monkeypatch):
    """Checked with the recipe, not after the dense scoring and the pruning."""
    import llmprune

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad window length was refused")

    model, tok = tiny_lm(max_positions=64)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    args = ["prune", "--model", str(folder), "--dataset", str(text_file), "--recover", "perp"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recover: {max_seq_length: 65}\n", encoding="utf-8")
    monkeypatch.setattr(llmprune, "load_model", no_loading)
    assert main([*args, "--recipe", str(recipe), "--skip_eval"]) == 2
    err = capsys.readouterr().err
    assert "recover.max_seq_length 65 exceeds the model's 64 positions" in err


@pytest.mark.parametrize(
    ("recover", "teacher_s", "windows"),
    [
        ("{method: perp, recover_max_seconds: 600}", 120.0, win.MAX_WINDOWS),  # time-budgeted distillation
        ("{method: perp, recover_max_seconds: 600, num_samples: 32}", None, 32),  # the user's count
        ("{method: perp, recover_steps: 50}", None, win.NUM_WINDOWS),  # steps, not time
        ("{method: perp, recover_max_seconds: 600, distill: 0}", None, win.NUM_WINDOWS),  # no teacher pass
        ("{method: perp, recover_max_seconds: 600, options: {teacher_top_k: null}}", None, win.NUM_WINDOWS),
        ("{method: lift, recover_max_seconds: 600}", 120.0, win.MAX_WINDOWS),  # measured for LIFT too
        ("{method: full, recover_max_seconds: 600}", None, win.NUM_WINDOWS),  # not measured for full
    ],
)
def test_a_time_budget_buys_windows_only_for_the_teacher_pass(recover, teacher_s, windows) -> None:
    recipe = recipe_from_yaml(f"recover: {recover}\n")
    assert recipe.teacher_seconds() == teacher_s
    assert recipe.recover_windows_kwargs()["num_samples"] == windows
