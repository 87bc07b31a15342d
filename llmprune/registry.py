"""The one registry of solvers: name -> pure function of (LayerProblem, **options) -> SolverResult.

A recipe or CLI flag can only name a registered solver, never an import path.
"""

from __future__ import annotations

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

    def options(self) -> dict[str, Any]:
        """Keyword options the solver accepts, with defaults (for CLI help and validation)."""
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

    def __call__(self, problem: LayerProblem, **options: Any) -> SolverResult:
        return self.fn(problem, **options)


_SOLVERS: dict[str, SolverInfo] = {}


def register_solver(name: str, needs: frozenset[str] | set[str] = frozenset(), allocate=None):
    """Decorator: ``@register_solver("wanda", needs={SQ_NORMS})``."""

    def wrap(fn: SolverFn) -> SolverFn:
        if name in _SOLVERS:
            raise ValueError(f"solver {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _SOLVERS[name] = SolverInfo(name, fn, frozenset(needs), doc[0] if doc else "", allocate)
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
