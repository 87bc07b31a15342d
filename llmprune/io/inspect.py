"""Reading sparsity back out of any safetensors checkpoint, without building the model.

Tensors are opened one at a time with ``safetensors.safe_open``, so inspecting a 7B checkpoint needs
the memory of its largest matrix, not of the model. Works on any Hugging Face folder; when the folder
was written by llmprune, the recipe, targets and metrics saved beside the weights are shown too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from llmprune.errors import ConfigError, ModelLoadError
from llmprune.io.compressed import WEIGHTS_NAME as COMPRESSED_WEIGHTS
from llmprune.io.compressed import iter_compressed
from llmprune.solvers.masks import nm_violations
from llmprune.spec import NMPattern

#: patterns checked on every matrix, weakest last ("1:4" implies "2:4" and "3:4"; "2:4" implies "4:8")
CHECKED_PATTERNS = (NMPattern(1, 4), NMPattern(2, 4), NMPattern(3, 4), NMPattern(4, 8))
#: model types whose attention/MLP matrices are transformers' Conv1D, stored (in, out)
_CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
_CONV1D_NAMES = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$")
_NOT_LINEAR = re.compile(r"(embed|wte|wpe|norm|ln_|layernorm)", re.IGNORECASE)
_LAYER_INDEX = re.compile(r"\.\d+\.")  # decoder-block tensors carry a layer index


def weight_stats(weight: Tensor) -> dict[str, Any]:
    """Exact zeros of a 2-D weight and the N:M patterns its zeros satisfy. weight: (out, in)."""
    keep = weight != 0  # (out, in)
    numel = keep.numel()
    zeros = numel - int(keep.sum())
    holds = [str(p) for p in CHECKED_PATTERNS if zeros and nm_violations(keep, p) == 0]
    return {
        "shape": [int(s) for s in weight.shape],
        "zeros": zeros,
        "sparsity": zeros / numel if numel else 0.0,
        "nm_patterns": holds,
    }


def is_linear_weight(name: str, tensor_shape: list[int]) -> bool:
    """A 2-D ``*.weight`` that is not an embedding or a norm: the matrices a pruner may touch."""
    return len(tensor_shape) == 2 and name.endswith(".weight") and not _NOT_LINEAR.search(name)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    return [f for f in files if f.name != "masks.safetensors"]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is not valid JSON ({exc}): re-save the checkpoint or delete that file."
        ) from None


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Per-module sparsity and N:M validity of every Linear-like weight in a checkpoint folder or file.

    >>> report = inspect_checkpoint("out/wanda-2of4")  # doctest: +SKIP
    >>> report["overall_sparsity"], report["nm_patterns"]  # doctest: +SKIP
    (0.5, ['2:4', '4:8'])
    """

    root = Path(path).expanduser()
    if root.is_file() and root.suffix == ".safetensors":
        folder, files = root.parent, [root]
    elif root.is_dir():
        folder, files = root, _weight_files(root)
    else:
        raise ConfigError(f"{root} is neither a checkpoint folder nor a .safetensors file: check the path.")
    if not files:
        raise ModelLoadError(
            f"{folder} holds no .safetensors weights: inspect reads safetensors only (convert .bin "
            "checkpoints "
            "with `model.save_pretrained(folder)`)."
        )
    config = _read_json(folder / "config.json") or {}
    transposed = config.get("model_type") in _CONV1D_MODEL_TYPES
    modules: dict[str, dict[str, Any]] = {}
    for file in files:
        try:
            for key, weight in _linear_weights(file):
                if transposed and _CONV1D_NAMES.search(key):
                    weight = weight.t()  # Conv1D stores (in, out)
                modules[key.removesuffix(".weight")] = weight_stats(weight)
        except Exception as exc:  # safetensors raises its own error type for damaged files
            if type(exc).__module__.split(".")[0] != "safetensors" and not isinstance(exc, OSError):
                raise
            raise ModelLoadError(
                f"{file} is not a readable safetensors file ({exc}): the download or copy is damaged; "
                "fetch or save it again."
            ) from None
    modules = dict(sorted(modules.items(), key=lambda kv: _natural_key(kv[0])))  # layers.2 before layers.10
    saved = _read_json(folder / "sparsity.json") or {}
    for name, info in modules.items():
        info["target"] = saved.get("modules", {}).get(name, {}).get("target")
    recipe_path = folder / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else None
    run_info = _read_json(folder / "run_info.json")
    return {
        "path": str(root),
        "model_type": config.get("model_type"),
        "config_flags": sorted(
            k for k in config if "quantization" in k or "sparsity" in k or "compression" in k
        ),
        **summarize(modules),
        "modules": modules,
        "method": saved.get("method"),
        "target": saved.get("target"),
        "recipe": recipe,
        "metrics": (run_info or {}).get("metrics"),
        "has_masks": (folder / "masks.safetensors").is_file(),
    }


def _linear_weights(file: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of each Linear-like weight in one file, read one at a time (compressed: decoded)."""
    from safetensors import safe_open

    if file.name == COMPRESSED_WEIGHTS:
        yield from ((k, t) for k, t in iter_compressed(file) if is_linear_weight(k, list(t.shape)))
        return
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if is_linear_weight(key, list(handle.get_slice(key).get_shape())):
                yield key, handle.get_tensor(key)


def _natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def summarize(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Overall sparsity over decoder-block matrices (the papers' number) and over all of them.

    ``nm_patterns`` lists the patterns every decoder-block matrix satisfies.
    """
    block = {k: v for k, v in modules.items() if _LAYER_INDEX.search(f".{k}.")}

    def ratio(group: dict[str, dict[str, Any]]) -> float:
        total = sum(v["shape"][0] * v["shape"][1] for v in group.values())
        return sum(v["zeros"] for v in group.values()) / total if total else 0.0

    common = [
        str(p) for p in CHECKED_PATTERNS if block and all(str(p) in v["nm_patterns"] for v in block.values())
    ]
    return {
        "overall_sparsity": ratio(block),
        "all_linear_sparsity": ratio(modules),
        "num_block_modules": len(block),
        "nm_patterns": common,
    }


def format_inspection(report: dict[str, Any]) -> str:
    """A plain-text table for the terminal: header lines, then one row per matrix."""
    lines = [f"checkpoint: {report['path']}  (model_type: {report.get('model_type') or 'unknown'})"]
    if report.get("method"):
        lines.append(f"pruned with llmprune: method={report['method']} target={report.get('target')}")
    lines.append(
        f"sparsity: {report['overall_sparsity']:.2%} over {report['num_block_modules']} "
        "decoder-block matrices, "
        f"{report['all_linear_sparsity']:.2%} over all {len(report['modules'])} matrices"
    )
    lines.append(f"N:M patterns held by every block matrix: {', '.join(report['nm_patterns']) or 'none'}")
    if report.get("config_flags"):
        lines.append(f"warning: config.json carries {', '.join(report['config_flags'])} (vLLM may reject it)")
    width = max([len(n) for n in report["modules"]] + [6])
    lines.append("")
    lines.append(f"{'module':<{width}}  {'shape':>12}  {'sparsity':>8}  {'target':>6}  N:M holds")
    for name, info in report["modules"].items():
        shape = "x".join(str(s) for s in info["shape"])
        target = info.get("target") or "-"
        nm = ",".join(info["nm_patterns"]) or "-"
        lines.append(f"{name:<{width}}  {shape:>12}  {info['sparsity']:>8.2%}  {target:>6}  {nm}")
    ppl = (report.get("metrics") or {}).get("perplexity")
    if isinstance(ppl, dict):
        lines.append("")
        lines.append(f"perplexity: dense {_ppl(ppl.get('dense'))}, pruned {_ppl(ppl.get('pruned'))}")
    return "\n".join(lines)


def _ppl(value: Any) -> str:
    value = value.get("ppl") if isinstance(value, dict) else value
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"
