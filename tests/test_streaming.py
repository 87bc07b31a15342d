"""Streaming blocks from the shards: the same model as pruning in memory, in a fraction of the memory.

The reference everywhere is the ordinary in-memory ``llmprune.prune`` on the same checkpoint, loaded
by transformers' own ``from_pretrained``; the streamed output is read back the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ARCHITECTURES, VOCAB, make_model

import llmprune
from llmprune.calibration import capture
from llmprune.errors import ConfigError, DataError, ModelLoadError
from llmprune.io.save import load_keep_masks

IDS = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))
KW = dict(dataset=IDS, num_calibration_samples=6, max_seq_length=24, batch_size=2, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(src: Path, **kw):
    """In-memory prune of the checkpoint at ``src``, loaded by transformers' own loader."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    return model, llmprune.prune(model, None, **{**KW, **kw})


def _stream(src: Path, out: Path, **kw):
    return llmprune.prune(src, streaming=True, output_dir=out, **{**KW, **kw})


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_streamed_checkpoint_equals_in_memory_prune(arch, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_model(arch).save_pretrained(src, max_shard_size="20KB")  # shards split blocks: reads cross files
    method = "sparsegpt"
    model, ref = _reference(src, method=method, sparsity="2:4")
    result = _stream(src, out, method=method, sparsity="2:4")

    masks = load_keep_masks(out)
    assert masks.keys() == ref.keep_masks.keys()
    assert all(torch.equal(masks[k], ref.keep_masks[k]) for k in masks)
    assert [b.recon_error for b in result.blocks] == [b.recon_error for b in ref.blocks]
    assert result.overall_sparsity == pytest.approx(ref.overall_sparsity)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state), arch
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    # the tensor names save_pretrained writes (tied lm_head saved once, transformers' renames reverted)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    report = json.loads((out / "sparsity.json").read_text())
    assert report["num_modules"] == len(ref.modules) and "2:4" in report["nm_patterns"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "the work folder must be gone"


def test_spilled_activations_give_the_same_masks(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)
    _, ref = _reference(src, method="wanda", sparsity=0.5, true_sequential=True)
    appended = []
    real_append = capture.DiskList.append
    monkeypatch.setattr(
        capture.DiskList, "append", lambda self, t: (appended.append(1), real_append(self, t))
    )
    _stream(
        src,
        tmp_path / "out",
        method="wanda",
        sparsity=0.5,
        true_sequential=True,
        max_memory=1,
        offload_dir=str(tmp_path / "acts"),
    )
    assert appended, "max_memory=1 byte must put the activations on disk"
    masks = load_keep_masks(tmp_path / "out")
    assert all(torch.equal(masks[k], ref.keep_masks[k]) for k in ref.keep_masks)
    assert not any((tmp_path / "acts").rglob("*.pt")), "spilled activations are deleted afterwards"


def test_streaming_refuses_what_it_cannot_do(tmp_path):
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)
    with pytest.raises(DataError, match="self"):
        _stream(src, tmp_path / "o1", dataset="self")
    with pytest.raises(ConfigError, match="in memory"):
        _stream(src, tmp_path / "o2", method="magnitude", scope="global")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="save_pretrained"):
        _stream(gguf, tmp_path / "o3")
    with pytest.raises(ConfigError, match="holds the model"):
        _stream(src, src)
    (src / "model.safetensors").rename(src / "weights.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        _stream(src, tmp_path / "o4")


# ---------------------------------------------------------------- larger than the memory cap

_CHILD = textwrap.dedent(
    r"""
    import ctypes, gc, json, resource, sys, tempfile
    import torch, transformers
    torch.set_num_threads(1)
    import llmprune

    big, tiny, out = sys.argv[1:4]
    cap_mib, model_bytes = int(sys.argv[4]), int(sys.argv[5])
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    kw = dict(method="wanda", sparsity="2:4", dataset=ids, num_calibration_samples=4, max_seq_length=32,
              batch_size=2, progress=False)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: every import and code path, on a tiny model
        llmprune.prune(tiny, streaming=True, output_dir=tmp + "/o", **kw)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


    def status():  # bytes
        lines = open("/proc/self/status").read().splitlines()
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in lines if l.endswith(" kB")}

    try:  # restart the kernel's peak-RSS counter here (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    base = status()
    limit = base["VmData"] + cap_mib * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:  # the cap is real: one copy of the weights does not fit under it
        torch.empty(model_bytes, dtype=torch.uint8).fill_(1)
        refused = False
    except RuntimeError:
        refused = True
    llmprune.prune(big, streaming=True, output_dir=out, **kw)
    # VmHWM, not ru_maxrss: the latter inherits the parent's peak across fork and exec
    print(json.dumps({"base_rss": base["VmRSS"], "peak_rss": status()["VmHWM"], "refused": refused}))
    """
)


def _random_llama(path: Path, layers: int, hidden: int, inter: int, shard: str) -> int:
    """A random-weight Llama saved in shards; returns its weight bytes. Built on meta, filled chunk-free."""
    from accelerate import init_empty_weights

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=512,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    state = {
        n: torch.rand(p.shape, generator=g).sub_(0.5).mul_(0.05) if p.dim() > 1 else torch.ones(p.shape)
        for n, p in model.named_parameters()
    }
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    model.save_pretrained(path, max_shard_size=shard)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux")
def test_model_several_times_the_memory_cap_is_pruned_in_a_capped_process(tmp_path):
    """A 620 MB model pruned in a process whose data segment may grow by 200 MB only.

    RLIMIT_DATA caps private writable memory (heap and anonymous maps), which is what holding weights
    costs; RLIMIT_AS would also count torch's and the libraries' address-space reservations. glibc is
    told to serve big allocations with mmap and to use one arena, so the heap's *address space* (what
    the limit counts) tracks what is really in use instead of the high-water mark of a fragmented heap.
    The baseline is taken after a warm-up run on a tiny model, so imports are not counted. The peak
    resident set (kernel high-water mark) is checked too.
    """
    big, tiny, out = tmp_path / "big", tmp_path / "tiny", tmp_path / "out"
    try:
        model_bytes = _random_llama(big, layers=14, hidden=768, inter=2048, shard="24MB")
        _random_llama(tiny, layers=2, hidden=64, inter=128, shard="1GB")
        cap_mib = 120
        assert model_bytes > 3 * cap_mib * 2**20
        script = tmp_path / "child.py"
        script.write_text(_CHILD)
        env = dict(
            os.environ,
            MALLOC_MMAP_THRESHOLD_="131072",
            MALLOC_ARENA_MAX="1",
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join(
                [str(Path(llmprune.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
        )
        proc = subprocess.run(
            [sys.executable, str(script), str(big), str(tiny), str(out), str(cap_mib), str(model_bytes)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        assert record["refused"], "the cap must be below one copy of the weights"
        grown = record["peak_rss"] - record["base_rss"]
        print(
            f"model {model_bytes / 2**20:.0f} MiB, cap {cap_mib} MiB, resident growth {grown / 2**20:.0f} MiB"
        )
        assert grown < cap_mib * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB"

        model, ref = _reference(
            big,
            method="wanda",
            sparsity="2:4",
            dataset=torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1)),
            num_calibration_samples=4,
            max_seq_length=32,
        )
        masks = load_keep_masks(out)
        assert masks.keys() == ref.keep_masks.keys()
        assert all(torch.equal(masks[k], ref.keep_masks[k]) for k in masks)
        from safetensors import safe_open

        expected = model.state_dict()
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        for shard in sorted(set(index.values())):
            with safe_open(str(out / shard), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118
                    assert torch.equal(fh.get_tensor(key), expected[key]), key
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
