"""The one registry of solvers: name -> pure function of (LayerProblem, **options) -> SolverResult.

A recipe or CLI flag can only name a registered solver, never an import path. A solver's options are
its keyword-only parameters, or, for a solver with many (iCBS), the fields of one options dataclass
that validates itself on creation (registered with ``options=``, the convention of LIFT's
``LiftOptions``): either way the registry reads names and defaults from one place and checks values
before any work.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmprune.errors import ConfigError, did_you_mean
from llmprune.solvers.types import LayerProblem, SolverResult

SolverFn = Callable[..., SolverResult]


@dataclass(frozen=True)
class SolverInfo:
    name: str
    fn: SolverFn
    needs: frozenset[str]  # statistics to collect, see solvers.types
    summary: str
    # optional whole-model pre-pass: (weights by name, default spec, options) -> sparsity by name
    allocate: Callable[..., dict[str, float]] | None = None
    # optional options dataclass (validates in __post_init__); None: the keyword-only parameters
    options_type: type | None = None

    def options(self) -> dict[str, Any]:
        """Keyword options the solver accepts, with defaults (for CLI help and validation)."""
        if self.options_type is not None:
            return {f.name: f.default for f in dataclasses.fields(self.options_type)}
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}

    def check_options(self, options: dict[str, Any]) -> None:
        known = self.options()
        for key in options:
            if key not in known:
                raise ConfigError(
                    f"solver {self.name!r} has no option {key!r}{did_you_mean(key, known)}; "
                    f"its options are: {', '.join(known) or 'none'}."
                )
        if self.options_type is not None:
            self.options_type(**options)  # values too, before any model is loaded

    def __call__(self, problem: LayerProblem, **options: Any) -> SolverResult:
        return self.fn(problem, **options)


_SOLVERS: dict[str, SolverInfo] = {}


def register_solver(
    name: str, needs: frozenset[str] | set[str] = frozenset(), allocate=None, options: type | None = None
):
    """Decorator: ``@register_solver("wanda", needs={SQ_NORMS})``; ``options``: an options dataclass."""

    def wrap(fn: SolverFn) -> SolverFn:
        if name in _SOLVERS:
            raise ValueError(f"solver {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _SOLVERS[name] = SolverInfo(name, fn, frozenset(needs), doc[0] if doc else "", allocate, options)
        return fn

    return wrap


def _load_builtins() -> None:
    from llmprune.solvers import BUILTIN_MODULES

    for module in BUILTIN_MODULES:
        importlib.import_module(f"llmprune.solvers.{module}")


def get_solver(name: str) -> SolverInfo:
    _load_builtins()

    if name not in _SOLVERS:
        raise ConfigError(
            f"unknown method {name!r}{did_you_mean(name, _SOLVERS)}; registered methods: "
            f"{', '.join(sorted(_SOLVERS))}."
        )
    return _SOLVERS[name]


def available_solvers() -> list[str]:
    _load_builtins()

    return sorted(_SOLVERS)
