"""The frontier benchmark's done-when reading: which rows it compares and where the thresholds fall."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _bench_frontier():
    spec = importlib.util.spec_from_file_location("bench_frontier", SCRIPTS / "bench_frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(method: str, sparsity: str, ppl: float, **options) -> tuple[str, dict]:
    key = f"{method}|{sparsity}|{json.dumps(options, sort_keys=True)}"  # as bench_common.run_key
    return key, {"method": method, "sparsity": sparsity, "options": options, "ppl": ppl}


def _row(text: str, starts: str) -> list[str]:
    (line,) = [x for x in text.splitlines() if x.startswith("| " + starts)]
    return [c.strip() for c in line.strip("|").split("|")]


def test_allocation_target_uses_the_best_allocated_run_and_the_ten_percent_edge():
    bf = _bench_frontier()
    runs = dict(
        [
            _run("icbs", "0.7", 200.0),
            _run("alps", "0.7", 150.0),  # best overall, but uniform: not eligible for the allocation item
            _run("icbs", "0.7", 181.0, allocation="owl"),
            _run("alps", "0.7", 180.0, allocation="error"),  # exactly 10 % below: met
            _run("wanda", "0.7", 900.0),
            _run("wanda", "0.7", 950.0, allocation="owl"),  # OWL raises Wanda here: not met
        ]
    )
    text = bf.done_when(runs, peers=[{"label": "ALPS (reference)", "sparsity": "0.7", "ppl": 150.0}])
    row = _row(text, "70 %: best with an allocation")
    assert row[1] == "alps + error: 180.00" and row[2] == "icbs + uniform: 200.00"
    assert row[3] == "-10.0 %" and row[4] == "**met**"
    assert _row(text, "70 %: OWL lowers wanda")[4] == "not met"
    assert "not measured" in _row(text, "70 %: OWL lowers sparsegpt")[4]
    # at 70 % the reference must be beaten strictly: a tie (150 vs 150) is not met
    ref = _row(text, "70 %: best llmprune below ALPS")
    assert ref[1] == "alps + uniform: 150.00" and ref[4] == "not met"
    assert "not measured" in _row(text, "2:4: best configuration")[4]
    # every reference the issue names gets a row, run or not
    assert _row(text, "70 %: best llmprune below OWL Wanda")[4] == "not measured (baseline)"
    assert _row(text, "2:4: best llmprune below ALPS")[4] == "not measured (ours and baseline)"


def test_two_four_and_fifty_percent_thresholds():
    bf = _bench_frontier()
    runs = dict([_run("icbs", "2:4", 100.0), _run("alps", "2:4", 95.5), _run("icbs", "0.5", 60.0)])
    peers = [
        {"label": "OWL Wanda (reference)", "sparsity": "2:4", "ppl": 96.0},
        {"label": "OWL SparseGPT (reference)", "sparsity": "0.5", "ppl": 60.0},
    ]
    text = bf.done_when(runs, peers)
    assert _row(text, "2:4: best configuration")[4] == "not met"  # 4.5 % lower, 5 % asked
    assert _row(text, "2:4: best llmprune below OWL Wanda")[4] == "**met**"
    assert _row(text, "50 %: best llmprune no worse than OWL SparseGPT")[4] == "**met**"  # a tie: no worse


def test_sweeps_sharing_a_results_file_keep_each_others_rows(tmp_path, monkeypatch):
    from argparse import Namespace

    bf = _bench_frontier()
    out = tmp_path / "frontier.json"
    args = Namespace(out=out, table_only=False, model="m", data=tmp_path, threads=1)
    first, second = bf.Sweep(args), bf.Sweep(args)  # both loaded the (empty) file before either ran
    monkeypatch.setattr(bf.bench, "child", lambda _script, argv: {"ppl": float(len(argv[-2]))})
    first.run("wanda", "0.7", {})
    second.run("alps", "0.7", {})  # a stale in-memory copy must not drop the first sweep's row
    assert set(json.loads(out.read_text())) == {"wanda|0.7|{}", "alps|0.7|{}"}
    calls = []
    monkeypatch.setattr(bf.bench, "child", lambda _script, argv: calls.append(argv) or {"error": "boom"})
    assert second.run("wanda", "0.7", {}) == {"ppl": 3.0}  # finished elsewhere: not run again
    assert calls == []
    out.write_text(json.dumps({"icbs|0.7|{}": {"error": "killed"}}))
    first.run("icbs", "0.7", {})  # an earlier failure is retried, and a new failure is kept
    assert len(calls) == 1 and json.loads(out.read_text())["icbs|0.7|{}"] == {"error": "boom"}


def test_a_setting_other_than_the_defaults_counts_and_is_named():
    """The issue asks for the best llmprune *configuration*: a run with --options may be it, but the
    table must say which settings it used, so nobody reads it as the default."""
    bf = _bench_frontier()
    runs = dict([_run("icbs", "2:4", 200.0), _run("alps", "2:4", 120.0)])
    runs["alps|2:4|quality"] = {
        "method": "alps", "sparsity": "2:4", "options": {"rho": 0.5, "max_iterations": 300}, "ppl": 110.0,
    }  # fmt: skip
    text = bf.done_when(runs, peers=[{"label": "ALPS (reference)", "sparsity": "2:4", "ppl": 115.0}])
    row = _row(text, "2:4: best llmprune below ALPS")
    assert row[1] == "alps (max_iterations 300, rho 0.5) + uniform: 110.00" and row[4] == "**met**"
