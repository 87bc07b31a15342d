"""The model card (README.md) of a pruned checkpoint: Hub metadata plus an honest account of the run.

The YAML front matter is built with ``huggingface_hub.ModelCardData`` so the Hub can index it
(base model, license, tags, datasets, ``model-index`` with the measured perplexity). The text says how
the model was made, how it was measured, and what unstructured zeros do and do not buy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from llmprune.io.format_card import format_section, format_tag
from llmprune.structured.card import structure_lines

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE_SNAPSHOT = re.compile(r"models--([\w.-]+)--([\w.-]+)/snapshots/")  # the Hub cache's layout
#: llmprune's dataset shorthands and the Hub datasets they load (see llmprune.calibration.data)
_HUB_DATASETS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext", "wikitext-2": "Salesforce/wikitext"}


def recipe_value(mapping: Mapping | None, *keys: str) -> Any:
    """First of ``keys`` found at the top level or one level down (recipes nest by section).

    Sections are searched in order, so ``method`` finds ``prune.method`` before ``recover.method``.
    """
    if not isinstance(mapping, Mapping):
        return None
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    for value in mapping.values():
        if isinstance(value, Mapping):
            for key in keys:
                if value.get(key) is not None:
                    return value[key]
    return None


def hub_dataset(name: Any) -> str | None:
    """The Hub dataset id a dataset setting refers to, or None for local files and built-in text."""
    if not isinstance(name, str):
        return None
    if name in _HUB_DATASETS:
        return _HUB_DATASETS[name]
    return name if _HUB_ID.match(name) and not Path(name).expanduser().exists() else None


def _source_metadata(source: str | None) -> dict[str, Any]:
    """Front matter of the source model's own card, from its folder or the local Hub cache (no network)."""
    if not source:
        return {}
    path = Path(source).expanduser()
    readme: str | Path | None = path / "README.md" if path.is_dir() else None
    if readme is None and _HUB_ID.match(source):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "README.md")
        readme = cached if isinstance(cached, str) else None
    if readme is None or not Path(readme).is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.to_dict()
    except Exception as exc:  # a malformed source card must not stop the save
        log.warning("could not read the source model card %s: %s", readme, exc)
        return {}


def _embedded_hub_id(source: str | None) -> str | None:
    """Hub id of llmprune's embedded default model, when that is the source."""
    from llmprune.io import models

    for name, (_req, _gguf, hub_id) in models._EMBEDDED.items():
        if source == name or (
            source and Path(source).expanduser().resolve() == models.cache_dir().resolve() / name
        ):
            return hub_id
    return None


def resolve_base(run_info: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(base_model Hub id, license): explicit run_info first, then what the source path tells.

    A local folder's own card is read for its license only: its ``base_model`` names the folder's
    parent, not the folder, so it would mislabel a fine-tune.
    """
    source = run_info.get("source_model")
    base = run_info.get("base_model") or _embedded_hub_id(source)
    if base is None and isinstance(source, str):
        snapshot = _HF_CACHE_SNAPSHOT.search(source.replace("\\", "/"))
        if snapshot:
            base = f"{snapshot.group(1)}/{snapshot.group(2)}"
        elif _HUB_ID.match(source) and not Path(source).exists():
            base = source
    meta = _source_metadata(source) or (_source_metadata(base) if base and base != source else {})
    return base, run_info.get("license") or meta.get("license")


def _ppl_value(entry: Any, key: str = "ppl") -> float | None:
    value = entry.get(key) if isinstance(entry, Mapping) else entry if key == "ppl" else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _lm_eval_tables(lm_eval: Any) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(pruned, dense) as task -> metric -> value, from lm-eval's raw output or a plain mapping."""

    def table(raw: Any) -> dict[str, dict[str, float]]:
        raw = raw.get("results", raw) if isinstance(raw, Mapping) else {}
        out: dict[str, dict[str, float]] = {}
        for task, values in raw.items():
            if not isinstance(values, Mapping):
                continue
            for key, value in values.items():
                metric = str(key).split(",")[0]
                if "stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                out.setdefault(str(task), {})[metric] = float(value)
        return out

    if isinstance(lm_eval, Mapping) and ("pruned" in lm_eval or "dense" in lm_eval):
        return table(lm_eval.get("pruned")), table(lm_eval.get("dense"))
    return table(lm_eval), {}


def eval_results(metrics: Mapping[str, Any] | None) -> list:
    """``model-index`` entries: perplexity of this model (and of its dense base), lm-eval scores."""
    from huggingface_hub import EvalResult

    results = []
    ppl = (metrics or {}).get("perplexity")
    if isinstance(ppl, Mapping):
        name = ppl.get("dataset") or "llmprune built-in evaluation text"
        kind = hub_dataset(name) or str(name)
        common = {"task_type": "text-generation", "task_name": "Language modeling", "dataset_type": kind}
        common["dataset_name"] = str(name)
        for label, entry, key, metric in (
            ("Perplexity", ppl.get("pruned"), "ppl", "perplexity"),
            ("Perplexity of the dense base model", ppl.get("dense"), "ppl", "perplexity"),
            ("Bits per byte", ppl.get("pruned"), "bits_per_byte", "bits_per_byte"),
        ):
            value = _ppl_value(entry, key)
            if value is not None:
                results.append(
                    EvalResult(**common, metric_type=metric, metric_name=label, metric_value=value)
                )
    pruned, _ = _lm_eval_tables((metrics or {}).get("lm_eval"))
    for task, values in pruned.items():
        for metric, value in values.items():
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=task,
                    metric_type=metric,
                    metric_value=value,
                )
            )
    return results


_LIMITS = """\
## What the zeros buy, and what they don't

This checkpoint is stored **dense**: every pruned weight is an exact `0.0` in an ordinary safetensors
file, so it loads anywhere `transformers` does.

- **Size:** the files are as large as the dense model's. Zeros only save space once the files are
  compressed (e.g. `zstd`) or stored in a sparse format; loading still takes dense memory.
- **Speed:** dense kernels on CPU and GPU multiply zeros like any other number, so inference is
  **not** faster and uses the same memory as the dense model.
- **2:4 patterns** can speed up GPU prefill (compute-bound matmuls) on NVIDIA Ampere or newer, but
  only with kernels that support semi-structured sparsity (e.g. PyTorch's `to_sparse_semi_structured`
  / cuSPARSELt); mainstream serving stacks do not use them, and decoding gains little.
- **Structured removal** (dropping heads, channels or layers) is what makes a model smaller and faster
  everywhere; unstructured and N:M pruning do not remove anything.

What pruning does give you is a model that keeps most of its quality with a known fraction of its
weights at zero: a starting point for compression, sparse kernels, or further fine-tuning (the
`masks.safetensors` file holds the keep-masks, to hold the zeros in place while training).
"""


def _pattern_tag(target: str | None) -> str | None:
    if not target:
        return None
    return f"{target.replace(':', 'of')}-sparsity" if ":" in target else "unstructured-sparsity"


def _body(
    title: str,
    sparsity: Mapping,
    recipe: Any,
    run_info: Mapping,
    metrics: Mapping | None,
    base: str | None,
    license_: str | None,
) -> str:
    method, target = sparsity.get("method"), sparsity.get("target")
    overall = sparsity.get("overall_sparsity", 0.0)
    nm = ", ".join(sparsity.get("nm_patterns") or []) or "none"
    how = f" using **{method}** at target **{target}**" if method else ""
    lines = [f"# {title}", ""]
    lines.append(
        f"{'`' + base + '`' if base else 'A causal language model'} pruned with "
        f"[llmprune](https://pypi.org/project/llmprune/){how}: {overall:.2%} of the weights of the "
        f"{sparsity.get('num_modules', 0)} Linear layers inside the decoder blocks are exactly zero (N:M "
        f"patterns held by every one of them: {nm}). Embeddings, norms and the output head are left dense."
    )
    if not license_:
        lines += ["", "License: not recorded here; this model inherits the license of its base model."]
    lines += ["", "## How it was made", ""]
    if run_info.get("command"):
        lines += ["```bash", str(run_info["command"]), "```", ""]
    if recipe:
        lines += [
            "Resolved recipe (`recipe.yaml`):",
            "",
            "```yaml",
            yaml.safe_dump(recipe, sort_keys=False).rstrip(),
        ]
        lines += ["```", ""]
    cal = [
        (
            "calibration data",
            recipe_value(recipe, "dataset") or ("llmprune built-in text" if recipe else None),
        ),
        ("calibration samples", run_info.get("num_calibration_samples")),
        ("sequence length", run_info.get("max_seq_length")),
        ("seed", run_info.get("seed")),
        ("calibration token hash (sha256)", run_info.get("calibration_hash")),
    ]
    lines += [f"- {k}: `{v}`" for k, v in cal if v not in (None, "")]
    versions = run_info.get("versions") or {}
    lines += ["- software: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v and "git" not in k), ""]
    lines += _evaluation(metrics)
    if run_info.get("structure"):  # a structurally pruned (smaller) model
        lines += structure_lines(run_info["structure"], run_info.get("speed"))
    lines += ["## Achieved sparsity", "", "| matrix | count | sparsity | N:M valid |", "|---|---|---|---|"]
    for kind, (count, ratio, valid) in _by_kind(sparsity.get("modules") or {}).items():
        lines.append(f"| {kind} | {count} | {ratio:.2%} | {valid} |")
    lines += ["", "Per-matrix figures are in `sparsity.json`; versions and timings in `run_info.json`.", ""]
    repo = title if "/" in title else "path/to/this/folder"
    stored_as = format_section(run_info.get("weights_format"), repo)
    if stored_as:
        return "\n".join(lines + stored_as)
    lines += [
        _LIMITS,
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
    ]
    lines += [
        f'model = AutoModelForCausalLM.from_pretrained("{title if "/" in title else "path/to/this/folder"}")',
        "",
        "# keep-masks (True = kept), e.g. to hold the zeros during fine-tuning:",
        "from llmprune.io.save import load_keep_masks",
        'masks = load_keep_masks("path/to/this/folder/masks.safetensors")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _by_kind(modules: Mapping[str, Mapping]) -> dict[str, tuple[int, float, str]]:
    """Sparsity per kind of matrix (q_proj, down_proj, ...), summed over the blocks."""
    groups: dict[str, list[Mapping]] = {}
    for name, info in modules.items():
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(info)
    out = {}
    for kind, infos in groups.items():
        total = sum(i["shape"][0] * i["shape"][1] for i in infos)
        zeros = sum(i["zeros"] for i in infos)
        checks = [i.get("nm_valid") for i in infos if i.get("nm_valid") is not None]
        valid = ("yes" if all(checks) else f"NO ({checks.count(False)} invalid)") if checks else "-"
        out[kind] = (len(infos), zeros / total if total else 0.0, valid)
    return out


def _evaluation(metrics: Mapping | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if not metrics:
        return [*lines, "Not evaluated in this run.", ""]
    ppl = metrics.get("perplexity")
    if isinstance(ppl, Mapping):
        seq = ppl.get("seq_len") or ppl.get("max_seq_length") or recipe_value(ppl, "max_seq_length")
        windows = ppl.get("windows") or recipe_value(ppl, "windows")
        lines += [
            f"Perplexity on `{ppl.get('dataset') or 'llmprune built-in evaluation text'}`: "
            f"non-overlapping windows of {seq or '?'} tokens ({windows or '?'} windows), "
            "ppl = exp(mean next-token NLL) (GPTQ protocol).",
            "",
            "| model | perplexity | bits per byte |",
            "|---|---|---|",
        ]
        for label, key in (("dense base", "dense"), ("pruned (this model)", "pruned")):
            value, bpb = _ppl_value(ppl.get(key)), _ppl_value(ppl.get(key), "bits_per_byte")
            if value is not None:
                lines.append(f"| {label} | {value:.3f} | {'-' if bpb is None else f'{bpb:.4f}'} |")
        lines.append("")
    pruned, dense = _lm_eval_tables(metrics.get("lm_eval"))
    if pruned:
        lines += ["lm-evaluation-harness:", "", "| task | metric | dense | pruned |", "|---|---|---|---|"]
        for task, values in pruned.items():
            for metric, value in values.items():
                base = dense.get(task, {}).get(metric)
                lines.append(
                    f"| {task} | {metric} | {'-' if base is None else f'{base:.4f}'} | {value:.4f} |"
                )
        lines.append("")
    return lines if len(lines) > 2 else [*lines, "Not evaluated in this run.", ""]


def build_model_card(
    *,
    sparsity: Mapping[str, Any],
    recipe: Any = None,
    run_info: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    model_name: str | None = None,
):
    """A ``huggingface_hub.ModelCard`` for a pruned checkpoint, from what ``save_pruned`` writes.

    >>> card = build_model_card(sparsity=report, run_info=info, metrics=metrics)  # doctest: +SKIP
    >>> card.save("out/README.md")  # doctest: +SKIP
    """
    from huggingface_hub import ModelCard, ModelCardData

    run_info = run_info or {}
    base, license_ = resolve_base(run_info)
    method, target = sparsity.get("method"), sparsity.get("target")
    suffix = f"{method}-{str(target).replace(':', 'of')}" if method else "pruned"
    title = model_name or (f"{base.split('/')[-1]}-{suffix}" if base else f"llmprune-{suffix}")
    datasets = run_info.get("datasets") or [
        d
        for d in (hub_dataset(recipe_value(recipe, "dataset")), hub_dataset(recipe_value(metrics, "dataset")))
        if d
    ]
    stored_as = format_tag(run_info.get("weights_format"))
    tags = ["pruned", "sparse", "llmprune", method, _pattern_tag(target), stored_as]
    results = eval_results(metrics)
    data = ModelCardData(
        base_model=base,
        license=license_,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[t for t in tags if t],
        datasets=sorted(set(datasets)) or None,
        model_name=title if results else None,
        eval_results=results or None,
    )
    body = _body(title, sparsity, recipe, run_info, metrics, base, license_)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
