"""Recipes: validation with fixes, CLI > recipe > defaults, and exact round trips."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from llmprune import api
from llmprune.errors import ConfigError
from llmprune.recipe import Recipe, load_recipe, recipe_from_yaml, resolve_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {
        "wanda-50.yaml",
        "wanda-2of4.yaml",
        "sparsegpt-50.yaml",
        "sparsegpt-2of4.yaml",
        "icbs-60.yaml",
        "magnitude-50-perp.yaml",
        "magnitude-global-50.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_round_trip(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe_from_yaml(recipe.to_yaml()) == recipe
    saved = recipe.save(tmp_path / "out" / "recipe.yaml")
    assert load_recipe(saved) == recipe
    assert not [p for p in saved.parent.iterdir() if p.name != "recipe.yaml"]  # no temp files left


def test_defaults_match_the_api():
    """One vocabulary: every key prune_kwargs() emits is a keyword of api.prune with the same default."""
    params = inspect.signature(api.prune).parameters
    for key, value in Recipe().prune_kwargs().items():
        assert key in params, key
        assert params[key].default == value, key


def test_sections_and_values():
    r = recipe_from_yaml(
        """
version: 1
model: my/model
calibration: {num_calibration_samples: 4, max_seq_length: 32, seed: 7}
prune:
  method: magnitude
  sparsity: 50%
  targets: mlp
  overrides: {"re:layers\\\\.0\\\\.": 2:4, q_proj: "0.25"}
  options: {scope: global}
recover: {method: perp, recover_steps: 3, lr: 1e-4, options: {r: 4}}
eval: {tasks: [llmprune_mc], limit: 0.5}
"""
    )
    assert r.model.name == "my/model"
    assert r.prune.sparsity == 0.5
    assert r.prune.targets == ["mlp"]
    assert r.prune.overrides == {"re:layers\\.0\\.": "2:4", "q_proj": 0.25}  # unquoted 2:4 is not 124
    assert r.recover.lr == 1e-4 and isinstance(r.recover.lr, float)  # YAML 1.1 would read a string
    kw = r.prune_kwargs()
    assert kw["scope"] == "global" and kw["seed"] == 7 and kw["num_calibration_samples"] == 4
    assert r.recover_kwargs() == {
        "method": "perp",
        "steps": 3,
        "max_seconds": None,
        "lr": 1e-4,
        "mode": "retrain",
        "distill": None,
        "batch_size": 4,
        "seed": 7,
        "r": 4,
    }
    # recovery draws its own windows: 64 by default, other than the pruning's (seed 7 + 1)
    assert r.recover_windows_kwargs() == {"source": "recovery", "num_samples": 64, "seq_len": None, "seed": 8}
    assert r.lm_eval_kwargs()["limit"] == 0.5 and r.lm_eval_kwargs()["batch_size"] == 8
    assert r.perplexity_kwargs() == {"dataset": None, "max_seq_length": 32, "limit": None, "batch_size": 2}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("prune: {sparsty: 0.5}", "did you mean 'sparsity'"),
        ("prune: {seed: 3}", "belongs under `calibration:`"),
        ("calibraton: {seed: 3}", "did you mean 'calibration'"),
        ("prune: {method: wandaa}", "did you mean 'wanda'"),
        ("prune: {method: 'mypkg.solvers:prune'}", "recipes never"),
        ("prune: {method: mypkg.solvers.prune}", "never import code"),
        ("model: {name: 'os:system'}", "import path"),
        ("prune: {method: !!python/name:os.system }", "not allowed"),
        ("prune: {method: wanda, options: {block_size: 64}}", "has no option 'block_size'"),
        ("prune: {method: magnitude, options: {scop: global}}", "did you mean 'scope'"),
        ("prune: {sparsity: 50}", "did you mean a fraction"),
        ("prune: {sparsity: '3:2'}", "0 < N < M"),
        ("prune: {batch_size: 0}", "must be >= 1"),
        ("prune: {true_sequential: 1}", "true or false"),
        ("prune: {overrides: {'re:(': 0.5}}", "bad regular expression"),
        ("calibration: {num_calibration_samples: 2.5}", "expected an integer"),
        ("recover: {method: prep}", "did you mean 'perp'"),
        ("recover: {method: perp, options: {rank: 4}}", "unknown option 'rank'"),
        ("recover: {method: lift, options: {steps: 4}}", "in the recover section itself"),
        ("recover: {method: perp, distill: 2}", "recover.distill: must be in [0, 1]"),
        ("recover: {method: perp, mode: reconstruct, distill: 1}", "set it to 0 for reconstruct"),
        ("recover: {method: perp, options: {micro_batch: 2}}", "retrain's step is batch_size"),
        ("recover: {method: perp, mode: reconstruct, options: {micro_batch: 0}}", "whole number of windows"),
        ("eval: {limit: 1.5}", "fraction in (0, 1)"),
        ("version: 2", "recipe version 1"),
        ("prune: {method: wanda}\nprune: {method: magnitude}", "given twice"),
        ("prune: [wanda]", "expected a mapping"),
        ("prune: {method: wanda", "not valid YAML"),
    ],
)
def test_bad_recipes_name_the_fix(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, text))
    assert needle in str(err.value)


def test_python_tags_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    text = f'prune:\n  method: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(ConfigError, match="not allowed"):
        load_recipe(_write(tmp_path, text))
    assert not marker.exists()


def test_precedence_cli_over_recipe_over_defaults(tmp_path):
    path = _write(
        tmp_path,
        "prune: {method: sparsegpt, batch_size: 2, options: {block_size: 64}}\ncalibration: {seed: 3}",
    )
    flags = {
        "recipe": str(path),
        "method": None,
        "seed": 5,
        "sparsity": "2:4",
        "option": ["dampening_frac=0.1"],
    }
    r = resolve_recipe(flags, command="prune")
    assert r.prune.method == "sparsegpt"  # recipe (flag not given)
    assert r.calibration.seed == 5  # CLI
    assert r.prune.sparsity == "2:4"  # CLI, canonical
    assert r.prune.batch_size == 2  # recipe
    assert r.calibration.num_calibration_samples is None  # default: sized to the device at run time
    assert r.prune.options == {"block_size": 64, "dampening_frac": 0.1}  # merged, typed
    # `llmprune eval --batch_size` is the evaluation batch size, `--output_path` the output folder
    r = resolve_recipe({"recipe": str(path), "batch_size": 16, "output_path": "o", "tasks": "a, b"}, "eval")
    assert (r.prune.batch_size, r.eval.batch_size, r.output_dir, r.eval.tasks) == (2, 16, "o", ["a", "b"])
    # `llmprune recover --method lift --batch_size 3 --warmup_ratio 0 --option rank=4`
    flags = {"method": "lift", "batch_size": 3, "warmup_ratio": 0.0, "option": ["rank=4"], "seed": 9}
    r = resolve_recipe({"recipe": str(path), **flags}, "recover")
    assert (r.prune.method, r.recover.method, r.recover.batch_size, r.recover.seed) == (
        "sparsegpt",
        "lift",
        3,
        9,
    )
    assert r.recover.options == {"warmup_ratio": 0.0, "rank": 4} and r.calibration.seed == 3
    assert r.recover_kwargs()["rank"] == 4 and r.recover_kwargs()["seed"] == 9


def test_recover_dataset_flag_sets_the_recovery_text_and_is_checked_before_loading(tmp_path):
    """``llmprune prune --recover perp --recover_dataset F``: recovery draws its windows from F, not from
    the calibration text, and a missing F fails before any model is loaded."""
    from llmprune.errors import DataError
    from llmprune.preflight import check_recipe

    text = tmp_path / "domain.txt"
    text.write_text("Some text of the domain the model will read.\n" * 50, encoding="utf-8")
    r = resolve_recipe({"recover": "perp", "recover_dataset": str(text), "dataset": "calibration"}, "prune")
    assert r.recover.dataset == str(text) and r.calibration.dataset == "calibration"
    assert r.recover_windows_kwargs()["source"] == str(text)
    r = resolve_recipe({"recover": "perp", "recover_dataset": str(tmp_path / "missing.txt")}, "prune")
    with pytest.raises(DataError, match="recover.dataset .*missing.txt does not exist"):
        check_recipe(r)


def test_with_overrides():
    r = Recipe().with_overrides({"prune.method": "magnitude", "prune.options.scope": "global", "model": "m"})
    assert (r.prune.method, r.prune.options, r.model.name) == ("magnitude", {"scope": "global"}, "m")
    with pytest.raises(ConfigError, match="did you mean 'sparsity'"):
        Recipe().with_overrides({"prune.sparsty": 0.3})
    with pytest.raises(ConfigError, match="is a section"):
        Recipe().with_overrides({"prune": {"method": "wanda"}})
    with pytest.raises(ConfigError, match="has no option"):  # switching method re-validates the options
        Recipe().with_overrides({"prune.method": "magnitude", "prune.options.block_size": 4})


def test_option_clashing_with_a_prune_setting_is_refused():
    r = Recipe()
    r.prune.options = {"seed": 1}  # bypasses validation on purpose
    with pytest.raises(ConfigError, match="not solver options"):
        r.prune_kwargs()


@pytest.mark.parametrize("command", ["prune", "eval", "sweep", "recover"])
def test_every_cli_flag_is_a_recipe_key(command):
    """One vocabulary: each flag of a subcommand maps to a recipe key (or is about the run itself)."""
    import argparse
    import importlib

    from llmprune.recipe import FLAG_KEYS, FLAG_KEYS_BY_COMMAND

    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(f"llmprune.cli.{command}").register(sub)
    dests = {a.dest for a in sub.choices[command]._actions}
    about_the_run = {"help", "recipe", "option", "json", "skip_eval", "sparsities", "no_dense", "dense_model"}
    about_the_run |= {"checkpoint_dir", "resume", "overwrite"}  # this run's progress and output
    about_the_run |= {"bench"}  # timing the result, not how it prunes
    known = set(FLAG_KEYS) | set(FLAG_KEYS_BY_COMMAND.get(command, {})) | about_the_run
    assert dests - known == set()


def test_micro_batch_reaches_fused_recovery(tmp_path):
    text = "recover: {method: lift, mode: reconstruct, options: {micro_batch: 2}}"
    fused = load_recipe(_write(tmp_path, text)).fused_recover_kwargs()
    assert fused["recover"] == "lift" and fused["recover_options"]["micro_batch"] == 2
