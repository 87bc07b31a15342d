"""Bad input gets a clear, early error naming the fix."""

from __future__ import annotations

import pytest
import torch

import llmprune
from llmprune.errors import ConfigError, DataError, ModelLoadError
from llmprune.spec import ModuleSelection, NMPattern, SparsitySpec


@pytest.mark.parametrize(
    "value,expected",
    [
        (0.5, 0.5),
        ("0.5", 0.5),
        ("50%", 0.5),
        (0, 0.0),
        ("2:4", 0.5),
        ("1:4", 0.75),
        ("3:4", 0.25),
        ("4:8", 0.5),
    ],
)
def test_parse(value, expected):
    assert SparsitySpec.parse(value).sparsity == expected


@pytest.mark.parametrize(
    "value,fix",
    [
        (-0.1, "[0, 1)"),
        (1.0, "[0, 1)"),
        (50, "50 % is 0.5"),
        ("abc", "2:4"),
        ("4:4", "0 < N < M"),
        ("0:4", "0 < N < M"),
        (float("nan"), "number"),
        (True, "number"),
    ],
)
def test_bad_sparsity(value, fix):
    with pytest.raises(ConfigError) as err:
        SparsitySpec.parse(value)
    assert fix in str(err.value)


def test_keep_semantics_of_nm():
    assert NMPattern.parse("1:4") == NMPattern(1, 4) and NMPattern(1, 4).sparsity == 0.75


def test_nm_must_divide_width(token_ids):
    from conftest import make_model

    with pytest.raises(ConfigError, match="not divisible by M=5.*ignore"):
        llmprune.prune(
            make_model("llama"),
            None,
            sparsity="3:5",
            dataset=token_ids,
            progress=False,
            num_calibration_samples=2,
            max_seq_length=8,
        )


def test_unknown_method_suggests():
    with pytest.raises(ConfigError, match="did you mean 'wanda'"):
        llmprune.prune(None, method="wnda")


def test_unknown_solver_option_suggests():
    with pytest.raises(ConfigError, match="did you mean 'scope'"):
        llmprune.get_solver("magnitude").check_options({"scop": "global"})


def test_bad_regex():
    with pytest.raises(ConfigError, match="regular expression"):
        ModuleSelection.build(0.5, ignore=["re:("])


def test_empty_calibration_data(tiny_tokenizer):
    from conftest import make_model

    for empty in ([], ["", "   "]):
        with pytest.raises(DataError, match="no text"):
            llmprune.prune(
                make_model("llama"),
                tiny_tokenizer,
                dataset=empty,
                progress=False,
                num_calibration_samples=2,
                max_seq_length=8,
            )
    with pytest.raises(DataError, match="non-empty"):
        llmprune.prune(
            make_model("llama"),
            None,
            dataset=torch.zeros(0, 8, dtype=torch.long),
            progress=False,
            max_seq_length=8,
        )


def test_too_long_window(token_ids):
    from conftest import make_model

    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        llmprune.prune(make_model("llama"), None, dataset=token_ids, max_seq_length=4096, progress=False)


def test_missing_model(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        llmprune.load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        llmprune.load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="Fix"):
        llmprune.load_model("no-such-org/no-such-model")


def test_corrupt_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="could not load"):
        llmprune.load_model(str(bad))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{ this is not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        llmprune.load_model(str(tmp_path / "ckpt"))
