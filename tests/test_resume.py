"""Checkpoints and resume: a run killed half-way and continued equals a run never interrupted.

The reference is the same engine run straight through; equality is exact (weights, masks, errors).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import VOCAB

import llmprune
from llmprune.calibration import resume
from llmprune.calibration.engine import BlockSource, EngineConfig, prune_blocks
from llmprune.calibration.resume import default_checkpoint_dir, resolve_checkpoint_dir
from llmprune.calibration.streaming import StreamingBlocks
from llmprune.errors import ConfigError
from llmprune.io.save import load_keep_masks
from llmprune.registry import get_solver
from llmprune.result import PruneResult
from llmprune.spec import ModuleSelection

LAYERS = 5
IDS = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))
HESSIAN_METHOD = "sparsegpt"


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0):
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _run(model, method: str, sparsity="0.5", batch_size: int = 2, **cfg) -> PruneResult:
    config = EngineConfig(
        solver=get_solver(method),
        selection=ModuleSelection.build(sparsity),
        batch_size=batch_size,
        progress=False,
        **cfg,
    )
    return prune_blocks(model, IDS, config, PruneResult(method=method, sparsity=str(sparsity), options={}))


class _Crash(Exception):
    pass


def _crash_after(monkeypatch, block: int) -> None:
    """Make the run die right after block ``block`` is checkpointed."""
    real = resume.Progress.save_block

    def save_block(self, index, *args, **kwargs):
        real(self, index, *args, **kwargs)
        if index == block:
            raise _Crash

    monkeypatch.setattr(resume.Progress, "save_block", save_block)


def _assert_same(a: PruneResult, b: PruneResult, model_a, model_b) -> None:
    assert a.keep_masks.keys() == b.keep_masks.keys()
    assert all(torch.equal(a.keep_masks[k], b.keep_masks[k]) for k in a.keep_masks)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [x.recon_error for x in a.blocks] == [x.recon_error for x in b.blocks]
    assert {k: (m.sparsity, m.layer_error) for k, m in a.modules.items()} == {
        k: (m.sparsity, m.layer_error) for k, m in b.modules.items()
    }


@pytest.mark.parametrize("method,spill", [(HESSIAN_METHOD, False), ("wanda", True)])
def test_crash_then_resume_in_memory_is_bit_identical(tmp_path, monkeypatch, method, spill):
    extra = dict(true_sequential=True, max_memory=0 if spill else None, offload_dir=str(tmp_path / "acts"))
    straight = _model()
    reference = _run(straight, method, **extra)

    ckpt = tmp_path / "progress"
    with monkeypatch.context() as m:
        _crash_after(m, 2)
        with pytest.raises(_Crash):
            _run(_model(), method, checkpoint_dir=str(ckpt), **extra)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["next_block"] == 3

    loads = []
    real_load = BlockSource.load
    monkeypatch.setattr(
        BlockSource, "load", lambda self, i, b, d: (loads.append(i), real_load(self, i, b, d))
    )
    resumed_model = _model()  # a fresh process would reload the original weights
    resumed = _run(resumed_model, method, checkpoint_dir=str(ckpt), resume=True, **extra)
    assert loads == [3, 4], "finished blocks are restored, not recomputed"
    _assert_same(reference, resumed, straight, resumed_model)


@pytest.mark.parametrize("method", [HESSIAN_METHOD, "wanda"])
def test_resume_with_another_batch_size_is_bit_identical(tmp_path, monkeypatch, method):
    """Statistics are summed per sample in a fixed order, so a run crashed at batch size 2 and resumed at
    3 (batches cut across the saved activation files) equals one never interrupted. Before, the batch size
    was in the fingerprint and the resume was refused."""
    straight = _model()
    reference = _run(straight, method, true_sequential=True)
    ckpt = str(tmp_path / "progress")
    with monkeypatch.context() as m:
        _crash_after(m, 1)
        with pytest.raises(_Crash):
            _run(_model(), method, checkpoint_dir=ckpt, true_sequential=True)
    resumed_model = _model()
    resumed = _run(
        resumed_model, method, batch_size=4, checkpoint_dir=ckpt, resume=True, true_sequential=True
    )
    _assert_same(reference, resumed, straight, resumed_model)


def test_batch_size_stays_in_the_fingerprint_where_it_changes_results():
    model = _model()
    base = EngineConfig(solver=get_solver("wanda"), selection=ModuleSelection.build("0.5"), batch_size=2)
    fp = resume.run_fingerprint(base, model, IDS, LAYERS, torch.device("cpu"))
    assert fp["batch_size"] == "any"
    fused = dataclasses.replace(base, block_recovery=object())
    assert resume.run_fingerprint(fused, model, IDS, LAYERS, torch.device("cpu"))["batch_size"] == 2
    model.config.num_local_experts = 4  # a mixture of experts: routed tokens are summed per batch
    assert resume.run_fingerprint(base, model, IDS, LAYERS, torch.device("cpu"))["batch_size"] == 2


def test_resume_refuses_other_settings_and_needs_consent(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "progress")
    with monkeypatch.context() as m:
        _crash_after(m, 0)
        with pytest.raises(_Crash):
            _run(_model(), "wanda", checkpoint_dir=ckpt)
    with pytest.raises(ConfigError, match=r"sparsity: '0.5' there, '0.6' now"):
        _run(_model(), "wanda", sparsity="0.6", checkpoint_dir=ckpt, resume=True)
    with pytest.raises(ConfigError, match="embeddings_hash"):  # another model with the same config
        _run(_model(seed=1), "wanda", checkpoint_dir=ckpt, resume=True)
    with pytest.raises(ConfigError, match="resume=True"):
        _run(_model(), "wanda", checkpoint_dir=ckpt)
    _run(_model(), "wanda", checkpoint_dir=ckpt, resume=True)  # same settings: fine


def test_resume_refuses_other_block_weights_behind_the_same_config_and_embeddings(tmp_path, monkeypatch):
    """Before: config and embeddings were all the fingerprint knew of the model, so two models that share
    them were spliced: the first blocks from one, the rest from the other."""
    ckpt = str(tmp_path / "progress")
    with monkeypatch.context() as m:
        _crash_after(m, 1)
        with pytest.raises(_Crash):
            _run(_model(), "wanda", checkpoint_dir=ckpt)
    other = _model()
    with torch.no_grad():
        other.model.layers[3].mlp.up_proj.weight.mul_(1.5)  # same config, same embeddings
    with pytest.raises(ConfigError, match="block 3 holds other weights"):
        _run(other, "wanda", checkpoint_dir=ckpt, resume=True)
    same_rest = _model()  # blocks already done are restored from the progress: theirs may differ
    with torch.no_grad():
        same_rest.model.layers[0].mlp.up_proj.weight.zero_()
    _run(same_rest, "wanda", checkpoint_dir=ckpt, resume=True)


def test_resume_without_progress_starts_fresh(tmp_path):
    fresh, straight = _model(), _model()
    result = _run(fresh, "wanda", checkpoint_dir=str(tmp_path / "none-yet"), resume=True)
    _assert_same(_run(straight, "wanda"), result, straight, fresh)


def test_checkpoint_dir_defaults_beside_output_dir(tmp_path):
    out = tmp_path / "pruned"
    assert default_checkpoint_dir(out) == tmp_path / ".pruned.llmprune-progress"
    assert resolve_checkpoint_dir(None, out, resume=True) == default_checkpoint_dir(out)
    assert resolve_checkpoint_dir(None, out, resume=False) is None
    assert resolve_checkpoint_dir(tmp_path / "c", None, resume=False) == tmp_path / "c"
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        resolve_checkpoint_dir(None, None, resume=True)


# ---------------------------------------------------------------- SIGKILL, streaming

_CHILD = textwrap.dedent(
    r"""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from llmprune.calibration import resume
    import llmprune

    real = resume.atomic_write

    def slow(path, write, durable=True):  # widen the window between a block's files and the state
        if path.name == "state.json":
            time.sleep(0.5)
        real(path, write, durable=durable)

    resume.atomic_write = slow
    ids = torch.load(sys.argv[3])
    llmprune.prune(sys.argv[1], streaming=True, output_dir=sys.argv[2], method=sys.argv[4], sparsity="2:4",
                   dataset=ids, num_calibration_samples=6, max_seq_length=16, batch_size=2, progress=False,
                   resume=True)
    """
)


def test_sigkill_mid_run_then_resume_gives_the_same_model(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    _model().save_pretrained(src)
    torch.save(IDS, tmp_path / "ids.pt")
    (tmp_path / "child.py").write_text(_CHILD)
    progress = default_checkpoint_dir(out)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(llmprune.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    child = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "child.py"),
            str(src),
            str(out),
            str(tmp_path / "ids.pt"),
            HESSIAN_METHOD,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # block 2's files written, its state not yet: kill
            state = progress / "state.json"
            if (
                state.exists()
                and json.loads(state.read_text())["next_block"] == 2
                and (progress / "block-00002.json").exists()
            ):
                break
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        else:
            pytest.fail("the child never reached block 2")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not out.exists(), "a killed run must not leave an output folder"

    loads = []
    real_load = StreamingBlocks.load
    monkeypatch.setattr(
        StreamingBlocks, "load", lambda self, i, b, d: (loads.append(i), real_load(self, i, b, d))
    )
    resumed = llmprune.prune(
        src,
        streaming=True,
        output_dir=out,
        method=HESSIAN_METHOD,
        sparsity="2:4",
        dataset=IDS,
        num_calibration_samples=6,
        max_seq_length=16,
        batch_size=2,
        progress=False,
        resume=True,
    )
    straight = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    reference = _run(straight, HESSIAN_METHOD, sparsity="2:4")
    assert loads == [2, 3, 4]
    assert not progress.exists(), "progress is removed once the output is saved"
    masks = load_keep_masks(out)
    assert all(torch.equal(masks[k], reference.keep_masks[k]) for k in reference.keep_masks)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = straight.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert [b.recon_error for b in resumed.blocks] == [b.recon_error for b in reference.blocks]
