"""lm-eval on the in-memory model, offline, on the shipped task; checked against a by-hand log-likelihood.

``tiny_lm`` (also used by test_reports / test_recipes_run) builds a 2-block Llama from a config and a
byte-level BPE tokenizer over the full byte alphabet, so every question of the task tokenizes.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmprune.errors import ConfigError, DataError
from llmprune.evaluation.harness import BUILTIN_TASKS_DIR, lm_eval_scores, task_manager

TEXT = (
    "Question: What is the capital of France? Answer: Paris. The quick brown fox jumps over the lazy dog. "
    "A stitch in time saves nine. All that glitters is not gold. Where there is a will there is a way. "
    "Which planet is closest to the Sun? Water boils at one hundred degrees at sea level. "
) * 8


def tiny_lm(seed: int = 0, max_positions: int = 256):
    """``(model, tokenizer)``: Llama with 2 blocks (hidden 32, MLP 64) and a 300-token byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def _reference_scores(model, tok, docs) -> tuple[float, float]:
    """acc and acc_norm computed directly: sum of log p(" choice" | "Question: …\\nAnswer:")."""
    acc = acc_norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = []
        for choice in doc["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)  # (L-1, V)
            targets = ids[0, n_ctx:]
            lls.append(float(logp[torch.arange(n_ctx - 1, len(whole) - 1), targets].sum()))
        lls_t = torch.tensor(lls)
        lens = torch.tensor([float(len(c)) for c in doc["choices"]])
        acc += int(lls_t.argmax()) == doc["label"]
        acc_norm += int((lls_t / lens).argmax()) == doc["label"]
    return acc / len(docs), acc_norm / len(docs)


def test_scores_match_a_direct_loglikelihood(lm):
    import lm_eval

    model, tok = lm
    limit = 12
    out = lm_eval_scores(model, tok, ["llmprune_mc"], limit=limit, batch_size=4, seed=0)
    scores = out["tasks"]["llmprune_mc"]
    docs = [json.loads(line) for line in (BUILTIN_TASKS_DIR / "llmprune_mc.jsonl").read_text().splitlines()]
    acc, acc_norm = _reference_scores(model, tok, docs[:limit])
    assert scores["acc"] == pytest.approx(acc)
    assert scores["acc_norm"] == pytest.approx(acc_norm)
    assert scores["num_samples"] == limit and scores["num_fewshot"] == 0
    assert scores["version"] == 1.0
    assert out["lm_eval_version"] == lm_eval.__version__
    assert out["config"]["seed"] == 0 and out["config"]["limit"] == limit


def test_shipped_task_is_well_formed():
    docs = [json.loads(line) for line in (BUILTIN_TASKS_DIR / "llmprune_mc.jsonl").read_text().splitlines()]
    assert len(docs) >= 30
    assert len({d["question"] for d in docs}) == len(docs)
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4 and 0 <= d["label"] < 4
    labels = [d["label"] for d in docs]
    assert max(labels.count(i) for i in range(4)) <= len(docs) // 4 + 2  # answers spread over positions


def test_unknown_task_suggests_the_name(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'llmprune_mc'"):
        task_manager(["llmprune_mcc"])
    with pytest.raises(ConfigError, match="does not exist"):
        task_manager(["llmprune_mc"], include_path=tmp_path / "missing")
    with pytest.raises(ConfigError, match="at least one"):
        lm_eval_scores(None, None, [])


def test_builtin_task_offline_points_to_include_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: certainly not downloaded
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    with pytest.raises(DataError, match="--include_path"):
        task_manager(["hellaswag"])


def test_include_path_adds_local_tasks(tmp_path, lm):
    """A user task folder beside the shipped one; relative paths resolved by the task's own loader."""
    task_dir = tmp_path / "mytasks"
    task_dir.mkdir()
    (task_dir / "colors.jsonl").write_text(
        "\n".join(
            json.dumps({"question": q, "choices": c, "label": 0})
            for q, c in [("Grass is", ["green", "red"]), ("The sky is", ["blue", "orange"])]
        )
    )
    (task_dir / "utils.py").write_text(
        "import os, datasets\n"
        "def load(**kw):\n"
        "    p = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'colors.jsonl')\n"
        "    return datasets.load_dataset('json', data_files={'test': p})\n"
    )
    (task_dir / "colors.yaml").write_text(
        (BUILTIN_TASKS_DIR / "llmprune_mc.yaml")
        .read_text()
        .replace("task: llmprune_mc", "task: my_colors")
        .replace("utils.load_llmprune_mc", "utils.load")
    )
    shadow = tmp_path / "shadow"  # a user task with our name wins over the shipped one
    shadow.mkdir()
    (shadow / "llmprune_mc.yaml").write_text(
        (task_dir / "colors.yaml").read_text().replace("my_colors", "llmprune_mc")
    )
    manager, _ = task_manager(["llmprune_mc"], include_path=shadow)
    assert manager.task_index["llmprune_mc"].yaml_path.parent == shadow
    model, tok = lm
    out = lm_eval_scores(model, tok, ["my_colors", "llmprune_mc"], include_path=task_dir, limit=2)
    assert set(out["tasks"]) == {"my_colors", "llmprune_mc"}
    assert out["tasks"]["my_colors"]["num_samples"] == 2
