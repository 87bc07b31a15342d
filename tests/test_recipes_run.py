"""Every shipped recipe runs on a tiny model; a recipe-driven prune is scored by lm-eval offline; the
``eval`` and ``sweep`` subcommands run end to end; a bad recipe stops before any model is loaded."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
from test_harness import TEXT, tiny_lm

from llmprune import api
from llmprune.calibration.data import calibration_tokens
from llmprune.errors import ConfigError
from llmprune.evaluation.harness import lm_eval_scores
from llmprune.evaluation.perplexity import perplexity
from llmprune.recipe import load_recipe, recipe_from_yaml
from llmprune.reports import write_report
from llmprune.spec import SparsitySpec

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
TINY = {
    "calibration.num_calibration_samples": 2,
    "calibration.max_seq_length": 16,
    "prune.batch_size": 2,
    "recover.recover_steps": 2,
    "recover.num_samples": 2,
    "recover.max_seq_length": 16,
    "recover.batch_size": 2,
    "eval.limit": 4,
    "eval.eval_limit": 2,
    "eval.max_seq_length": 32,
}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def block_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    }


def check_sparsity(weights: dict[str, torch.Tensor], target: float | str) -> None:
    """Counted on the model's weights, not taken from the pruning report."""
    spec = SparsitySpec.parse(target)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros / total == pytest.approx(spec.sparsity, abs=0.02)
    if spec.pattern:
        for name, w in weights.items():
            kept = (w != 0).reshape(w.shape[0], -1, spec.pattern.m).sum(-1)  # (out, groups)
            assert int(kept.max()) <= spec.pattern.n, name


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_runs(path, text_file):
    recipe = load_recipe(path).with_overrides({**TINY, "calibration.dataset": str(text_file)})
    model, tok = tiny_lm()
    dense = copy.deepcopy(model) if recipe.recover.needs_dense_model else None  # distillation's teacher
    result = api.prune(model, tok, **recipe.prune_kwargs(), progress=False)
    pruned = block_weights(model)
    check_sparsity(pruned, recipe.prune.sparsity)
    assert result.overall_sparsity == pytest.approx(
        recipe.prune.sparsity if isinstance(recipe.prune.sparsity, float) else 0.5, abs=0.02
    )
    if recipe.recover.method:
        from llmprune.recovery import recover

        ids = calibration_tokens(tokenizer=tok, **recipe.recover_windows_kwargs())
        assert ids.shape == (2, 16)
        report = recover(model, input_ids=ids, dense_model=dense, **recipe.recover_kwargs())
        assert report.steps_done == 2
        after = block_weights(model)
        assert all(torch.equal(after[n] == 0, pruned[n] == 0) for n in pruned)  # every zero survived
        assert any(not torch.equal(after[n], pruned[n]) for n in pruned)  # and training changed something


def test_recipe_prune_then_lm_eval_offline(text_file, tmp_path):
    """End to end: a recipe prunes a tiny model, lm-eval scores it on the shipped task, reports follow."""
    recipe = recipe_from_yaml(
        f"""
version: 1
calibration: {{dataset: {json.dumps(str(text_file))}, num_calibration_samples: 2, max_seq_length: 16,
              seed: 1}}
prune: {{method: wanda, sparsity: "2:4", batch_size: 2}}
eval: {{tasks: [llmprune_mc], limit: 4, eval_dataset: {json.dumps(str(text_file))}, eval_limit: 2,
        max_seq_length: 32}}
output_dir: {json.dumps(str(tmp_path / "out"))}
"""
    )
    model, tok = tiny_lm()
    dense = perplexity(model, tok, **recipe.perplexity_kwargs(), progress=False)
    result = api.prune(model, tok, **recipe.prune_kwargs(), progress=False)
    check_sparsity(block_weights(model), "2:4")
    ppl = perplexity(model, tok, **recipe.perplexity_kwargs(), progress=False)
    assert ppl["ppl"] != dense["ppl"]
    scores = lm_eval_scores(model, tok, **recipe.lm_eval_kwargs())
    mc = scores["tasks"]["llmprune_mc"]
    assert mc["num_samples"] == 4  # limit: 4 documents, so each accuracy is a count of 4
    assert all(float(4 * mc[k]).is_integer() and 0 <= mc[k] <= 1 for k in ("acc", "acc_norm"))
    assert scores["config"]["seed"] == 1
    written = write_report(
        recipe.output_dir,
        {
            "model": "tiny",
            "recipe": recipe.to_dict(),
            "perplexity": {"dense": dense, "pruned": ppl},
            "lm_eval": scores,
        },
        prune_result=result,
    )
    record = json.loads(written["results"].read_text())
    assert record["lm_eval"]["tasks"]["llmprune_mc"]["acc"] == mc["acc"]
    assert recipe_from_yaml(json.dumps(record["recipe"])) == recipe  # the saved recipe reproduces the run


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    model, tok = tiny_lm(max_positions=64)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(command: str, argv: list[str]) -> int:
    """Parse and run one subcommand the way ``llmprune.cli.main`` does (without its COMMANDS list)."""
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(f"llmprune.cli.{command}").register(parser.add_subparsers())
    args = parser.parse_args([command, *argv])
    return args.func(args)


def test_cli_eval(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "--model",
        str(model_dir),
        "--tasks",
        "llmprune_mc",
        "--limit",
        "4",
        "--eval_dataset",
        str(text_file),
        "--max_seq_length",
        "32",
        "--eval_limit",
        "2",
        "--batch_size",
        "2",
        "--output_path",
        str(out),
    ]
    assert _run("eval", argv) == 0
    assert "llmprune_mc acc" in capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    from llmprune.io.models import load_model

    model, tok = load_model(str(model_dir), device="cpu")
    direct = perplexity(model, tok, str(text_file), 32, limit=2, batch_size=2, progress=False)
    assert record["perplexity"]["ppl"] == pytest.approx(direct["ppl"])
    assert record["lm_eval"]["tasks"]["llmprune_mc"]["num_samples"] == 4
    assert load_recipe(out / "recipe.yaml").eval.batch_size == 2
    assert (out / "results.md").is_file()


def test_cli_sweep(model_dir, text_file, tmp_path):
    out = tmp_path / "sweep"
    argv = [
        "--model",
        str(model_dir),
        "--method",
        "magnitude",
        "--sparsities",
        "0.25,0.5,2:4",
        "--dataset",
        str(text_file),
        "--num_calibration_samples",
        "2",
        "--max_seq_length",
        "16",
        "--eval_dataset",
        str(text_file),
        "--eval_max_seq_length",
        "32",
        "--eval_limit",
        "2",
        "--output_dir",
        str(out),
    ]
    assert _run("sweep", argv) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["sparsity"] for p in sweep["points"]] == [0.25, 0.5, "2:4"]
    assert [p["achieved_sparsity"] for p in sweep["points"]] == pytest.approx([0.25, 0.5, 0.5], abs=0.02)
    from llmprune.io.models import load_model

    model, tok = load_model(str(model_dir), device="cpu")
    dense = perplexity(model, tok, str(text_file), 32, limit=2, batch_size=8, progress=False)
    assert sweep["dense"]["ppl"] == pytest.approx(dense["ppl"])  # measured before any pruning
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 2:4 |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize(
    "text",
    ["prune: {methd: wanda}", "prune: {method: wandda}", "prune: {method: 'evil.module:run'}"],
)
def test_bad_recipe_loads_no_model(text, tmp_path, monkeypatch):
    import llmprune.io.models

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad recipe")

    monkeypatch.chdir(tmp_path)  # where sweep's default output folder would appear
    monkeypatch.setattr(llmprune.io.models, "load_model", no_load)
    monkeypatch.setattr("llmprune.load_model", no_load)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for command, extra in (("eval", []), ("sweep", ["--sparsities", "0.5"])):
        with pytest.raises(ConfigError):
            _run(command, ["--recipe", str(path), *extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written
