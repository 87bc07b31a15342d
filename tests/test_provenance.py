"""One provenance writer for both checkpoint writers, and one orchestration for both ways of pruning.

``save_pruned`` (in memory) and ``save_streamed`` (blocks from disk) must leave the same provenance
beside different weight layouts; streamed magnitude must stay data-free like the in-memory path.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from conftest import VOCAB, make_model

import llmprune
from llmprune.calibration import engine
from llmprune.io.masks import load_keep_masks

IDS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
KW = dict(dataset=IDS, num_calibration_samples=4, max_seq_length=16, batch_size=2, progress=False)
#: per-run values that legitimately differ between two runs
_VOLATILE = {"seconds", "layer_error"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _without(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in _VOLATILE}


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_streamed_and_in_memory_checkpoints_carry_the_same_provenance(tmp_path, method):
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    llmprune.prune(loaded, None, method=method, sparsity="2:4", output_dir=str(memory), **KW)
    llmprune.prune(str(src), method=method, sparsity="2:4", output_dir=str(streamed), streaming=True, **KW)

    provenance = {"sparsity.json", "recipe.yaml", "run_info.json", "masks.safetensors", "README.md"}
    assert provenance <= {p.name for p in memory.iterdir()}
    assert provenance <= {p.name for p in streamed.iterdir()}
    a, b = (json.loads((d / "sparsity.json").read_text()) for d in (memory, streamed))
    assert {k: v for k, v in a.items() if k != "modules"} == {k: v for k, v in b.items() if k != "modules"}
    assert a["modules"].keys() == b["modules"].keys()
    assert all(_without(a["modules"][k]) == _without(b["modules"][k]) for k in a["modules"])
    assert yaml.safe_load((memory / "recipe.yaml").read_text()) == yaml.safe_load(
        (streamed / "recipe.yaml").read_text()
    )
    info_a, info_b = (json.loads((d / "run_info.json").read_text()) for d in (memory, streamed))
    assert info_b["streaming"] is True and "streaming" not in info_a
    for key in ("seed", "calibration_hash", "num_calibration_samples", "max_seq_length", "versions"):
        assert info_a[key] == info_b[key], key
    masks_a, masks_b = load_keep_masks(memory), load_keep_masks(streamed)
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


def test_magnitude_runs_no_forward_pass_when_streaming_either(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)

    def no_forward(*args, **kwargs):
        raise AssertionError("magnitude needs no calibration forward")

    monkeypatch.setattr(engine, "capture_block_inputs", no_forward)
    result = llmprune.prune(
        str(src), method="magnitude", sparsity=0.5, output_dir=str(tmp_path / "o"), streaming=True, **KW
    )
    assert not result.calibration_hash and result.blocks == []
    assert len(load_keep_masks(tmp_path / "o")) == len(result.modules) > 0
