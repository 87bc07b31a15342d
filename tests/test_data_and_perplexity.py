"""Calibration sources, seeded window sampling, and the GPTQ perplexity protocol."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, make_model

from llmprune.calibration.data import calibration_tokens, load_texts, sample_windows, tokens_hash
from llmprune.errors import DataError
from llmprune.evaluation.perplexity import eval_windows, perplexity


def test_builtin_corpora_are_disjoint_and_nonempty():
    calib, held_out = load_texts("calibration"), load_texts("evaluation")
    assert len(calib) == 2 and len(held_out) == 2
    assert all(len(t) > 100_000 for t in calib + held_out)
    assert not set(calib) & set(held_out)
    assert load_texts(None, "train") == calib and load_texts(None, "test") == held_out


def test_builtin_recovery_text_is_the_calibration_text_plus_literary_text_and_no_austen():
    """Recovery's default text: the evaluation novels in it would make every recovery figure in-domain."""
    calib, recovery = load_texts("calibration"), load_texts("recovery")
    held_out = load_texts("validation") + load_texts("test")
    assert recovery[:2] == calib and len(recovery) == 4
    assert "Call me Ishmael." in recovery[2] and "To be, or not to be" in recovery[3]
    assert not set(recovery) & set(held_out)
    assert all("Elizabeth Bennet" not in t and "Emma Woodhouse" not in t for t in recovery)
    assert all("\r" not in t and "\n\n\n" not in t for t in recovery[2:])  # reflowed like the others


def test_local_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines")
    (tmp_path / "b.txt").write_text("second document")
    assert load_texts(str(tmp_path)) == [
        "first document\nwith two lines",
        "second document",
    ]  # file = document
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": t}) for t in ["x y", "z w"]))
    assert load_texts(str(rows)) == ["x y", "z w"]
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "cols.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(DataError, match="'text' column"):
        load_texts(str(tmp_path / "cols.jsonl"))


def test_datasets_dataset_source():
    from datasets import Dataset

    assert load_texts(Dataset.from_dict({"text": ["a b", "", "c"]})) == ["a b", "c"]


def test_windows_are_seeded_and_come_from_the_text(tiny_tokenizer):
    a = sample_windows([SAMPLE_TEXT], tiny_tokenizer, 5, 16, seed=0)
    b = sample_windows([SAMPLE_TEXT], tiny_tokenizer, 5, 16, seed=0)
    c = sample_windows([SAMPLE_TEXT], tiny_tokenizer, 5, 16, seed=1)
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert tokens_hash(a) == tokens_hash(b) != tokens_hash(c)
    stream = tiny_tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    text = " ".join(map(str, stream))
    assert all(" ".join(map(str, row.tolist())) in text for row in a)


def test_short_documents_are_joined(tiny_tokenizer):
    docs = ["The quick brown fox."] * 40
    windows = sample_windows(docs, tiny_tokenizer, 3, 32, seed=0)
    assert windows.shape == (3, 32)
    with pytest.raises(DataError, match="fewer than one window"):
        sample_windows(["tiny"], tiny_tokenizer, 1, 64)


def test_token_tensor_and_self_sources(tiny_tokenizer):
    ids = torch.arange(40).reshape(4, 10)
    assert torch.equal(calibration_tokens(ids, None, 2, 5), ids[:2, :5])
    model = make_model("llama")
    gen = calibration_tokens("self", tiny_tokenizer, 2, 12, seed=0, model=model)
    assert gen.shape == (2, 12) and torch.equal(
        gen, calibration_tokens("self", tiny_tokenizer, 2, 12, 0, model)
    )


def test_perplexity_matches_hand_computation(tiny_tokenizer):
    """GPTQ protocol: join with blank lines, non-overlapping windows, remainder dropped, mean NLL."""
    model = make_model("llama")
    docs = [SAMPLE_TEXT[:900], SAMPLE_TEXT[900:2000]]
    ids = torch.tensor(tiny_tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"])
    n = ids.numel() // 16
    windows = ids[: n * 16].reshape(n, 16)
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    out = perplexity(model, tiny_tokenizer, docs, max_seq_length=16, batch_size=3, progress=False)
    assert out["windows"] == n and out["tokens"] == n * 15
    assert out["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    text_bytes = sum(len(tiny_tokenizer.decode(row[1:]).encode("utf-8")) for row in windows.tolist())
    assert out["bits_per_byte"] == pytest.approx(float(nll) * n * 15 / math.log(2) / text_bytes, rel=1e-5)


def test_eval_limit_spreads_windows(tiny_tokenizer):
    full = eval_windows(tiny_tokenizer, [SAMPLE_TEXT], 16)
    some = eval_windows(tiny_tokenizer, [SAMPLE_TEXT], 16, limit=3)
    assert torch.equal(some[0], full[0]) and torch.equal(some[-1], full[-1]) and len(some) == 3
