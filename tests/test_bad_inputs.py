"""Bad input, table-driven: each case through the CLI and the Python API.

For every case: the CLI exits 2 with one short line that names the fix and no traceback, the API raises
an ``LlmpruneError`` with the same fix, no expensive work starts (cases marked ``config`` never load the
model; ``model`` cases never run a forward), and the folder the run was given is byte-identical after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SAMPLE_TEXT, VOCAB, make_model

import llmprune
from llmprune.cli import main
from llmprune.errors import LlmpruneError
from llmprune.io.inspect import inspect_checkpoint
from llmprune.recipe import load_recipe
from llmprune.recovery import recover as llmprune_recover


@dataclass
class Env:
    root: Path
    model: Path  # a tiny Llama checkpoint with a tokenizer
    text: Path
    work: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def env(tmp_path, tiny_tokenizer) -> Env:
    model = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    (tmp_path / "notes").mkdir()  # a folder of the user's, holding a config.json among other things
    (tmp_path / "notes" / "config.json").write_text("{}")
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    (tmp_path / "notes" / "figures").mkdir()
    (tmp_path / "notes" / "figures" / "a.png").write_bytes(b"png")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    (tmp_path / "damaged.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    bert.save_pretrained(tmp_path / "bert-mlm")
    tiny_tokenizer.save_pretrained(tmp_path / "bert-mlm")
    small = make_model("llama")  # a vocabulary of 64: the tokenizer's ids go up to 127
    small.resize_token_embeddings(64)
    small.save_pretrained(tmp_path / "small-vocab")
    tiny_tokenizer.save_pretrained(tmp_path / "small-vocab")
    other = make_model("gpt2")
    other.resize_token_embeddings(VOCAB + 64)
    other.save_pretrained(tmp_path / "other-vocab")
    return Env(tmp_path, model, text)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if "__pycache__" not in p.parts
    }


def _prune_flags(e: Env, *extra: str) -> list[str]:
    return [
        "prune", "--model", str(e.model), "--dataset", str(e.text), "--num_calibration_samples", "2",
        "--max_seq_length", "16", "--skip_eval", *extra,
    ]  # fmt: skip


def _api(e: Env, **kwargs):
    settings = dict(dataset=str(e.text), num_calibration_samples=2, max_seq_length=16, progress=False)
    return lambda: llmprune.prune(str(e.model), **{**settings, **kwargs})


def _earlier_output(e: Env) -> Path:
    out = e.root / "earlier"
    if not out.exists():
        model = make_model("llama")
        llmprune.save_pruned(model, None, out)
    return out


def _recover_api(e: Env):
    from llmprune.recovery import recover

    def call():
        student, teacher = make_model("llama"), make_model("gpt2")
        teacher.resize_token_embeddings(VOCAB + 64)
        recover(student, input_ids=torch.zeros(2, 8, dtype=torch.long), dense_model=teacher, steps=1)

    return call


def _out_of_vocab(e: Env):
    ids = torch.full((2, 16), VOCAB + 5)
    return lambda: llmprune.prune(make_model("llama"), dataset=ids, progress=False)


# stage: what may run before the refusal. config: nothing is loaded; model: the model loads, no data is
# read; data: the model and the tokens are read, nothing is pruned.
# id, stage, CLI argv (None: no CLI form), API call (None: no API form), what the message must say
CASES = [
    ("foreign-folder", "config",
     lambda e: _prune_flags(e, "--output_dir", str(e.root / "notes")),
     lambda e: _api(e, output_dir=str(e.root / "notes")), "new or empty folder"),
    ("foreign-folder-overwrite", "config",
     lambda e: _prune_flags(e, "--output_dir", str(e.root / "notes"), "--overwrite"),
     lambda e: _api(e, output_dir=str(e.root / "notes"), overwrite=True), "new or empty folder"),
    ("earlier-output-no-overwrite", "config",
     lambda e: _prune_flags(e, "--output_dir", str(_earlier_output(e))),
     lambda e: _api(e, output_dir=str(_earlier_output(e))), "--overwrite"),
    ("output-under-a-file", "config",
     lambda e: _prune_flags(e, "--output_dir", str(e.root / "a-file" / "out")),
     lambda e: _api(e, output_dir=str(e.root / "a-file" / "out")), "which is a file"),
    ("output-inside-the-input", "config",
     lambda e: _prune_flags(e, "--output_dir", str(e.model / "pruned")),
     lambda e: _api(e, output_dir=str(e.model / "pruned")), "separate folder"),
    ("missing-dataset", "config",
     lambda e: ["prune", "--model", str(e.model), "--dataset", str(e.root / "nope.txt"), "--skip_eval"],
     lambda e: _api(e, dataset=str(e.root / "nope.txt")), "does not exist"),
    ("malformed-jsonl", "config",
     lambda e: ["prune", "--model", str(e.model), "--dataset", str(e.root / "bad.jsonl"), "--skip_eval"],
     lambda e: _api(e, dataset=str(e.root / "bad.jsonl")), "line 2 is not JSON"),
    ("non-numeric-option", "config",
     lambda e: _prune_flags(e, "--method", "sparsegpt", "--option", "block_size=big"),
     lambda e: _api(e, method="sparsegpt", block_size="big"), "expects an integer"),
    ("non-numeric-recovery-option", "config",
     lambda e: ["recover", "--model", str(e.model), "--option", "r=wide"],
     lambda e: lambda: llmprune_recover(make_model("llama"), input_ids=torch.zeros(2, 8, dtype=torch.long),
                                        r="wide"), "expects an integer"),
    ("micro-batch-in-retrain", "config",
     lambda e: ["recover", "--model", str(e.model), "--option", "micro_batch=2"],
     lambda e: lambda: llmprune_recover(make_model("llama"), input_ids=torch.zeros(2, 8, dtype=torch.long),
                                        micro_batch=2), "retrain's step is batch_size"),
    ("cuda-on-cpu", "config",
     lambda e: _prune_flags(e, "--device", "cuda"),
     lambda e: _api(e, device="cuda"), "--device cpu"),
    ("not-a-causal-lm", "config",
     lambda e: _prune_flags(e, "--model", str(e.root / "bert-mlm")),
     lambda e: lambda: llmprune.prune(str(e.root / "bert-mlm"), dataset=str(e.text)), "not a causal"),
    ("position-limit", "config",
     lambda e: _prune_flags(e, "--max_seq_length", "4096"),
     lambda e: _api(e, max_seq_length=4096), "at most 64"),
    ("empty-recipe", "config",
     lambda e: ["prune", "--recipe", str(e.root / "empty.yaml")],
     lambda e: lambda: load_recipe(e.root / "empty.yaml"), "is empty"),
    ("unknown-task", "config",
     lambda e: _prune_flags(e, "--tasks", "llmprune_mcq"),
     None, "llmprune_mc"),
    ("eval-limit-word", "config",
     lambda e: _prune_flags(e, "--eval_limit", "most"),
     lambda e: lambda: llmprune.perplexity(make_model("llama"), None, limit="most"), "'all'"),
    ("targets-typo", "model",
     lambda e: _prune_flags(e, "--targets", "down_prj"),
     lambda e: _api(e, targets=["down_prj"]), "down_proj"),
    ("streaming-targets-typo", "model",
     lambda e: _prune_flags(e, "--targets", "down_prj", "--streaming", "--output_dir", str(e.root / "o")),
     lambda e: _api(e, targets=["down_prj"], streaming=True, output_dir=str(e.root / "o")), "down_proj"),
    ("ignore-matches-nothing", "model",
     lambda e: _prune_flags(e, "--ignore", "re:layers\\.7\\."),
     lambda e: _api(e, ignore=["re:layers\\.7\\."]), "matches no Linear"),
    ("override-matches-nothing", "model", None,
     lambda e: _api(e, overrides={"up_prj": 0.3}), "up_proj"),
    ("nothing-left", "model",
     lambda e: _prune_flags(e, "--targets", "q_proj", "--ignore", "q_proj"),
     lambda e: _api(e, targets=["q_proj"], ignore=["q_proj"]), "drop an --ignore"),
    ("token-ids-outside-vocab", "data", None, _out_of_vocab, "outside the model's vocabulary"),
    ("teacher-other-vocabulary", "config",
     lambda e: ["recover", "--model", str(e.model), "--dense_model", str(e.root / "other-vocab")],
     _recover_api, "vocabulary"),
    ("recover-output-foreign", "config",
     lambda e: ["recover", "--model", str(e.model), "--output_dir", str(e.root / "notes"), "--skip_eval"],
     None, "new or empty folder"),
    ("eval-not-a-causal-lm", "config",
     lambda e: ["eval", "--model", str(e.root / "bert-mlm"), "--tasks", "none"], None, "not a causal"),
    ("eval-cuda-on-cpu", "config",
     lambda e: ["eval", "--model", str(e.model), "--tasks", "none", "--device", "cuda"], None,
     "--device cpu"),
    ("sweep-missing-dataset", "config",
     lambda e: ["sweep", "--model", str(e.model), "--sparsities", "0.5", "--dataset", str(e.root / "x.txt")],
     None, "does not exist"),
    ("eval-tokens-outside-vocab", "data",
     lambda e: ["eval", "--model", str(e.root / "small-vocab"), "--tasks", "none", "--eval_dataset",
                str(e.text)],
     None, "outside the model's vocabulary"),
    ("damaged-safetensors", "config",
     lambda e: ["inspect", str(e.root / "damaged.safetensors")],
     lambda e: lambda: inspect_checkpoint(e.root / "damaged.safetensors"), "damaged"),
]  # fmt: skip


def _forbid_work(monkeypatch, stage: str) -> None:
    """Loading (``config`` cases), reading data (``model``) or pruning (``data``) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"expensive work started for a {stage} case")

    monkeypatch.setattr("llmprune.api.prune_blocks", refuse)
    if stage != "data":
        monkeypatch.setattr("llmprune.calibration.settings.calibration_tokens", refuse)
        monkeypatch.setattr("llmprune.evaluation.perplexity.eval_windows", refuse)
    if stage == "config":
        monkeypatch.setattr("llmprune.io.models._from_pretrained", refuse)


def _applicable(name: str, form, what: str) -> None:
    if form is None:
        pytest.skip(f"no {what} form")
    if name.endswith("cuda-on-cpu") and torch.cuda.is_available():
        pytest.skip("a GPU is visible")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_through_the_cli(case, env, monkeypatch, capsys):
    name, stage, argv, _api_call, message = case
    _applicable(name, argv, "command-line")
    argv = argv(env)
    capsys.readouterr()  # what setting up the case printed
    before = _snapshot(env.root)
    _forbid_work(monkeypatch, stage)
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("llmprune: error:")]
    assert len(errors) == 1 and message in errors[0] and len(errors[0]) < 400, err
    assert "Traceback" not in err, err
    assert _snapshot(env.root) == before


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_through_the_api(case, env, monkeypatch):
    name, stage, _argv, api_call, message = case
    _applicable(name, api_call, "Python API")
    call = api_call(env)
    before = _snapshot(env.root)
    _forbid_work(monkeypatch, stage)
    with pytest.raises(LlmpruneError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(env.root) == before


def test_the_folder_with_foreign_files_survives_a_real_run(env):
    """The same refusal with nothing patched: the user's folder is intact, nothing was written beside it."""
    before = _snapshot(env.root)
    assert main(_prune_flags(env, "--output_dir", str(env.root / "notes"), "--overwrite")) == 2
    assert _snapshot(env.root) == before
    assert json.loads((env.root / "notes" / "config.json").read_text()) == {}


def test_more_processes_than_windows_fail_before_the_model_loads(env, monkeypatch, capsys):
    """Processes share samples, not batches: 2 windows for 2 processes run at any batch size, and only
    a third process, with no window left for it, is refused, before anything loads or is scored."""
    from llmprune.calibration import distributed
    from llmprune.preflight import check_world

    class ThreeRanks(distributed.Comm):
        world = 3

    check_world(2, 2)  # before: "2 windows in batches of 8 make 1 batch(es) for 2 processes"
    monkeypatch.setattr(distributed, "current_comm", lambda: ThreeRanks())
    _forbid_work(monkeypatch, "config")
    before = _snapshot(env.root)
    argv = ["prune", "--model", str(env.model), "--dataset", str(env.text), "--num_calibration_samples", "2"]
    assert main([*argv, "--max_seq_length", "16", "--eval_dataset", str(env.text)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("llmprune: error:")]
    assert len(errors) == 1 and "--nproc_per_node 2 or less" in errors[0], err
    assert _snapshot(env.root) == before


def _as_a_normal_user(monkeypatch) -> None:
    """``os.access`` as for a user who owns the files but is not root: the mode bits decide (root,
    which runs these tests, may write anywhere, so the check could never fail here otherwise)."""
    import os
    import stat

    def access(path, mode, **kwargs):
        bits = os.stat(path).st_mode
        wanted = [(os.R_OK, stat.S_IRUSR), (os.W_OK, stat.S_IWUSR), (os.X_OK, stat.S_IXUSR)]
        return all(bits & bit for flag, bit in wanted if mode & flag)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("where", ["existing", "new"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(env, monkeypatch, capsys, where):
    """Before: a traceback after all the pruning work. Read-only folder (empty, or the parent of a new
    one): one line naming the fix, the model never loaded, nothing written."""
    locked = env.root / "locked"
    locked.mkdir()
    out = locked if where == "existing" else locked / "out"
    _as_a_normal_user(monkeypatch)
    _forbid_work(monkeypatch, "config")
    locked.chmod(0o555)
    try:
        before = _snapshot(env.root)
        assert main(_prune_flags(env, "--output_dir", str(out))) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("llmprune: error:")]
        assert len(errors) == 1 and "is not writable: choose a folder you can write to" in errors[0], err
        assert "Traceback" not in err
        with pytest.raises(LlmpruneError, match="is not writable") as api_err:
            _api(env, output_dir=str(out))()
        assert "\n" not in str(api_err.value)
        assert _snapshot(env.root) == before and not any(locked.iterdir())
    finally:
        locked.chmod(0o755)
