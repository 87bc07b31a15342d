"""Every numerical fallback is recorded per module: in PruneResult, sparsity.json and the summary table."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, make_model

import llmprune
from llmprune import registry
from llmprune.cli.prune import format_table
from llmprune.solvers import hessian
from llmprune.solvers.types import LayerProblem, LayerStats, SolverResult

DOWN = "model.layers.0.mlp.down_proj"


def _ids(rows: int = 4, width: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, width), generator=torch.Generator().manual_seed(0))


def _bypass_down_proj(model) -> None:
    """Block 0's MLP computes down_proj with F.linear, so no calibration token ever reaches the module."""
    mlp = model.model.layers[0].mlp

    def forward(self, x):
        return F.linear(self.act_fn(self.gate_proj(x)) * self.up_proj(x), self.down_proj.weight)

    mlp.forward = types.MethodType(forward, mlp)


def test_a_linear_no_token_reaches_is_pruned_by_magnitude_and_says_so(tmp_path):
    """Before: all-zero statistics made Wanda's scores tie, and ties pruned the leading input columns."""
    model = make_model("llama")
    _bypass_down_proj(model)
    dense = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    result = llmprune.prune(model, method="wanda", sparsity=0.5, dataset=_ids(), progress=False)
    magnitude = registry.get_solver("magnitude")
    spec = llmprune.SparsitySpec.parse(0.5)
    expected = magnitude(LayerProblem(DOWN, dense, LayerStats(), spec)).keep
    assert torch.equal(result.keep_masks[DOWN], expected)
    assert result.keep_masks[DOWN][:, : dense.shape[1] // 2].any()  # not a cut of the leading columns
    assert result.fallbacks == {DOWN: ["no_calibration_tokens"]}
    llmprune.save_pruned(model, None, tmp_path / "out", result=result)
    saved = json.loads((tmp_path / "out" / "sparsity.json").read_text())["modules"]
    assert saved[DOWN]["fallbacks"] == ["no_calibration_tokens"]
    assert saved["model.layers.0.mlp.up_proj"]["fallbacks"] == []


def test_a_diagonal_hessian_fallback_is_recorded(monkeypatch):
    monkeypatch.setattr(hessian, "_upper_inverse_cholesky", lambda h, damp: None)  # never factors
    result = llmprune.prune(
        make_model("llama"), method="sparsegpt", sparsity=0.5, dataset=_ids(), progress=False
    )
    assert set(result.fallbacks) == set(result.modules)
    assert all(kinds == ["diagonal_hessian"] for kinds in result.fallbacks.values())
    assert result.overall_sparsity == 0.5


def test_non_finite_solver_weights_keep_the_originals_and_say_so(monkeypatch):
    wanda = registry.get_solver("wanda")

    def poisoned(problem, **options):
        keep = wanda(problem, **options).keep
        return SolverResult(keep=keep, weight=torch.full_like(problem.weight, float("nan")))

    monkeypatch.setitem(registry._SOLVERS, "wanda", dataclasses.replace(wanda, fn=poisoned))
    model = make_model("llama")
    before = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    result = llmprune.prune(model, method="wanda", dataset=_ids(), progress=False)
    after = model.model.layers[1].self_attn.o_proj.weight.detach()
    keep = result.keep_masks["model.layers.1.self_attn.o_proj"]
    assert torch.equal(after[keep], before[keep]) and torch.isfinite(after).all()
    assert all(kinds == ["kept_original_weights"] for kinds in result.fallbacks.values())
    summary = {
        "model": "m", "method": "wanda", "sparsity": "0.5", "achieved_sparsity": 0.5, "prune_seconds": 1.0,
        "peak_rss_mib": 1.0, "perplexity": {"dense": None, "pruned": None}, "fallbacks": result.fallbacks,
    }  # fmt: skip
    assert f"{len(result.modules)} kept_original_weights" in format_table(summary)


def test_overall_sparsity_counts_the_ignored_linears(tmp_path):
    """Before: only pruned modules were counted, so --ignore overstated the block Linears' sparsity."""
    model = make_model("llama")
    result = llmprune.prune(model, method="magnitude", sparsity=0.5, ignore=["down_proj"], progress=False)
    linears = [m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    assert result.overall_sparsity == pytest.approx(zeros / total) and result.overall_sparsity < 0.5
    llmprune.save_pruned(model, None, tmp_path / "out", result=result)
    saved = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert saved["overall_sparsity"] == pytest.approx(zeros / total)
    assert saved["modules"][DOWN]["target"] is None and saved["num_modules"] == len(linears)


def test_streaming_counts_the_ignored_linears_as_in_memory_does(tmp_path, tiny_tokenizer):
    make_model("llama").save_pretrained(tmp_path / "src")
    kw = dict(method="wanda", sparsity=0.5, ignore=["down_proj"], dataset=_ids(), progress=False)
    src, streamed_out = str(tmp_path / "src"), str(tmp_path / "streamed")
    streamed = llmprune.prune(src, streaming=True, output_dir=streamed_out, **kw)
    in_memory = llmprune.prune(make_model("llama"), output_dir=str(tmp_path / "memory"), **kw)
    assert streamed.overall_sparsity == pytest.approx(in_memory.overall_sparsity)
    assert in_memory.overall_sparsity < 0.5
    a, b = (json.loads((tmp_path / d / "sparsity.json").read_text()) for d in ("streamed", "memory"))
    assert a["overall_sparsity"] == pytest.approx(b["overall_sparsity"])
    assert a["modules"].keys() == b["modules"].keys()
