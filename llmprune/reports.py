"""What a run leaves behind for people: ``results.json``, a markdown summary, and PNG plots.

``results.json`` is the machine-readable record (llmprune version, resolved recipe, pruning report,
perplexity, lm-eval scores); ``results.md`` says the same for a reader; the plots show where sparsity
and error went. Every file is written atomically, so a crash never leaves half a report.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmprune.errors import ConfigError
from llmprune.io.atomic import atomic_write
from llmprune.result import PruneResult
from llmprune.spec import SparsitySpec
from llmprune.version import __version__

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")
_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")


# --------------------------------------------------------------------------- atomic files
def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=False)


def _jsonable(obj: Any) -> Any:
    """Tensors, paths and other odd values become plain JSON; NaN/inf become null (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "tolist"):  # tensors, numpy scalars
        return _jsonable(obj.tolist())
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


# --------------------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.4e}"
    return "–" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _perplexity_rows(ppl: Mapping[str, Any]) -> list[list[Any]]:
    """``{"ppl": …}`` (one model) or ``{"dense": {…}, "pruned": {…}}`` (before and after)."""
    runs = {"model": ppl} if "ppl" in ppl else {k: v for k, v in ppl.items() if isinstance(v, Mapping)}
    return [
        [name, r.get("ppl"), r.get("bits_per_byte"), f"{r.get('windows')}×{r.get('max_seq_length', '?')}"]
        for name, r in runs.items()
    ]


def results_markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """A human summary of ``results.json``: perplexity, lm-eval scores, pruning report."""
    lines = [f"# llmprune results: {results.get('model', 'model')}", ""]
    if results.get("perplexity"):
        lines += ["## Perplexity", ""]
        lines += _table(
            ["", "perplexity", "bits per byte", "windows"], _perplexity_rows(results["perplexity"])
        )
    lm = results.get("lm_eval")
    if lm and lm.get("tasks"):
        rows = []
        for task, scores in lm["tasks"].items():
            metrics = {k: v for k, v in scores.items() if k not in ("version", "num_samples", "num_fewshot")}
            rows += [
                [task, m, v, scores.get("num_samples"), scores.get("version")] for m, v in metrics.items()
            ]
        cfg = lm.get("config", {})
        shots, limit = cfg.get("num_fewshot", 0), cfg.get("limit")
        lines += [f"## lm-eval {lm.get('lm_eval_version', '')} ({shots}-shot, limit {limit})", ""]
        lines += _table(["task", "metric", "value", "samples", "task version"], rows)
    prune = results.get("prune")
    if prune:
        lines += ["## Pruning", ""]
        lines += _table(
            ["method", "target", "achieved (block Linears)", "options", "calibration", "seconds"],
            [
                [
                    prune["method"],
                    prune["sparsity"],
                    f"{100 * prune.get('overall_sparsity', 0):.2f} %",
                    json.dumps(prune.get("options") or {}),
                    f"{prune.get('num_calibration_samples')}×{prune.get('max_seq_length')}, seed "
                    f"{prune.get('seed')}, sha256 {str(prune.get('calibration_hash', ''))[:12]}",
                    prune.get("seconds"),
                ]
            ],
        )
        if prune.get("blocks"):
            lines += _table(
                ["block", "seconds", "relative reconstruction error"],
                [[b["name"], b["seconds"], b["recon_error"]] for b in prune["blocks"]],
            )
    for plot in plots:
        lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    """A Figure on the Agg canvas, without pyplot (no global backend switch, no GUI)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(f"plots need matplotlib ({exc}): pip install 'llmprune[plots]'.") from None
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), durable=False)


def _module_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_of(name: str) -> int | None:
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def plot_layer_sparsity(result: PruneResult, path: str | os.PathLike) -> Path:
    """One bar per pruned module (achieved fraction of zeros), coloured by kind, target as a tick."""
    if not result.modules:
        raise ConfigError("the pruning result has no modules to plot: was anything pruned?")
    modules = list(result.modules.values())
    kinds = list(dict.fromkeys(_module_kind(m.name) for m in modules))
    color = {k: _COLORS[i % len(_COLORS)] for i, k in enumerate(kinds)}
    fig = _figure(max(6.0, min(18.0, 0.06 * len(modules) + 4)), 4.0)
    ax = fig.add_subplot()
    xs = range(len(modules))
    ax.bar(
        xs, [m.sparsity for m in modules], width=0.85, color=[color[_module_kind(m.name)] for m in modules]
    )
    targets = [SparsitySpec.parse(m.target).sparsity for m in modules]
    ax.scatter(xs, targets, marker="_", s=60, color="black", linewidths=1.5, zorder=3, label="target")
    for kind in kinds:
        ax.bar([0], [0], color=color[kind], label=kind)  # legend entries only
    blocks = [_block_of(m.name) for m in modules]
    starts = [i for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)]
    step = max(1, math.ceil(len(starts) / 30))  # at most ~30 block labels
    ax.set_xticks(starts[::step], [str(blocks[i]) for i in starts[::step]])
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="0.85", linewidth=0.6, zorder=0)
    ax.set_xlim(-0.6, len(modules) - 0.4)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("achieved sparsity")
    overall = 100 * result.overall_sparsity
    ax.set_title(f"{result.method} {result.sparsity}: per-module sparsity (overall {overall:.1f}%)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    return _save(fig, path)


def plot_block_error(result: PruneResult, path: str | os.PathLike) -> Path:
    """Relative reconstruction error of each block's output on its calibration inputs."""
    if not result.blocks:
        raise ConfigError("the pruning result has no per-block report to plot.")
    errors = [b.recon_error for b in result.blocks]
    fig = _figure(max(6.0, min(14.0, 0.25 * len(errors) + 3)), 3.6)
    ax = fig.add_subplot()
    ax.bar([b.index for b in result.blocks], errors, color=_COLORS[0], width=0.8)
    positive = [e for e in errors if e > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("‖Y_pruned − Y_dense‖² / ‖Y_dense‖²")
    ax.set_title(f"{result.method} {result.sparsity}: block reconstruction error")
    ax.set_xticks([b.index for b in result.blocks][:: max(1, math.ceil(len(errors) / 30))])
    return _save(fig, path)


def plot_sparsity_curve(
    points: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    dense_ppl: float | None = None,
    title: str = "perplexity vs sparsity",
) -> Path:
    """``points``: ``{"sparsity": "0.5" | "2:4", "ppl": …}``; N:M points are drawn apart from the curve."""
    if not points:
        raise ConfigError("no sweep points to plot.")
    fig = _figure(6.4, 4.2)
    from matplotlib.ticker import LogLocator, NullFormatter

    ax = fig.add_subplot()
    specs = [(SparsitySpec.parse(p["sparsity"]), p["ppl"]) for p in points]
    curve = sorted((s.sparsity, ppl) for s, ppl in specs if s.pattern is None)
    if curve:
        ax.plot(
            [100 * x for x, _ in curve], [y for _, y in curve], "o-", color=_COLORS[0], label="unstructured"
        )
    nm = [(s, ppl) for s, ppl in specs if s.pattern is not None]
    if nm:
        ax.plot([100 * s.sparsity for s, _ in nm], [y for _, y in nm], "s", color=_COLORS[1], label="N:M")
        for s, y in nm:
            ax.annotate(str(s.pattern), (100 * s.sparsity, y), textcoords="offset points", xytext=(6, 4))
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="0.4", linestyle="--", linewidth=1, label=f"dense ({dense_ppl:.2f})")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sparsity of decoder-block Linears (%)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", color="0.9", linewidth=0.6)
    ax.legend(frameon=False)
    return _save(fig, path)


# --------------------------------------------------------------------------- everything at once
def write_report(
    output_dir: str | os.PathLike,
    results: Mapping[str, Any],
    prune_result: PruneResult | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (with a pruning result) the two PNG plots.

    Returns the written paths by kind. With ``plots=True`` a missing matplotlib is an error that says
    how to install it; pass ``plots=False`` to skip them.
    """
    out = Path(output_dir)
    written: dict[str, Path] = {}
    if plots and prune_result is not None and prune_result.modules:
        written["layer_sparsity"] = plot_layer_sparsity(prune_result, out / "layer_sparsity.png")
        if prune_result.blocks:
            written["block_error"] = plot_block_error(prune_result, out / "block_error.png")
    record = dict(results)
    if prune_result is not None and "prune" not in record:
        record["prune"] = prune_result.to_dict()
    if "llmprune_version" not in record:
        record = {"llmprune_version": __version__, **record}
    record = _jsonable(record)  # the summary shows exactly what the JSON holds (NaN as –)
    written["results"] = write_json(out / "results.json", record)
    plot_names = [str(p) for k, p in written.items() if k != "results"]
    written["summary"] = write_text(out / "results.md", results_markdown(record, plot_names))
    return written
