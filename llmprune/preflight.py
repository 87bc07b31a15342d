"""Checks that run before the expensive work, shared by the CLI, recipes and the Python API.

A typo should cost seconds, not the hours of loading and calibrating a large model. ``before_loading``
looks only at paths, settings and the model's ``config.json``; ``after_loading`` looks at the model's
module names and vocabulary once it is in memory (or built on the meta device), still before any
calibration forward. Every refusal is an ``LlmpruneError`` whose one-line message names the fix.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from llmprune.errors import ConfigError, DataError, ModelLoadError
from llmprune.io.output_dir import check_output_dir

log = logging.getLogger(__name__)

#: default window when the model allows it: the research protocol's 2048 tokens
DEFAULT_WINDOW = 2048
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
_BUILTIN_SOURCES = ("calibration", "recovery", "evaluation", "validation", "test", "self")
_BUILTIN_SOURCES += ("c4", "wikitext2", "wikitext-2")


# ---------------------------------------------------------------- device, data, options
def check_device(device: str | torch.device | None) -> None:
    """Refuse a device this torch cannot use (``--device cuda`` on a CPU-only build)."""
    if device in (None, "auto"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: this torch sees no CUDA GPU; use --device cpu or auto.")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"--device {device}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})."
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu or auto.")


def _looks_like_path(source: str) -> bool:
    return (
        source.endswith(_FILE_SUFFIXES)
        or source.startswith((".", "~", os.sep))
        or ("/" in source and bool(Path(source).suffix))
    )


def check_dataset(source: Any, flag: str = "--dataset") -> None:
    """A path must exist and be readable; a ``.jsonl`` must parse; a token tensor must hold integers."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.numel() == 0:
            raise DataError(
                f"{flag}: a token tensor must be (num_samples, seq_len) and non-empty, got "
                f"{tuple(source.shape)}."
            )
        if source.is_floating_point() or source.is_complex() or source.dtype == torch.bool:
            raise DataError(f"{flag}: token ids must be integers, got {source.dtype}: pass ids.long().")
        if int(source.min()) < 0:
            raise DataError(f"{flag}: token ids must be >= 0, got {int(source.min())}.")
        return
    if not isinstance(source, (str, os.PathLike)):
        return
    text = os.fspath(source)
    if text in _BUILTIN_SOURCES:
        return
    path = Path(text).expanduser()
    if not path.exists():
        if _looks_like_path(text):
            raise DataError(f"{flag} {text} does not exist: check the path.")
        return  # a Hub dataset id: resolved when the data is read
    files = sorted(p for p in path.rglob("*") if p.suffix in _FILE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{flag} {text}: the folder holds no {'/'.join(_FILE_SUFFIXES)} files.")
    for file in files:
        if not os.access(file, os.R_OK):
            raise DataError(f"{flag} {file} is not readable: check its permissions.")
        if file.suffix == ".jsonl":
            _check_jsonl(file, flag)


def _check_jsonl(file: Path, flag: str, max_bytes: int = 256 * 2**20) -> None:
    if file.stat().st_size > max_bytes:  # very large files are checked as they are read
        return
    with file.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(
                    f"{flag} {file}: line {number} is not JSON; each line of a .jsonl file must be one "
                    'object such as {"text": "..."}.'
                ) from None
            if not isinstance(row, dict) or "text" not in row:
                raise DataError(
                    f'{flag} {file}: line {number} has no "text" field: name the text column "text".'
                )


def check_option_types(solver, options: Mapping[str, Any], where: str = "--option") -> None:
    """Each solver option must have the type of its default in the solver's signature."""
    solver.check_options(dict(options))
    check_typed(solver.options(), options, f"solver {solver.name!r}", where)


def check_typed(defaults: Mapping[str, Any], options: Mapping[str, Any], owner: str, where: str) -> None:
    """Each option must have the type of its default (solver signatures, recovery option dataclasses)."""
    for key, value in options.items():
        default = defaults.get(key)
        if default is None or value is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            want = "true or false"
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            want = "a number"
        elif isinstance(default, str):
            ok = isinstance(value, str)
            want = "a string"
        else:
            continue
        if not ok:
            raise ConfigError(f"{where} {key}={value!r}: {owner} expects {want} (default {default!r}).")


# ---------------------------------------------------------------- the model, from its config alone
def model_config(model: Any) -> dict[str, Any] | None:
    """``config.json`` of a local folder or the embedded model, as a dict; None when unknown (Hub id)."""
    if not isinstance(model, (str, os.PathLike)):
        config = getattr(model, "config", None)
        return config.to_dict() if hasattr(config, "to_dict") else None
    from llmprune.io.models import _EMBEDDED, cache_dir

    name = os.fspath(model)
    path = cache_dir() / name if name in _EMBEDDED else Path(name).expanduser()
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelLoadError(f"{file} is not valid JSON ({exc}): the checkpoint is damaged.") from None


def check_causal_lm(model: Any, config: Mapping[str, Any] | None) -> None:
    """Refuse models that are not causal LMs (a BERT masked LM would be rebuilt as another architecture)."""
    if not config:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    causal |= {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if isinstance(v, tuple) for c in v}
    archs = config.get("architectures") or []
    if archs:
        if any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            return
        raise ModelLoadError(
            f"{model} is a {', '.join(archs)}, not a causal language model; llmprune prunes causal LMs "
            "(…ForCausalLM). Fix: give a causal LM checkpoint."
        )
    model_type = config.get("model_type")
    if model_type and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.get("auto_map"):
        raise ModelLoadError(
            f"{model} is a {model_type!r} model, which transformers cannot load as a causal LM: give a "
            "causal LM checkpoint."
        )


def max_positions(config: Any) -> int | None:
    """The model's position limit from its config (object or dict), or None when it has none."""
    for key in _POSITION_KEYS:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def window_length(requested: int | None, config: Any, flag: str = "--max_seq_length") -> int:
    """The one position rule for calibration and evaluation windows.

    ``None`` means the smaller of 2048 and the model's positions; an explicit length above the model's
    positions is refused (learned positions would index out of range, rotary ones score positions the
    model never saw).
    """
    limit = max_positions(config) if config is not None else None
    if requested is None:
        return min(DEFAULT_WINDOW, limit) if limit else DEFAULT_WINDOW
    if limit and requested > limit:
        raise ConfigError(f"{flag} {requested} exceeds the model's {limit} positions: use at most {limit}.")
    return requested


# ---------------------------------------------------------------- the two stages
def before_loading(
    model: Any,
    *,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    dataset: Any = None,
    device: str | None = None,
    solver=None,
    options: Mapping[str, Any] | None = None,
    max_seq_length: int | None = None,
    eval_dataset: Any = None,
    tasks: Iterable[str] | None = None,
    include_path: str | None = None,
) -> dict[str, Any] | None:
    """Everything checkable without loading the model; returns its config (dict) when readable."""
    check_device(device)
    if solver is not None:
        check_option_types(solver, options or {})
    check_dataset(dataset)
    check_dataset(eval_dataset, "--eval_dataset")
    config = model_config(model)
    if isinstance(model, (str, os.PathLike)):
        check_causal_lm(model, config)
    if config is not None and max_seq_length is not None:
        window_length(max_seq_length, config)
    if output_dir is not None:
        inputs = [model] if isinstance(model, (str, os.PathLike)) else [getattr(model, "name_or_path", None)]
        if isinstance(dataset, (str, os.PathLike)) and Path(dataset).expanduser().exists():
            inputs.append(dataset)
        check_output_dir(output_dir, overwrite=overwrite, inputs=inputs)
    if tasks:
        from llmprune.evaluation.harness import task_manager

        task_manager(list(tasks), include_path)  # unknown names fail with a suggestion
    return config


def prunable_names(model) -> list[str]:
    """Full names of the Linears inside the decoder blocks (what selections choose among)."""
    from llmprune.calibration.modules import find_blocks, prunable_linears

    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in prunable_linears(b)]


def check_selection(selection, names: list[str]) -> None:
    """Every ``targets``/``ignore``/``overrides`` entry must match a module, and something must be left."""
    from llmprune.spec import _matcher

    suffixes = sorted({n.split(".")[-1] for n in names})
    for flag, keys in (
        ("--targets", selection.targets),
        ("--ignore", selection.ignore),
        ("overrides", list(selection.overrides)),
    ):
        for key in keys:
            if any(_matcher(key)(n) for n in names):
                continue
            close = difflib.get_close_matches(key, suffixes, n=3, cutoff=0.5)
            hint = (
                f" (closest: {', '.join(close)})" if close else f"; module names end in {', '.join(suffixes)}"
            )
            raise ConfigError(f"{flag} {key!r} matches no Linear inside the decoder blocks{hint}.")
    if names and not any(selection.selects(n) for n in names):
        raise ConfigError("--targets and --ignore together leave no module to prune: drop an --ignore entry.")


def after_loading(model, selection, input_ids: torch.Tensor | None = None) -> None:
    """Checks that need the model's modules or vocabulary; run before any calibration forward."""
    check_selection(selection, prunable_names(model))
    if input_ids is not None:
        check_token_ids(input_ids, getattr(model.config, "vocab_size", None))


def check_token_ids(ids: torch.Tensor, vocab_size: int | None) -> None:
    if vocab_size and ids.numel() and int(ids.max()) >= vocab_size:
        raise DataError(
            f"token id {int(ids.max())} is outside the model's vocabulary of {vocab_size}: the tokens were "
            "made with another tokenizer; tokenize the text with this model's tokenizer."
        )


def check_recipe(recipe, *, overwrite: bool = False, evaluate: bool = True) -> dict[str, Any] | None:
    """``before_loading`` for a resolved recipe: what ``llmprune prune`` checks before it loads a model."""
    from llmprune.allocation import split_options
    from llmprune.registry import get_solver

    check_dataset(recipe.recover.dataset, "recover.dataset")
    masks = getattr(recipe.prune, "structure", "unstructured") == "unstructured"
    # structured runs check their own options (llmprune.structured.settings, via the recipe)
    options = split_options(recipe.prune.allocation, recipe.prune.options)[0] if masks else {}
    config = before_loading(
        recipe.model.name,
        output_dir=recipe.output_dir,
        overwrite=overwrite,
        dataset=recipe.calibration.dataset,
        device=recipe.model.device,
        solver=get_solver(recipe.prune.method) if masks else None,
        options=options,
        max_seq_length=recipe.calibration.max_seq_length,
        eval_dataset=recipe.eval.eval_dataset if evaluate else None,
        tasks=recipe.eval.tasks,
        include_path=recipe.eval.include_path,
    )
    if recipe.recover.method and recipe.recover.max_seq_length and config is not None:
        window_length(recipe.recover.max_seq_length, config, "recover.max_seq_length")
    return config


#: model types that share a tokenizer family and a head layout closely enough to distil across
_FAMILIES = (
    {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2", "gemma3_text", "phi3"},
    {"gpt2", "gpt_neox", "gptj", "gpt_neo"},
)


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def check_teacher(student: Any, teacher: Any, name: str = "--dense_model") -> None:
    """A distillation teacher must score the student's tokens: same vocabulary, same model family.

    ``student`` and ``teacher`` are configs (objects or dicts); ``None`` (unknown before loading) passes.
    """
    if student is None or teacher is None:
        return
    vs, vt = _get(student, "vocab_size"), _get(teacher, "vocab_size")
    if vs and vt and vs != vt:
        raise ConfigError(
            f"{name} has a vocabulary of {vt} tokens and the pruned model {vs}: the teacher must share the "
            "student's tokenizer. Fix: pass the dense model this one was pruned from."
        )
    ts, tt = _get(student, "model_type"), _get(teacher, "model_type")
    if ts and tt and ts != tt and not any(ts in f and tt in f for f in _FAMILIES):
        raise ConfigError(
            f"{name} is a {tt!r} model and the pruned model a {ts!r} one: distil from the dense model this "
            "one was pruned from."
        )


def check_world(num_samples: int, world: int) -> None:
    """Under ``torchrun`` the processes share the calibration samples (any batch size: each forms its own
    batches), so the one impossible split is more processes than samples: refuse it before any work."""
    if world > num_samples:
        raise ConfigError(
            f"{world} processes cannot share {num_samples} calibration windows: use --nproc_per_node "
            f"{num_samples} or less, or --num_calibration_samples {world} or more."
        )
