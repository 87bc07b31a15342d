"""First-run defaults: sizes that fit the model, bounded evaluation, nothing written unless asked."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from conftest import SAMPLE_TEXT, VOCAB, make_model

import llmprune
from llmprune.calibration.data import sample_windows
from llmprune.cli import main
from llmprune.errors import ConfigError, DataError
from llmprune.evaluation import perplexity as ppl_mod
from llmprune.evaluation.perplexity import eval_windows, perplexity


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_token_tensor_brings_its_own_size(arch):
    """Before: max_seq_length defaulted to 2048 and refused every model with fewer positions (64 here)."""
    model = make_model(arch)
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))
    result = llmprune.prune(model, method="wanda", sparsity=0.5, dataset=ids, progress=False)
    assert (result.num_calibration_samples, result.max_seq_length) == (3, 40)
    assert result.overall_sparsity == pytest.approx(0.5)


def test_a_narrower_request_cuts_the_tensor_and_says_so(caplog):
    ids = torch.randint(0, VOCAB, (4, 40), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="llmprune"):
        result = llmprune.prune(
            make_model("llama"), dataset=ids, num_calibration_samples=2, max_seq_length=16, progress=False
        )
    assert (result.num_calibration_samples, result.max_seq_length) == (2, 16)
    assert "first 2 × 16 of the 4 × 40" in caplog.text
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        result = llmprune.prune(make_model("llama"), dataset=ids, max_seq_length=60, progress=False)
    assert result.max_seq_length == 40 and "not the 4 × 60 asked for" in caplog.text


def test_float_token_ids_are_refused_not_cast():
    ids = torch.randint(0, VOCAB, (2, 16)).float() + 0.4
    with pytest.raises(DataError, match="integers"):
        llmprune.prune(make_model("llama"), dataset=ids, progress=False)


def test_text_windows_default_to_the_models_positions(tiny_tokenizer):
    result = llmprune.prune(
        make_model("gpt2"), tiny_tokenizer, dataset=[SAMPLE_TEXT], num_calibration_samples=2, progress=False
    )
    assert result.max_seq_length == 64  # min(2048, n_positions)
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        llmprune.prune(make_model("gpt2"), tiny_tokenizer, dataset=[SAMPLE_TEXT], max_seq_length=128)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_perplexity_follows_the_same_position_rule(arch, tiny_tokenizer):
    """Before: prune's perplexity used 2048-token windows on a 64-position model (GPT-2: IndexError)."""
    model = make_model(arch)
    out = perplexity(model, tiny_tokenizer, [SAMPLE_TEXT], progress=False)
    assert out["max_seq_length"] == 64
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        perplexity(model, tiny_tokenizer, [SAMPLE_TEXT], max_seq_length=65, progress=False)


def test_default_evaluation_is_bounded_and_all_is_opt_in(tiny_tokenizer, monkeypatch):
    every = eval_windows(tiny_tokenizer, [SAMPLE_TEXT], 16)
    assert len(every) > 8
    monkeypatch.setattr(ppl_mod, "DEFAULT_EVAL_TOKENS", 16 * 5)
    model = make_model("llama")
    assert perplexity(model, tiny_tokenizer, [SAMPLE_TEXT], 16, progress=False)["windows"] == 5
    everything = perplexity(model, tiny_tokenizer, [SAMPLE_TEXT], 16, limit="all", progress=False)
    assert everything["windows"] == len(every)
    with pytest.raises(ConfigError, match="'all'"):
        perplexity(model, tiny_tokenizer, [SAMPLE_TEXT], 16, limit="most", progress=False)


def test_sampling_documents_long_in_characters_short_in_tokens_ends(tiny_tokenizer):
    """Before: with more than 64 such documents, the rejection loop drew them forever."""
    doc = SAMPLE_TEXT[:300]  # 300 characters, fewer tokens
    assert len(doc) > 250 >= len(tiny_tokenizer(doc)["input_ids"])
    docs = [doc] * 100
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(ids=sample_windows(docs, tiny_tokenizer, 3, 250, 0)))
    worker.daemon = True
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "sample_windows is still looping"
    assert out["ids"].shape == (3, 250)  # drawn from the documents joined into one stream
    with pytest.raises(DataError, match="fewer than one window"):
        sample_windows([doc] * 100, tiny_tokenizer, 3, 10**6, 0)


# ---------------------------------------------------------------- the command line


@pytest.fixture
def checkpoint(tmp_path, tiny_tokenizer):
    """A GPT-2-like folder (64 learned positions) and a text file beside it."""
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    for part in (make_model("gpt2"), tiny_tokenizer):
        part.save_pretrained(tmp_path / "tiny-gpt2")
    return tmp_path / "tiny-gpt2", tmp_path / "text.txt"


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_cli_prune_without_size_flags_fits_a_small_model(checkpoint, tmp_path, capsys):
    """Before: `llmprune prune --model gpt2-like` failed on the 2048 default."""
    folder, text = checkpoint
    out = tmp_path / "out"
    argv = ["prune", "--model", str(folder), "--dataset", str(text), "--eval_dataset", str(text)]
    assert main([*argv, "--output_dir", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    recipe = (out / "recipe.yaml").read_text()
    assert "max_seq_length: 64" in recipe and "num_calibration_samples: 32" in recipe  # what the run used


def test_eval_writes_nothing_into_the_model_folder_unless_told(checkpoint, tmp_path, capsys):
    """Before: `llmprune eval --recipe OUT/recipe.yaml --model OUT` overwrote OUT's recipe.yaml."""
    folder, text = checkpoint
    out = tmp_path / "out"
    flags = ["--dataset", str(text), "--num_calibration_samples", "2", "--skip_eval"]
    assert main(["prune", "--model", str(folder), *flags, "--output_dir", str(out)]) == 0
    before = _snapshot(out)
    evaluate = ["eval", "--recipe", str(out / "recipe.yaml"), "--model", str(out), "--tasks", "none"]
    evaluate += ["--eval_dataset", str(text), "--eval_limit", "2"]
    assert main(evaluate) == 0
    assert _snapshot(out) == before
    assert main([*evaluate, "--output_path", str(out)]) == 0  # told: results beside, its recipe kept
    after = _snapshot(out)
    assert after["recipe.yaml"] == before["recipe.yaml"]
    assert {"results.json", "eval_recipe.yaml"} <= set(after)


def test_streaming_saves_the_sizes_it_used(tmp_path, tiny_tokenizer):
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    for part in (make_model("llama"), tiny_tokenizer):
        part.save_pretrained(tmp_path / "tiny-llama")
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tmp_path / "tiny-llama"), "--dataset", str(tmp_path / "text.txt")]
    assert main([*argv, "--streaming", "--output_dir", str(out), "--num_calibration_samples", "2"]) == 0
    recipe = (out / "recipe.yaml").read_text()
    assert "max_seq_length: 64" in recipe and "num_calibration_samples: 2" in recipe
