"""The model card: front matter the Hub's parser accepts, metrics in model-index, an honest body."""

from __future__ import annotations

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import LlamaConfig, LlamaForCausalLM

from llmprune.io.card import build_model_card, hub_dataset
from llmprune.io.save import save_pruned, sparsity_report

METRICS = {
    "perplexity": {
        "dense": {"ppl": 18.25, "bits_per_byte": 1.02, "windows": 7, "max_seq_length": 256},
        "pruned": {"ppl": 21.5, "bits_per_byte": 1.07, "windows": 7, "max_seq_length": 256},
        "dataset": "wikitext2",
    },
    "lm_eval": {
        "dense": {"results": {"arc_easy": {"acc,none": 0.61, "acc_stderr,none": 0.01}}},
        "pruned": {"results": {"arc_easy": {"acc,none": 0.55, "acc_stderr,none": 0.01, "alias": "arc_easy"}}},
    },
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight.view(module.weight.shape[0], -1, 4)  # (out, in/4, 4)
                    w[..., :2] = 0.0  # keep the last 2 of every 4: a 2:4 pattern by construction
    return model


def front_matter(text: str) -> dict:
    """Independent parse: the YAML between the first two '---' lines."""
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "m"
    run_info = {
        "base_model": "someone/tiny-llama",
        "license": "apache-2.0",
        "command": "llmprune prune --x 1",
    }
    recipe = {"method": "wanda", "sparsity": "2:4", "dataset": "c4", "num_calibration_samples": 8}
    save_pruned(tiny_llama(), None, out, recipe=recipe, run_info=run_info, metrics=METRICS)
    return out


def test_saved_card_parses_with_hub_loader_and_carries_the_metrics(saved):
    card = ModelCard.load(saved / "README.md")
    data = card.data
    assert data.base_model == "someone/tiny-llama" and data.license == "apache-2.0"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"pruned", "sparse", "llmprune"} <= set(data.tags)
    assert set(data.datasets) == {"allenai/c4", "Salesforce/wikitext"}
    by_name = {(r.metric_type, r.metric_name): r for r in data.eval_results}
    assert by_name[("perplexity", "Perplexity")].metric_value == 21.5
    assert by_name[("perplexity", "Perplexity of the dense base model")].metric_value == 18.25
    assert by_name[("bits_per_byte", "Bits per byte")].metric_value == 1.07
    assert by_name[("perplexity", "Perplexity")].dataset_type == "Salesforce/wikitext"
    assert by_name[("acc", None)].metric_value == 0.55 and by_name[("acc", None)].dataset_name == "arc_easy"
    assert not any("stderr" in r.metric_type for r in data.eval_results)


def test_front_matter_is_plain_yaml_with_model_index(saved):
    meta = front_matter((saved / "README.md").read_text())
    results = meta["model-index"][0]["results"]
    values = sorted(m["value"] for r in results for m in r["metrics"])
    assert values == sorted([21.5, 18.25, 1.07, 0.55])


def test_body_states_the_run_and_the_limits(saved):
    text = ModelCard.load(saved / "README.md").text
    assert "llmprune prune --x 1" in text  # the exact command
    assert "num_calibration_samples: 8" in text  # the recipe
    assert "50.00%" in text  # achieved sparsity, measured on the weights
    assert "| 21.500 |" in text and "| 18.250 |" in text and "0.6100 | 0.5500" in text
    for claim in ("as large as the dense model", "**not** faster", "2:4 patterns", "Structured removal"):
        assert claim in text


def test_nm_tag_and_validity_from_the_weights():
    model = tiny_llama()
    report = sparsity_report(model)
    assert report["nm_patterns"] == ["2:4", "3:4", "4:8"] and report["overall_sparsity"] == 0.5
    report |= {"method": "sparsegpt", "target": "2:4"}
    card = build_model_card(sparsity=report, run_info={})
    assert "sparsegpt" in card.data.tags and "2of4-sparsity" in card.data.tags
    assert card.data.eval_results is None and "Not evaluated" in card.text
    assert "inherits the license of its base model" in card.text
    skipped = build_model_card(sparsity=report, run_info={}, metrics={"perplexity": None})  # --skip_eval
    assert "Not evaluated" in skipped.text and skipped.data.eval_results is None


def test_license_comes_from_the_source_card_but_not_its_base_model(tmp_path):
    src = tmp_path / "my-finetune"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: mit\nbase_model: org/original\n---\n# source\n")
    card = build_model_card(sparsity=sparsity_report(tiny_llama()), run_info={"source_model": str(src)})
    assert card.data.license == "mit" and card.data.base_model is None  # org/original is the parent


def test_hub_cache_snapshot_path_names_the_repo(tmp_path):
    snap = tmp_path / "hub" / "models--org--tiny-instruct" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    card = build_model_card(sparsity=sparsity_report(tiny_llama()), run_info={"source_model": str(snap)})
    assert card.data.base_model == "org/tiny-instruct" and card.data.license == "apache-2.0"


def test_embedded_default_maps_to_its_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path))
    run_info = {"source_model": str(tmp_path / "smollm2-135m")}
    card = build_model_card(sparsity=sparsity_report(tiny_llama()), run_info=run_info)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_flat_metric_values_and_unknown_datasets():
    metrics = {"perplexity": {"dense": 10.0, "pruned": 11.0, "dataset": "/data/my text.txt"}}
    card = build_model_card(sparsity=sparsity_report(tiny_llama()), run_info={}, metrics=metrics)
    assert [r.metric_value for r in card.data.eval_results] == [11.0, 10.0]
    assert card.data.datasets is None  # a local file is not a Hub dataset
    assert hub_dataset("allenai/c4") == "allenai/c4" and hub_dataset("evaluation") is None
    assert ModelCard(str(card)).data.eval_results[0].metric_value == 11.0  # round trip through text
