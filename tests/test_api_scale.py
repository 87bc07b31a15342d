"""``llmprune.prune``'s keywords for large models: streaming, max_memory, checkpoint_dir and resume.

The engine behind them is tested in test_streaming.py and test_resume.py; here the public API is held
to the same reference: an ordinary in-memory ``llmprune.prune`` of the same model, equal bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import VOCAB, make_model

import llmprune
from llmprune.calibration import capture, resume
from llmprune.calibration.engine import BlockSource
from llmprune.calibration.resume import default_checkpoint_dir
from llmprune.errors import ConfigError
from llmprune.io.save import load_keep_masks

IDS = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(5))
KW = dict(dataset=IDS, num_calibration_samples=6, max_seq_length=16, batch_size=2, progress=False)
METHOD = "sparsegpt"  # updates kept weights


class _Crash(Exception):
    pass


def _assert_same(result, reference, model, reference_model) -> None:
    assert result.keep_masks.keys() == reference.keep_masks.keys()
    assert all(torch.equal(result.keep_masks[k], reference.keep_masks[k]) for k in result.keep_masks)
    state, expected = model.state_dict(), reference_model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert [b.recon_error for b in result.blocks] == [b.recon_error for b in reference.blocks]


def test_killed_run_resumed_through_prune_equals_a_plain_run(tmp_path, monkeypatch):
    plain_model = make_model("llama")
    plain = llmprune.prune(plain_model, None, method=METHOD, sparsity="2:4", **KW)

    out = tmp_path / "pruned"
    real = resume.Progress.save_block

    def crash_after_block_0(self, index, *args, **kwargs):
        real(self, index, *args, **kwargs)
        if index == 0:
            raise _Crash

    with monkeypatch.context() as m:
        m.setattr(resume.Progress, "save_block", crash_after_block_0)
        with pytest.raises(_Crash):
            llmprune.prune(
                make_model("llama"), None, method=METHOD, sparsity="2:4", output_dir=out, resume=True, **KW
            )
    progress = default_checkpoint_dir(out)  # resume=True without checkpoint_dir: beside output_dir
    assert (progress / "state.json").is_file() and not out.exists()
    with pytest.raises(ConfigError, match="resume=True"):  # progress is never overwritten silently
        llmprune.prune(
            make_model("llama"), None, method=METHOD, sparsity="2:4", checkpoint_dir=progress, **KW
        )

    loads = []
    real_load = BlockSource.load
    monkeypatch.setattr(
        BlockSource, "load", lambda self, i, b, d: (loads.append(i), real_load(self, i, b, d))
    )
    model = make_model("llama")  # a new process would start from the original weights
    result = llmprune.prune(model, None, method=METHOD, sparsity="2:4", output_dir=out, resume=True, **KW)
    assert loads == [1], "block 0 is restored from the progress, not pruned again"
    _assert_same(result, plain, model, plain_model)
    assert not progress.exists(), "progress is removed once output_dir is written"
    assert load_keep_masks(out).keys() == plain.keep_masks.keys()


def test_checkpoint_dir_without_output_dir_keeps_progress_for_the_caller(tmp_path):
    ckpt = tmp_path / "progress"
    llmprune.prune(make_model("llama"), None, method="wanda", checkpoint_dir=str(ckpt), **KW)
    assert (ckpt / "state.json").is_file(), "nothing was saved yet: the progress is all there is"


def test_streaming_through_prune_equals_pruning_in_memory(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_model("qwen2").save_pretrained(src, max_shard_size="20KB")
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    reference = llmprune.prune(reference_model, None, method=METHOD, sparsity=0.5, **KW)

    result = llmprune.prune(src, method=METHOD, sparsity=0.5, streaming=True, output_dir=out, **KW)
    masks = load_keep_masks(out)
    assert masks.keys() == reference.keep_masks.keys()
    assert all(torch.equal(masks[k], reference.keep_masks[k]) for k in masks)
    assert [b.recon_error for b in result.blocks] == [b.recon_error for b in reference.blocks]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in reference_model.state_dict().items())


def test_max_memory_spills_activations_and_changes_nothing(tmp_path, monkeypatch):
    reference_model = make_model("llama")
    reference = llmprune.prune(reference_model, None, method="wanda", **KW)
    spilled = []
    real_append = capture.DiskList.append
    monkeypatch.setattr(capture.DiskList, "append", lambda self, t: (spilled.append(1), real_append(self, t)))
    model = make_model("llama")
    result = llmprune.prune(model, None, method="wanda", max_memory="0GB", offload_dir=str(tmp_path), **KW)
    assert spilled, "a budget of 0 bytes keeps every activation on disk"
    _assert_same(result, reference, model, reference_model)


@pytest.mark.parametrize(
    "model,kwargs,message",
    [
        ("loaded", dict(streaming=True, output_dir="o"), "not a loaded model"),
        ("./nowhere", dict(streaming=True), "needs output_dir"),
        ("./nowhere", dict(offload_dir="acts"), "set max_memory too"),
        ("./nowhere", dict(max_memory="lots"), "cannot read memory size 'lots'"),
        ("./nowhere", dict(max_memory="-1GB"), "cannot read memory size"),
        ("./nowhere", dict(resume=True), "needs checkpoint_dir"),
    ],
)
def test_impossible_combinations_fail_before_loading_and_name_the_fix(model, kwargs, message):
    """``./nowhere`` does not exist: a ConfigError (not a load error) shows the check ran first."""
    if model == "loaded":
        model = make_model("llama")
    with pytest.raises(ConfigError, match=message):
        llmprune.prune(model, **kwargs)
