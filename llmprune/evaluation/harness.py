"""Zero/few-shot scores with EleutherAI lm-eval, run on the in-memory model.

Scoring the model object directly (``HFLM(pretrained=model)``) means a pruned model is measured
exactly as pruned, without a save/reload round trip. Tasks are looked up in local folders first
(the shipped ``llmprune/data/tasks`` and ``include_path``); lm-eval's own ~15 k task index is only
built when a name is not found there, because indexing it costs ~10 s and its tasks download their
data from the Hugging Face Hub.

>>> scores = lm_eval_scores(model, tok, ["llmprune_mc"], limit=16)  # doctest: +SKIP
>>> scores["tasks"]["llmprune_mc"]["acc"]                            # doctest: +SKIP
0.4375
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmprune.errors import ConfigError, DataError, did_you_mean

log = logging.getLogger(__name__)

#: the offline multiple-choice task folder shipped inside the package
BUILTIN_TASKS_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"
#: what ``llmprune eval`` scores when neither ``--tasks`` nor a recipe names tasks
DEFAULT_TASKS = ("llmprune_mc",)
_SKIP_KEYS = {"alias", "name", "sample_len", " "}
_DECLARED = re.compile(r"^\s*(?:task|group|tag)\s*:\s*['\"]?([\w.\-]+)", re.M)  # names for suggestions
_DATASET_PATH = re.compile(r"^dataset_path:\s*['\"]?([^\s'\"#]+)", re.M)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(
            f"lm-eval is not installed ({exc}): pip install 'llmprune[eval]' (lm-eval==0.4.13)."
        ) from None
    return lm_eval, HFLM, TaskManager


def _offline() -> bool:
    return any(
        os.environ.get(v, "0").lower() not in ("0", "", "false")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _task_paths(include_path: str | os.PathLike | None) -> list[str]:
    paths = [str(BUILTIN_TASKS_DIR)]
    if include_path is not None:
        path = Path(include_path).expanduser()
        if not path.exists():
            raise ConfigError(
                f"include_path {path} does not exist: point it at a folder of lm-eval task YAMLs."
            )
        paths.append(str(path))  # last: later paths win in lm-eval's index, so a user task can shadow ours
    return paths


@functools.lru_cache(maxsize=1)
def _builtin_yaml() -> dict[str, str]:
    """Text of every lm-eval built-in task YAML (~14 k files, <1 s): a cheap stand-in for its index."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return {str(p): p.read_text(encoding="utf-8", errors="replace") for p in root.rglob("*.yaml")}


def _mentioned(name: str, texts: dict[str, str]) -> bool:
    """Whether any built-in YAML names ``name`` (a superset of the index: never misses a real task)."""
    rx = re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])")
    return any(rx.search(text) for text in texts.values())


def _declared(texts: dict[str, str]) -> set[str]:
    return {m for text in texts.values() for m in _DECLARED.findall(text)}


def _uncached_offline(name: str, texts: dict[str, str]) -> str | None:
    """The Hub dataset a built-in task needs when it is certainly not in the local caches, else None."""
    import datasets.config
    import huggingface_hub.constants

    rx = re.compile(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", re.M)
    for text in texts.values():
        if rx.search(text):
            match = _DATASET_PATH.search(text)
            if not match:
                return None  # defined through an include or in Python: cannot tell cheaply
            path = match.group(1)
            hub = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"
            local = Path(datasets.config.HF_DATASETS_CACHE) / path.replace("/", "___")
            return None if hub.exists() or local.exists() else path
    return None


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None = None):
    """A TaskManager that knows every task in ``tasks``, and the names only lm-eval's built-ins provide.

    Local folders are indexed first (fast); lm-eval's own index (~10 s) only when a name is missing
    there and some built-in YAML mentions it. Unknown names, and built-in tasks whose data is not cached
    while the Hub is disabled, fail at once with the fix.
    """
    _, _, TaskManager = _import_lm_eval()
    paths = _task_paths(include_path)
    local = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in local.all_tasks]
    if not missing:
        return local, []
    texts = _builtin_yaml()
    unknown = [t for t in missing if not _mentioned(t, texts)]
    if unknown:
        raise _unknown_task(unknown[0], [*local.all_tasks, *_declared(texts)], local.all_tasks)
    if _offline():
        for name in missing:
            dataset = _uncached_offline(name, texts)
            if dataset:
                raise DataError(
                    f"lm-eval task {name!r} is an lm-eval built-in whose dataset {dataset!r} comes from the "
                    "Hugging Face Hub, which is disabled here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and not "
                    "in the local cache. Fix: pass --include_path DIR with a local task (YAML + JSONL, like "
                    f"{BUILTIN_TASKS_DIR}), use the shipped task llmprune_mc, or go online once to cache it."
                )
    log.info("task(s) %s not in %s: indexing lm-eval's built-in tasks (~10 s)", ", ".join(missing), paths)
    full = TaskManager(include_path=paths, include_defaults=True)
    unknown = [t for t in missing if t not in full.all_tasks]
    if unknown:
        raise _unknown_task(unknown[0], full.all_tasks, local.all_tasks)
    return full, missing


def _unknown_task(name: str, known: Sequence[str], local: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"unknown lm-eval task {name!r}{did_you_mean(name, known)}. Local tasks: "
        f"{', '.join(local) or 'none'}. Fix: check the name, or pass --include_path DIR with a folder "
        "holding the task's YAML."
    )


def _metrics(raw: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A"}`` -> ``{"acc": 0.5}`` (filter kept when not 'none')."""
    out: dict[str, float] = {}
    for key, value in raw.items():
        if key in _SKIP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # bootstrap_iters=0 leaves stderr as "N/A"
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out


def lm_eval_scores(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | os.PathLike | None = None,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` as it is in memory (no copy, no reload; placed by the caller).

    Returns ``{"tasks": {name: {"acc": …, "acc_norm": …, "version": …, "num_samples": …}},
    "lm_eval_version": …, "config": {…}}``. Every seed lm-eval takes is set to ``seed`` (this also
    reseeds the global ``random``, ``numpy`` and ``torch`` generators, as lm-eval always does);
    bootstrap standard errors are skipped.
    """
    if not tasks:
        raise ConfigError("no lm-eval tasks given: name at least one, e.g. --tasks llmprune_mc.")
    if num_fewshot < 0 or batch_size < 1:
        raise ConfigError(f"need num_fewshot >= 0 and batch_size >= 1, got {num_fewshot}, {batch_size}.")
    lm_eval, HFLM, _ = _import_lm_eval()
    manager, from_defaults = task_manager(tasks, include_path)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its warnings about passing a model object are for launchers, not us
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    finally:
        hf_log.setLevel(level)
    try:
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except Exception as exc:
        if not from_defaults:
            raise
        state = (
            "the Hub is disabled here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
            if _offline()
            else "is it reachable?"
        )
        raise DataError(
            f"lm-eval could not run {', '.join(from_defaults)} ({type(exc).__name__}: {exc}). lm-eval's "
            f"built-in tasks download their datasets from the Hugging Face Hub; {state}. Fix: pass "
            f"--include_path DIR with a local task (YAML + JSONL, like {BUILTIN_TASKS_DIR}), or use the "
            "shipped task llmprune_mc."
        ) from exc
    if res is None:  # only non-zero ranks of a distributed run get None
        return {}
    results = {**res.get("results", {}), **res.get("groups", {})}
    n_samples = res.get("n-samples", {})
    scores = {
        name: {
            **_metrics(raw),
            "version": res.get("versions", {}).get(name),
            "num_samples": n_samples.get(name, {}).get("effective"),
            "num_fewshot": res.get("n-shot", {}).get(name, num_fewshot),
        }
        for name, raw in results.items()
    }
    return {
        "tasks": scores,
        "lm_eval_version": lm_eval.__version__,
        "config": {
            "tasks": list(tasks),
            "include_path": str(include_path) if include_path is not None else None,
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "max_length": max_length,
            "seed": seed,
        },
    }
