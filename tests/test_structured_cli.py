"""`llmprune prune --structure`, `llmprune bench`, the recipe key and the timing module."""

from __future__ import annotations

import json
import statistics

import pytest
import test_cli_prune
import torch
import transformers
from conftest import make_model

from llmprune.cli import main
from llmprune.errors import ConfigError
from llmprune.evaluation.speed import compare_speed, speedups
from llmprune.recipe import Recipe, load_recipe

tiny_checkpoint = test_cli_prune.tiny_checkpoint  # the same tiny local checkpoint fixture


def _args(folder, text, *extra):
    return [
        "prune", "--model", str(folder), "--dataset", str(text), "--eval_dataset", str(text),
        "--num_calibration_samples", "4", "--max_seq_length", "16", "--eval_limit", "4", *extra,
    ]  # fmt: skip


def test_cli_structure_saves_a_smaller_plain_checkpoint(tiny_checkpoint, tmp_path, capsys):
    folder, text = tiny_checkpoint
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = _args(folder, text, "--structure", "width", "--sparsity", "0.3", "--output_dir", str(out))
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "block parameters removed" in table and f"saved to {out}" in table
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # input model untouched
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    # block: attention 3072 + MLP 6144 + norms 64 = 9280; 30 % = 2784 = 29 channels of 96
    # -> 64 - 29 = 35 kept, rounded down to a multiple of 8
    assert model.config.intermediate_size == 32
    assert (out / "model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size
    assert json.loads((out / "structure.json").read_text())["structure"] == "width"
    assert load_recipe(out / "recipe.yaml").prune.structure == "width"  # the run can be reproduced


def test_cli_auto_records_predicted_and_measured_speed(tiny_checkpoint, tmp_path, capsys):
    """auto's structure.json holds the target and the predicted speed-up; ``bench --write`` adds the
    measured one there, in run_info.json and on the card. Catches a measurement that only reaches
    run_info.json (the card would keep saying nothing about speed) or one that drops the prediction."""
    folder, text = tiny_checkpoint
    out = tmp_path / "out"
    args = _args(folder, text, "--structure", "auto", "--sparsity", "0.3", "--output_dir", str(out))
    assert main([*args, "--skip_eval"]) == 0
    doc = json.loads((out / "structure.json").read_text())
    assert doc["speed"]["min_decode_speedup"] == 1.25 and "decode" in doc["speed"]["time_model"]
    assert set(doc["speed"]["predicted"]) == {"prefill", "decode"}
    assert "Measured speed-up" not in (out / "README.md").read_text()
    capsys.readouterr()
    bench = ["bench", "--model", str(out), "--baseline", str(folder), "--prefill_batch", "1"]
    assert main([*bench, "--prefill_length", "8", "--new_tokens", "2", "--repeats", "1", "--write"]) == 0
    doc2 = json.loads((out / "structure.json").read_text())
    assert set(doc2["speed"]["measured"]) == {"prefill", "decode"}
    assert doc2["speed"]["time_model"] == doc["speed"]["time_model"]  # the prediction is kept
    assert json.loads((out / "run_info.json").read_text())["speed"]["speedup"] == doc2["speed"]["measured"]
    card = (out / "README.md").read_text()
    assert "Measured speed-up" in card and "Structure removed" in card


def test_cli_explicit_shape_options(tiny_checkpoint, capsys):
    folder, text = tiny_checkpoint
    args = _args(
        folder, text, "--structure", "auto", "--option", "num_hidden_layers=1", "--option",
        "intermediate_size=32", "--skip_eval", "--json",
    )  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["num_hidden_layers"] == 1 and summary["config"]["intermediate_size"] == 32


def test_cli_refuses_bad_structured_requests_before_loading(tiny_checkpoint, tmp_path, capsys):
    folder, text = tiny_checkpoint
    out = tmp_path / "out"
    code = main(_args(folder, text, "--structure", "heads", "--sparsity", "0.9", "--output_dir", str(out)))
    assert code == 2 and "heads alone can remove at most" in capsys.readouterr().err
    assert not out.exists()
    code = main(_args(folder, text, "--structure", "width", "--method", "sparsegpt"))
    assert code == 2 and "does not apply to --structure width" in capsys.readouterr().err
    code = main(_args(folder, text, "--structure", "width", "--ignore", "mlp.down_proj"))
    assert code == 2 and "select Linears to mask" in capsys.readouterr().err
    code = main(_args(folder, text, "--structure", "depth", "--streaming"))
    assert code == 2 and "rebuilds the whole model in memory" in capsys.readouterr().err
    code = main(_args(folder, text, "--structure", "depth", "--checkpoint_dir", str(tmp_path / "ck")))
    assert code == 2 and "no partial state to resume" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_recipe_structure_key_round_trips():
    recipe = Recipe.from_dict({"prune": {"structure": "depth", "sparsity": 0.25, "method": "angular"}})
    assert recipe.prune.structure == "depth"
    assert Recipe.from_dict(recipe.to_dict()).prune.structure == "depth"
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        Recipe.from_dict({"prune": {"structure": "depht"}})
    with pytest.raises(ConfigError, match="unknown structured option"):
        Recipe.from_dict({"prune": {"structure": "width", "options": {"block_size": 3}}})


def test_compare_speed_and_bench_cli(tmp_path, capsys, tiny_tokenizer):
    small, big = make_model("llama"), make_model("llama", seed=1)
    models = {"a": big, "b": small}
    speeds = compare_speed(models, prefill_batch=2, prefill_length=8, new_tokens=4, repeats=3)
    assert set(speeds) == {"a", "b"}
    for s in speeds.values():
        assert len(s.prefill_seconds) == 3 and len(s.decode_seconds) == 3
        assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0 and s.peak_mib >= s.weights_mib > 0
    # tokens/s from the medians of the timed seconds, and speed-ups as ratios of the two models' medians
    a, b = speeds["a"], speeds["b"]
    assert b.prefill_tokens_per_s == pytest.approx(2 * 8 / statistics.median(b.prefill_seconds))
    assert b.decode_tokens_per_s == pytest.approx(4 / statistics.median(b.decode_seconds))
    stored = [*small.parameters(), *small.buffers()]  # parameters() lists tied weights once
    assert b.weights_mib == pytest.approx(sum(t.numel() * t.element_size() for t in stored) / 2**20)
    up = speedups(speeds, "a")
    assert up["a"] == {"prefill": 1.0, "decode": 1.0}
    medians = [statistics.median(s.decode_seconds) for s in (a, b)]
    assert up["b"]["decode"] == pytest.approx(medians[0] / medians[1])
    folder = tmp_path / "m"
    small.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (folder / "run_info.json").write_text(json.dumps({"source_model": str(folder)}))
    args = [
        "bench",
        "--model",
        str(folder),
        "--prefill_batch",
        "1",
        "--prefill_length",
        "8",
        "--new_tokens",
        "2",
    ]
    assert main([*args, "--repeats", "1", "--write", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["speedup"]) == {"prefill", "decode"}
    assert json.loads((folder / "run_info.json").read_text())["speed"]["settings"]["repeats"] == 1
    assert main([*args, "--repeats", "0"]) == 2


def test_structured_prune_is_deterministic():
    from llmprune.structured.pipeline import prune_structured

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    runs = [
        prune_structured(
            make_model("llama"),
            None,
            structure="auto",
            sparsity=0.3,
            dataset=ids,
            max_seq_length=16,
            progress=False,
            min_decode_speedup=0,  # the speed target makes auto's choice depend on this machine's timings
        )
        for _ in range(2)
    ]
    assert runs[0].removal.to_dict() == runs[1].removal.to_dict()
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_card_states_the_measured_speedup():
    from llmprune.structured.card import structure_lines

    structure = {
        "structure": "auto",
        "method": "obs",
        "block_params_removed": 0.3,
        "counts": {"blocks": 4, "channels": 256, "kv_groups": 0},
        "block_params": {"dense": 1000, "pruned": 700},
        "total_params": {"dense": 1500, "pruned": 1200},
        "config": {"num_hidden_layers": 26},
    }
    speed = {"speedup": {"prefill": 1.31, "decode": 1.27}, "settings": {"prefill": "8x512", "threads": 2}}
    text = "\n".join(structure_lines(structure, speed))
    assert "30.0% of the decoder-block parameters" in text and "4 decoder blocks" in text
    assert "**1.31×**" in text and "**1.27×**" in text and "| `num_hidden_layers` | | 26 |" in text
    assert "speed-up" not in "\n".join(structure_lines(structure, None))


def test_cli_structure_then_recovery_distils_from_the_dense_model(tiny_checkpoint, capsys):
    folder, text = tiny_checkpoint
    args = _args(folder, text, "--structure", "width", "--sparsity", "0.3", "--recover", "perp")
    assert main([*args, "--recover_steps", "2", "--skip_eval", "--json"]) == 0
    recovery = json.loads(capsys.readouterr().out)["recovery"]
    assert recovery["steps_done"] == 2 and recovery["options"]["distill"] == 1.0  # the dense teacher was used
