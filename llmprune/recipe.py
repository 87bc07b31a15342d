"""Recipes: one YAML file that says everything a run does, and reproduces it.

A recipe uses the vocabulary of the CLI flags and of ``llmprune.api.prune`` (``num_calibration_samples``
here is ``--num_calibration_samples`` there). Precedence is CLI > recipe > defaults; the resolved recipe
is saved with every output, and loading it back gives the same run.

.. code-block:: yaml

    version: 1
    model: {name: smollm2-135m}    # streaming: true reads a larger-than-memory model block by block
    calibration: {dataset: null, num_calibration_samples: 128, max_seq_length: 2048, seed: 0}
    prune:
      method: sparsegpt
      sparsity: "2:4"            # keep 2 of every 4 (quote it: YAML 1.1 reads 2:4 as 124)
      ignore: [down_proj]
      overrides: {"re:layers\\.0\\.": 0.3}
      options: {block_size: 128}
    recover: {method: perp, recover_steps: 200}
    eval: {tasks: [llmprune_mc], eval_limit: 32}
    output_dir: out/sparsegpt-2of4

Recipes are data, never code: they are read with a safe loader, can name only registered solvers,
and anything that looks like an import path (``pkg.mod:fn``) or a ``!!python`` tag is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from llmprune.allocation import check_allocation, check_allocation_target, split_options
from llmprune.errors import ConfigError, did_you_mean
from llmprune.io.atomic import write_text
from llmprune.io.gguf_export import GGUF_TYPES
from llmprune.io.weights import FORMATS
from llmprune.spec import ModuleSelection, SparsitySpec
from llmprune.structured.settings import check_settings as check_structured
from llmprune.version import RECIPE_VERSION, __version__

log = logging.getLogger(__name__)

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")  # pkg.mod:attr


# --------------------------------------------------------------------------- value checks
def _fail(where: str, msg: str) -> ConfigError:
    return ConfigError(f"recipe {where}: {msg}")


def _int(where: str, value: Any, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise _fail(where, f"must be >= {minimum}, got {value}.")
    return value


def _float(where: str, value: Any, optional: bool = False, positive: bool = True) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _fail(where, f"expected a number, got {value!r}.")
    if positive and value <= 0:
        raise _fail(where, f"must be > 0, got {value}.")
    return float(value)


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"expected true or false, got {value!r}.")
    return value


def _str(where: str, value: Any, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"expected a non-empty string, got {value!r}.")
    _check_not_code(where, value)
    return value


def _str_list(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # `targets: q_proj` is a list of one
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _fail(where, f"expected a list of strings, got {value!r}.")
    return [_str(f"{where}[{i}]", v, optional=False) for i, v in enumerate(value)]


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected a mapping (key: value), got {value!r}.")
    return dict(value)


def _check_not_code(where: str, value: str) -> None:
    """Recipes are data: refuse what only makes sense as a reference to code."""
    if "!!python" in value or (_IMPORT_PATH.match(value) and not value.startswith("re:")):
        raise _fail(
            where,
            f"{value!r} looks like a Python import path or tag; recipes never load code. Name a registered "
            "method instead (register a new solver with @llmprune.register_solver).",
        )


def _canonical_sparsity(where: str, value: Any) -> float | str:
    """0.5, "0.5" and "50%" are all 0.5; N:M stays a string "2:4" (so YAML keeps it quoted)."""
    try:
        spec = SparsitySpec.parse(value)
    except ConfigError as exc:
        raise _fail(where, str(exc)) from None
    return str(spec.pattern) if spec.pattern else spec.sparsity


def _method(where: str, value: Any):
    from llmprune.registry import available_solvers, get_solver

    name = _str(where, value, optional=False)
    if ("." in name or ":" in name) and name not in available_solvers():
        raise _fail(
            where,
            f"{name!r} is not a registered method and recipes never import code; registered methods: "
            f"{', '.join(available_solvers())}.",
        )
    try:
        return get_solver(name)
    except ConfigError as exc:
        raise _fail(where, str(exc)) from None


# --------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    name: str = "smollm2-135m"  # Hub id, local folder, .gguf file or the embedded default
    dtype: str = "float32"
    device: str = "auto"
    streaming: bool = False  # never load the model whole: read, prune and write one block at a time

    def __post_init__(self) -> None:
        _str("model.name", self.name, optional=False)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise _fail("model.dtype", f"use float32, bfloat16 or float16, got {self.dtype!r}.")
        _str("model.device", self.device, optional=False)
        _bool("model.streaming", self.streaming)


@dataclass
class CalibrationSection:
    dataset: str | None = None  # None = the built-in public-domain calibration text
    num_calibration_samples: int | None = None  # None = 128 on a GPU, 32 on CPU
    max_seq_length: int | None = None  # None = the smaller of 2048 and the model's positions
    seed: int = 0
    max_memory: int | str | None = None  # activations kept in memory ("8GB", "512MiB", bytes); None = all
    offload_dir: str | None = None  # where activations above max_memory go (None = a temporary folder)

    def __post_init__(self) -> None:
        from llmprune.calibration.capture import check_spill_settings

        _str("calibration.dataset", self.dataset)
        _int("calibration.num_calibration_samples", self.num_calibration_samples, 1, optional=True)
        _int("calibration.max_seq_length", self.max_seq_length, 2, optional=True)
        _int("calibration.seed", self.seed, 0)
        try:
            check_spill_settings(self.max_memory, self.offload_dir, keys="calibration.")
        except ConfigError as exc:
            where = "max_memory" if self.max_memory is not None else "offload_dir"
            raise _fail(f"calibration.{where}", str(exc)) from None
        _str("calibration.offload_dir", self.offload_dir)


@dataclass
class PruneSection:
    method: str = "wanda"
    sparsity: float | str = 0.5  # fraction, or "N:M" = keep N of every M
    targets: list[str] = field(default_factory=list)  # empty = every Linear inside the decoder blocks
    ignore: list[str] = field(default_factory=list)
    overrides: dict[str, float | str] = field(default_factory=dict)  # name / suffix / "re:…" -> sparsity
    true_sequential: bool = False
    batch_size: int = 8
    allocation: str = "uniform"  # per-layer sparsity: uniform | owl | error | depth (llmprune.allocation)
    options: dict[str, Any] = field(default_factory=dict)  # the solver's (and allocation's) keyword options
    structure: str = "unstructured"  # or depth | width | heads | auto (llmprune.structured)

    def __post_init__(self) -> None:
        if self.structure != "unstructured":  # whole structures: their own methods and options
            self.sparsity = _canonical_sparsity("prune.sparsity", self.sparsity)
            try:
                options = _mapping("prune.options", self.options)
                check_structured(self.structure, self.method, self.sparsity, options)
            except ConfigError as exc:
                raise _fail("prune", str(exc)) from None
            return
        solver = _method("prune.method", self.method)
        self.sparsity = _canonical_sparsity("prune.sparsity", self.sparsity)
        self.targets = _str_list("prune.targets", self.targets)
        self.ignore = _str_list("prune.ignore", self.ignore)
        self.overrides = {
            _str("prune.overrides", k, optional=False): _canonical_sparsity(f"prune.overrides[{k!r}]", v)
            for k, v in _mapping("prune.overrides", self.overrides).items()
        }
        try:
            ModuleSelection.build(self.sparsity, self.targets, self.ignore, self.overrides)  # regexes
        except ConfigError as exc:
            raise _fail("prune", str(exc)) from None
        _bool("prune.true_sequential", self.true_sequential)
        _int("prune.batch_size", self.batch_size, 1)
        self.options = _mapping("prune.options", self.options)
        for key, value in self.options.items():
            if isinstance(value, str):
                _str(f"prune.options.{key}", value)
        _str("prune.allocation", self.allocation, optional=False)
        try:
            check_allocation(self.allocation)
            solver_options, allocation_options = split_options(self.allocation, self.options)
            check_allocation_target(self.allocation, allocation_options, SparsitySpec.parse(self.sparsity))
        except ConfigError as exc:
            raise _fail("prune.allocation", str(exc)) from None
        try:
            solver.check_options(solver_options)
        except ConfigError as exc:
            raise _fail("prune.options", str(exc)) from None


@dataclass
class RecoverSection:
    """Keywords of ``llmprune.recovery.recover``; ``recover_steps``/``recover_max_seconds`` are its
    ``steps``/``max_seconds`` (prefixed so the CLI flags are unambiguous). ``None`` data settings take
    ``llmprune.recovery.windows``' defaults: the calibration text, other windows than the pruning's."""

    method: str | None = None  # perp | lift | None (no recovery)
    recover_steps: int | None = None  # None: 100 (retrain); reconstruct: DEFAULT_STEPS per block
    recover_max_seconds: float | None = None
    lr: float | None = None  # None = the method's measured default (llmprune.recovery.DEFAULT_LR)
    mode: str = "retrain"  # retrain (causal-LM loss) | reconstruct (match the dense blocks)
    distill: float | None = None  # retrain: weight of KL to the dense model (0 = LM loss, 1 = KL); None = 1
    batch_size: int = 4
    dataset: str | None = None  # training text; None = calibration.dataset
    num_samples: int | None = None  # windows; None = recovery.windows.NUM_WINDOWS (64)
    max_seq_length: int | None = None  # None = 256 (or the model's positions if fewer)
    seed: int | None = None  # None = calibration.seed + 1: not the windows the pruning fitted
    options: dict[str, Any] = field(
        default_factory=dict
    )  # method options (r, alpha, rank…) and optimiser knobs

    @property
    def needs_dense_model(self) -> bool:
        """Reconstruction and distillation take their targets from the dense model: keep a copy."""
        return self.method is not None and (self.mode == "reconstruct" or self.distill != 0)

    def __post_init__(self) -> None:
        from llmprune.recovery import COMMON_OPTIONS, METHODS, MODES, method_options
        from llmprune.recovery.api import distill_problem
        from llmprune.recovery.blockwise import micro_batch_problem

        if self.method is not None:
            name = _str("recover.method", self.method, optional=False)
            if name not in METHODS:
                raise _fail(
                    "recover.method",
                    f"unknown recovery method {name!r}{did_you_mean(name, METHODS)}; use one of "
                    f"{', '.join(METHODS)}, or null for none.",
                )
        _int("recover.recover_steps", self.recover_steps, 1, optional=True)
        _float("recover.recover_max_seconds", self.recover_max_seconds, optional=True)
        _float("recover.lr", self.lr, optional=True)
        if self.mode not in MODES:
            raise _fail(
                "recover.mode",
                f"unknown mode {self.mode!r}{did_you_mean(str(self.mode), MODES)}: use {MODES}.",
            )
        self.distill = _float("recover.distill", self.distill, optional=True, positive=False)
        problem = distill_problem(self.distill, self.mode)
        if problem:
            raise _fail("recover.distill", problem)
        _int("recover.batch_size", self.batch_size, 1)
        _str("recover.dataset", self.dataset)
        _int("recover.num_samples", self.num_samples, 1, optional=True)
        _int("recover.max_seq_length", self.max_seq_length, 2, optional=True)
        _int("recover.seed", self.seed, 0, optional=True)
        self.options = _mapping("recover.options", self.options)
        sections = {"steps", "max_seconds", *(f.name for f in fields(self))}
        allowed = [o for o in COMMON_OPTIONS if o not in sections]
        allowed += list(method_options(self.method)) if self.method else []
        for key, value in self.options.items():
            if key in sections:
                raise _fail(
                    f"recover.options.{key}", f"set {key!r} in the recover section itself, not in options."
                )
            if self.method and key not in allowed:
                raise _fail(
                    "recover.options",
                    f"unknown option {key!r}{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}.",
                )
            if isinstance(value, str):
                _str(f"recover.options.{key}", value)
        problem = micro_batch_problem(self.options.get("micro_batch"), self.mode)
        if problem:
            raise _fail("recover.options.micro_batch", problem)


@dataclass
class EvalSection:
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks; empty = perplexity only
    include_path: str | None = None  # extra folder of lm-eval task YAMLs
    num_fewshot: int = 0
    limit: int | float | None = None  # lm-eval: documents per task (int) or a fraction
    eval_dataset: str | None = None  # perplexity text; None = the built-in held-out text
    eval_limit: int | str | None = None  # perplexity windows; None = 32768 tokens' worth, "all" = every one
    max_seq_length: int | None = None  # perplexity window; None = calibration.max_seq_length's rule
    batch_size: int | None = None  # None = prune.batch_size

    def __post_init__(self) -> None:
        self.tasks = _str_list("eval.tasks", self.tasks)
        _str("eval.include_path", self.include_path)
        _int("eval.num_fewshot", self.num_fewshot, 0)
        if isinstance(self.limit, float):  # lm-eval: a float below 1 is a fraction of each task
            if not 0 < self.limit < 1:
                raise _fail(
                    "eval.limit", f"use a count (integer >= 1) or a fraction in (0, 1), got {self.limit}."
                )
        else:
            _int("eval.limit", self.limit, 1, optional=True)
        _str("eval.eval_dataset", self.eval_dataset)
        if isinstance(self.eval_limit, str) and self.eval_limit.strip().lower() == "all":
            self.eval_limit = "all"
        elif self.eval_limit is not None and (
            isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int) or self.eval_limit < 1
        ):
            raise _fail("eval.eval_limit", f"use a number of windows >= 1 or 'all', got {self.eval_limit!r}.")
        _int("eval.max_seq_length", self.max_seq_length, 2, optional=True)
        _int("eval.batch_size", self.batch_size, 1, optional=True)


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "calibration": CalibrationSection,
    "prune": PruneSection,
    "recover": RecoverSection,
    "eval": EvalSection,
}
_TOP_KEYS = ("version", *_SECTIONS, "output_dir", "save_format", "gguf_type")


def _section_keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    hint = did_you_mean(key, known)
    if not hint:
        homes = [s for s, cls in _SECTIONS.items() if key in _section_keys(cls)]
        hint = f" (`{key}` belongs under `{homes[0]}:`)" if homes else ""
    return _fail(where, f"unknown key {key!r}{hint}; known keys: {', '.join(known)}.")


def _build_section(name: str, data: Any):
    cls = _SECTIONS[name]
    if name == "model" and isinstance(data, str):  # `model: smollm2-135m`
        data = {"name": data}
    data = _mapping(name, data)
    known = _section_keys(cls)
    for key in data:
        if key not in known:
            raise _unknown_key(name, str(key), known)
    return cls(**data)


# --------------------------------------------------------------------------- the recipe
@dataclass
class Recipe:
    version: int = RECIPE_VERSION
    model: ModelSection = field(default_factory=ModelSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    prune: PruneSection = field(default_factory=PruneSection)
    recover: RecoverSection = field(default_factory=RecoverSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output_dir: str | None = None
    save_format: str = "dense"  # dense, compressed or gguf (llmprune.io.weights.FORMATS)
    gguf_type: str = "f16"

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version != RECIPE_VERSION:
            raise _fail(
                "version", f"this llmprune reads recipe version {RECIPE_VERSION}, got {self.version!r}."
            )
        _str("output_dir", self.output_dir)
        if self.save_format not in FORMATS:
            raise _fail("save_format", f"{self.save_format!r} is not one of {', '.join(FORMATS)}.")
        if self.gguf_type not in GGUF_TYPES:
            raise _fail("gguf_type", f"{self.gguf_type!r} is not one of {', '.join(GGUF_TYPES)}.")

    # ---- construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Recipe:
        """Validate a parsed recipe; every problem is a ConfigError that names the fix."""
        data = _mapping("top level", data)
        for key in data:
            if key not in _TOP_KEYS:
                raise _unknown_key("top level", str(key), list(_TOP_KEYS))
        version = data.get("version", RECIPE_VERSION)
        sections = {name: _build_section(name, data.get(name)) for name in _SECTIONS}
        output = {k: data[k] for k in ("output_dir", "save_format", "gguf_type") if data.get(k) is not None}
        return cls(version=version, **output, **sections)

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)
        return f"# llmprune {__version__} recipe (resolved: every value the run used)\n{body}"

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``to_yaml()`` atomically (temp file in the same folder, then rename)."""
        return write_text(path, self.to_yaml(), durable=False)

    # ---- overlays
    def with_overrides(self, values: Mapping[str, Any]) -> Recipe:
        """A new recipe with dotted keys replaced: ``{"prune.method": "wanda", "calibration.seed": 3}``.

        ``prune.options.<key>`` and ``recover.options.<key>`` set one option; ``None`` values are
        applied as given (use ``with_flags`` to skip flags the user did not pass).
        """
        data = self.to_dict()
        for dotted, value in values.items():
            parts = dotted.split(".")
            if parts[0] not in _TOP_KEYS:
                raise _unknown_key("override", parts[0], list(_TOP_KEYS))
            if len(parts) == 1:
                if parts[0] in _SECTIONS and not (parts[0] == "model" and isinstance(value, str)):
                    raise _fail("override", f"{dotted!r} is a section: override one key, e.g. '{dotted}.…'.")
                data[parts[0]] = {"name": value} if parts[0] == "model" else value
                continue
            if parts[0] not in _SECTIONS:
                raise _fail("override", f"{parts[0]!r} has no sub-keys: write {parts[0]!r} alone.")
            section, known = data[parts[0]], _section_keys(_SECTIONS[parts[0]])
            if parts[1] not in known:
                raise _unknown_key(parts[0], parts[1], known)
            if len(parts) == 2:
                section[parts[1]] = value
            elif parts[1] == "options" and len(parts) == 3:
                section["options"] = {**section["options"], parts[2]: value}
            else:
                raise _fail("override", f"cannot set {dotted!r}: only `<section>.options.<name>` nests.")
        return Recipe.from_dict(data)

    def with_flags(self, flags: Mapping[str, Any] | argparse.Namespace, command: str = "prune") -> Recipe:
        """Overlay CLI flags the user actually gave (``None`` = not given) by flag name.

        Flags that are not recipe keys (``func``, ``recipe``, ``json``, …) are skipped; ``option`` is a
        list of ``KEY=VALUE`` solver options (recovery options for ``command="recover"``), merged over
        the recipe's.
        """
        if isinstance(flags, argparse.Namespace):
            flags = vars(flags)
        table = {**FLAG_KEYS, **FLAG_KEYS_BY_COMMAND.get(command, {})}
        dotted: dict[str, Any] = {}
        for flag, value in flags.items():
            if value is None:
                continue
            if flag == "option":  # solver options, or the recovery method's for `llmprune recover`
                section = "recover" if command == "recover" else "prune"
                dotted.update({f"{section}.options.{k}": v for k, v in parse_options(value).items()})
            elif flag == "tasks" and isinstance(value, str):
                dotted["eval.tasks"] = [t.strip() for t in value.split(",") if t.strip()]
            elif flag in table:
                dotted[table[flag]] = value
        return self.with_overrides(dotted)

    # ---- what the parts of llmprune take
    def selection(self) -> ModuleSelection:
        """The prune section's module selection (targets, ignore, overrides)."""
        p = self.prune
        return ModuleSelection.build(p.sparsity, p.targets, p.ignore, p.overrides)

    def prune_kwargs(self, with_output_dir: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``llmprune.api.prune(model, tokenizer, **kwargs)``.

        ``output_dir`` is left out unless asked for: with recovery or evaluation to follow, the caller
        saves once at the end, together with this recipe and the metrics.
        """
        p, c, m = self.prune, self.calibration, self.model
        kwargs: dict[str, Any] = {
            "method": p.method,
            "sparsity": p.sparsity,
            "dataset": c.dataset,
            "num_calibration_samples": c.num_calibration_samples,
            "max_seq_length": c.max_seq_length,
            "seed": c.seed,
            "targets": list(p.targets) or None,
            "ignore": list(p.ignore) or None,
            "overrides": dict(p.overrides) or None,
            "true_sequential": p.true_sequential,
            "allocation": p.allocation,
            "batch_size": p.batch_size,
            "device": m.device,
            "dtype": m.dtype,
            "streaming": m.streaming,
            "max_memory": c.max_memory,
            "offload_dir": c.offload_dir,
        }
        if with_output_dir:
            kwargs["output_dir"] = self.output_dir
        clash = set(p.options) & set(kwargs)
        if clash:
            raise _fail(
                "prune.options", f"{sorted(clash)} are prune settings, not solver options: move them up."
            )
        return {**kwargs, **p.options}

    def perplexity_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``llmprune.evaluation.perplexity.perplexity(model, tok, **kwargs)``."""
        e = self.eval
        return {
            "dataset": e.eval_dataset,
            "max_seq_length": e.max_seq_length or self.calibration.max_seq_length,
            "limit": e.eval_limit,
            "batch_size": e.batch_size or 2,  # (B, L, vocab) logits dominate memory: keep B small
        }

    def lm_eval_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``llmprune.evaluation.harness.lm_eval_scores(model, tok, **kwargs)``."""
        e = self.eval
        return {
            "tasks": list(e.tasks),
            "include_path": e.include_path,
            "num_fewshot": e.num_fewshot,
            "limit": e.limit,
            "batch_size": e.batch_size or self.prune.batch_size,
            "seed": self.calibration.seed,
        }

    def recover_windows_kwargs(self, timed_teacher: bool = True) -> dict[str, Any]:
        """``source``, ``num_samples``, ``seq_len`` (None: 256, capped per model) and ``seed`` of the
        recovery windows, for ``llmprune.recovery.windows.recovery_windows``. ``timed_teacher=False``:
        the caller runs no timed teacher pass, so no pool is drawn (:meth:`teacher_seconds`)."""
        from llmprune.recovery.windows import window_settings

        r, c = self.recover, self.calibration
        source = r.dataset if r.dataset is not None else c.dataset
        teacher_s = self.teacher_seconds() if timed_teacher else None
        return window_settings(source, r.num_samples, r.max_seq_length, r.seed, c.seed, teacher_s)

    def teacher_seconds(self) -> float | None:
        """How long the dense model's target pass may run when the windows are llmprune's to choose in
        a time-budgeted distillation (``recovery.windows.teacher_budget``); None otherwise."""
        from llmprune.recovery.api import distils_from_topk
        from llmprune.recovery.windows import teacher_budget

        r = self.recover
        if r.method is None or r.mode != "retrain":
            return None
        kwargs = self.recover_kwargs()
        return teacher_budget(r.method, r.num_samples, r.recover_max_seconds, distils_from_topk(kwargs))

    def fused_recover_kwargs(self) -> dict[str, Any]:
        """``recover=``/``recover_options=`` of ``llmprune.api.prune`` for ``mode: reconstruct``, which
        ``llmprune prune`` fuses into the pruning pass (its calibration windows and batches are the data)."""
        r = self.recover
        if r.dataset is not None or r.num_samples is not None or r.max_seq_length is not None:
            raise _fail(
                "recover",
                "mode reconstruct runs inside the pruning pass on its calibration windows: drop "
                "recover.dataset, num_samples and max_seq_length (set the calibration section instead).",
            )
        kwargs = self.recover_kwargs()
        for key in ("method", "mode", "distill", "batch_size"):
            kwargs.pop(key)
        return {"recover": r.method, "recover_options": {k: v for k, v in kwargs.items() if v is not None}}

    def recover_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``llmprune.recovery.recover(model, input_ids=…, **kwargs)``.

        Raises ConfigError when the recipe has no recovery method.
        """
        r = self.recover
        if r.method is None:
            raise _fail("recover.method", "no recovery method set: use perp or lift.")
        return {
            "method": r.method,
            "steps": r.recover_steps,
            "max_seconds": r.recover_max_seconds,
            "lr": r.lr,
            "mode": r.mode,
            "distill": r.distill,
            "batch_size": r.batch_size,
            "seed": self.calibration.seed if r.seed is None else r.seed,  # training; windows: +1
            **r.options,
        }


_RECOVER_TRAIN_FLAGS = (
    "gradient_accumulation_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "optim",
)
#: flag name -> recipe key, shared by every subcommand
FLAG_KEYS: dict[str, str] = {
    "model": "model.name",
    "dtype": "model.dtype",
    "device": "model.device",
    "streaming": "model.streaming",
    "dataset": "calibration.dataset",
    "num_calibration_samples": "calibration.num_calibration_samples",
    "max_seq_length": "calibration.max_seq_length",
    "seed": "calibration.seed",
    "max_memory": "calibration.max_memory",
    "offload_dir": "calibration.offload_dir",
    "method": "prune.method",
    "sparsity": "prune.sparsity",
    "structure": "prune.structure",
    "targets": "prune.targets",
    "ignore": "prune.ignore",
    "true_sequential": "prune.true_sequential",
    "allocation": "prune.allocation",
    "batch_size": "prune.batch_size",
    "recover": "recover.method",
    "recover_steps": "recover.recover_steps",
    "recover_max_seconds": "recover.recover_max_seconds",
    "lr": "recover.lr",
    "recover_mode": "recover.mode",
    "distill": "recover.distill",
    "recover_dataset": "recover.dataset",
    "tasks": "eval.tasks",
    "include_path": "eval.include_path",
    "num_fewshot": "eval.num_fewshot",
    "limit": "eval.limit",
    "eval_dataset": "eval.eval_dataset",
    "eval_limit": "eval.eval_limit",
    "eval_max_seq_length": "eval.max_seq_length",
    "eval_batch_size": "eval.batch_size",
    "output_dir": "output_dir",
    "save_format": "save_format",
    "gguf_type": "gguf_type",
}
#: where a flag means something else: `llmprune eval --batch_size` is the evaluation batch size
FLAG_KEYS_BY_COMMAND: dict[str, dict[str, str]] = {
    "eval": {
        "max_seq_length": "eval.max_seq_length",
        "batch_size": "eval.batch_size",
        "output_path": "output_dir",
    },
    # `llmprune recover` works on an already pruned model: its data and batch flags are the recovery's
    "recover": {
        "method": "recover.method",
        "mode": "recover.mode",
        "batch_size": "recover.batch_size",
        "dataset": "recover.dataset",
        "num_calibration_samples": "recover.num_samples",
        "max_seq_length": "recover.max_seq_length",
        "seed": "recover.seed",
        **{k: f"recover.options.{k}" for k in _RECOVER_TRAIN_FLAGS},
    },
}


def parse_options(pairs: list[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``["block_size=64", "update=true"]`` -> ``{"block_size": 64, "update": True}`` (YAML scalars)."""
    if isinstance(pairs, Mapping):
        return dict(pairs)
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option expects KEY=VALUE, got {pair!r}.")
        out[key.strip()] = _load_yaml(value, f"--option {key.strip()}")
    return out


# --------------------------------------------------------------------------- YAML
class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads ``2:4`` as a string (not the YAML 1.1 sexagesimal 124), ``1e-4`` as a
    float (not a string), and refuses duplicate keys instead of keeping the last one silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"recipe: key {key!r} is given twice (line {key_node.start_mark.line + 1})."
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_RecipeLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"),
)
_RecipeLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(
            f"{where}: {exc.problem} ({exc.problem_mark}). Recipes are plain data: tags such as !!python/… "
            "or !function are not allowed; name registered methods instead."
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None


def recipe_from_yaml(text: str, where: str = "recipe") -> Recipe:
    return Recipe.from_dict(_load_yaml(text, where))


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; nothing runs if anything in it is wrong.

    >>> load_recipe("recipes/wanda-2of4.yaml").prune.sparsity  # doctest: +SKIP
    '2:4'
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist: check the path (examples live in recipes/).")
    text = path.read_text(encoding="utf-8")
    if not _load_yaml(text, f"recipe {path}"):  # an empty file would silently run every default
        raise ConfigError(
            f"recipe {path} is empty: give at least one setting (see recipes/*.yaml), or drop --recipe to "
            "run the defaults."
        )
    try:
        return recipe_from_yaml(text, where=f"recipe {path}")
    except ConfigError as exc:
        if str(path) in str(exc):
            raise
        raise ConfigError(f"{path}: {exc}") from None


def resolve_recipe(args: Mapping[str, Any] | argparse.Namespace, command: str = "prune") -> Recipe:
    """CLI > recipe > defaults: the ``--recipe`` file (if any) with the flags the user gave on top."""
    flags = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    base = load_recipe(flags["recipe"]) if flags.get("recipe") else Recipe()
    return base.with_flags({k: v for k, v in flags.items() if k != "recipe"}, command=command)
