"""Reports: strict JSON, a readable markdown summary, PNG plots, atomic writes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from llmprune import reports
from llmprune.errors import ConfigError
from llmprune.io.atomic import atomic_write
from llmprune.result import BlockReport, ModuleReport, PruneResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result() -> PruneResult:
    r = PruneResult(method="wanda", sparsity="0.5", options={"x": 1}, calibration_hash="ab" * 32, seed=3)
    for b in range(3):
        for kind, shape in (("self_attn.q_proj", (8, 8)), ("mlp.down_proj", (8, 16))):
            name = f"model.layers.{b}.{kind}"
            target = "2:4" if kind.endswith("down_proj") else "0.5"
            r.modules[name] = ModuleReport(name, shape, target, 0.5 if b else 0.25)
        r.blocks.append(BlockReport(b, f"model.layers.{b}", 0.1, 10.0 ** -(b + 1)))
    return r


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_write_report(tmp_path):
    result = _result()
    results = {
        "model": "tiny",
        "perplexity": {
            "dense": {"ppl": 10.0, "bits_per_byte": 1.0, "windows": 2, "max_seq_length": 8},
            "pruned": {"ppl": 12.5, "bits_per_byte": float("nan"), "windows": 2, "max_seq_length": 8},
        },
        "lm_eval": {
            "lm_eval_version": "0.4.13",
            "config": {"num_fewshot": 0, "limit": 4},
            "tasks": {"llmprune_mc": {"acc": 0.25, "acc_norm": 0.5, "version": 1.0, "num_samples": 4}},
        },
    }
    written = reports.write_report(tmp_path / "out", results, prune_result=result)
    assert set(written) == {"results", "summary", "layer_sparsity", "block_error"}
    record = json.loads(written["results"].read_text())  # strict JSON: NaN became null
    assert record["perplexity"]["pruned"]["bits_per_byte"] is None
    assert record["prune"]["overall_sparsity"] == pytest.approx((192 * 0.25 + 2 * 192 * 0.5) / 576)
    assert record["llmprune_version"]
    md = written["summary"].read_text()
    assert "| pruned | 12.5 | – | 2×8 |" in md
    assert "| llmprune_mc | acc_norm | 0.5 | 4 | 1 |" in md
    assert "| model.layers.2 | 0.1 | 0.001 |" in md
    assert "![layer_sparsity](layer_sparsity.png)" in md
    for key in ("layer_sparsity", "block_error"):
        width, height = _png_size(written[key])
        assert width > 400 and height > 300
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["results.json", "results.md", "layer_sparsity.png", "block_error.png"]
    )  # no temp files left behind


def test_sweep_plot_and_bad_inputs(tmp_path):
    points = [
        {"sparsity": 0.3, "ppl": 11.0},
        {"sparsity": "0.7", "ppl": 90.0},
        {"sparsity": "2:4", "ppl": 30.0},
    ]
    path = reports.plot_sparsity_curve(points, tmp_path / "s.png", dense_ppl=10.0, title="t")
    assert _png_size(path)[0] > 400
    with pytest.raises(ConfigError, match="no sweep points"):
        reports.plot_sparsity_curve([], tmp_path / "e.png")
    with pytest.raises(ConfigError, match="no modules"):
        reports.plot_layer_sparsity(PruneResult("wanda", "0.5", {}), tmp_path / "e.png")


def test_failed_write_keeps_the_old_file(tmp_path):
    target = reports.write_json(tmp_path / "results.json", {"a": 1})

    def boom(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_jsonable():
    import torch

    odd = object()
    out = reports._jsonable({"t": torch.tensor([1.5, 2.0]), "inf": math.inf, 3: (1, "x"), "p": odd})
    assert out == {"t": [1.5, 2.0], "inf": None, "3": [1, "x"], "p": str(odd)}


def test_missing_matplotlib_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"llmprune\[plots\]"):
        reports.plot_block_error(_result(), tmp_path / "b.png")
    written = reports.write_report(tmp_path / "np", {"model": "m"}, prune_result=_result(), plots=False)
    assert set(written) == {"results", "summary"}
