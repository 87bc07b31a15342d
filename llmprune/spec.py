"""What to prune and how much: sparsity targets, N:M patterns, module selection and overrides.

Vocabulary, fixed once for the whole project:

* ``0.5`` — unstructured: prune 50 % of the weights of each matrix (the comparison group is
  the solver's business: per row for Wanda, per matrix for magnitude, per column block for SparseGPT).
* ``"2:4"`` — N:M semi-structured: keep **at most N nonzeros in every aligned group of M** input
  columns of every output row (so 2:4 is 50 % sparse, 1:4 is 75 %, 3:4 is 25 %). The research
  codebases' ``prune_n, prune_m`` count *pruned* weights; llmprune counts *kept* ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llmprune.errors import ConfigError

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep at most ``n`` nonzeros in every aligned group of ``m`` consecutive input columns."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if self.m < 2 or not 0 < self.n < self.m:
            raise ConfigError(
                f"N:M pattern {self.n}:{self.m} is invalid: need 0 < N < M (N = weights kept per group "
                "of M), e.g. '2:4' keeps 2 of every 4."
            )

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        match = _NM_RE.match(text)
        if not match:
            raise ConfigError(f"cannot read N:M pattern {text!r}: write it as 'N:M', e.g. '2:4'.")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class SparsitySpec:
    """One layer's target: an unstructured ratio, or an N:M pattern (never both).

    >>> SparsitySpec.parse(0.5).sparsity, SparsitySpec.parse("2:4").pattern
    (0.5, NMPattern(n=2, m=4))
    """

    sparsity: float = 0.0
    pattern: NMPattern | None = None

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s):
            raise ConfigError(f"sparsity must be a number in [0, 1) or 'N:M', got {s!r}.")
        if not 0.0 <= s < 1.0:
            hint = " (did you mean a fraction? 50 % is 0.5)" if 1.0 <= s <= 100 else ""
            raise ConfigError(f"sparsity {s} is out of range: use a fraction in [0, 1){hint}.")
        if self.pattern is not None:
            object.__setattr__(self, "sparsity", self.pattern.sparsity)

    @classmethod
    def parse(cls, value: float | str | SparsitySpec | NMPattern) -> SparsitySpec:
        """Read ``0.5``, ``"0.5"``, ``"50%"``, ``"2:4"`` or an existing spec."""
        if isinstance(value, SparsitySpec):
            return value
        if isinstance(value, NMPattern):
            return cls(pattern=value)
        if isinstance(value, str):
            text = value.strip()
            if ":" in text:
                return cls(pattern=NMPattern.parse(text))
            try:
                number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise ConfigError(
                    f"cannot read sparsity {value!r}: use a fraction such as 0.5, a percentage such as "
                    "'50%', or an N:M pattern such as '2:4'."
                ) from None
            return cls(sparsity=number)
        return cls(sparsity=value)

    @property
    def is_dense(self) -> bool:
        return self.pattern is None and self.sparsity == 0.0

    def num_pruned(self, count: int) -> int:
        """How many of ``count`` weights an unstructured target prunes (nearest integer)."""
        return int(math.floor(count * self.sparsity + 0.5))

    def check_width(self, in_features: int, name: str = "layer") -> None:
        if self.pattern is not None and in_features % self.pattern.m:
            raise ConfigError(
                f"{name} has {in_features} input features, not divisible by M={self.pattern.m} of pattern "
                f"{self.pattern}: choose an M that divides it, or add {name!r} to `ignore`."
            )

    def __str__(self) -> str:
        return str(self.pattern) if self.pattern else f"{self.sparsity:g}"


def _matcher(key: str):
    """``re:...`` is a regex searched in the module name; anything else is an exact name or a suffix."""
    if key.startswith("re:"):
        try:
            rx = re.compile(key[3:])
        except re.error as exc:
            raise ConfigError(f"bad regular expression {key!r}: {exc}") from None
        return lambda name: rx.search(name) is not None
    return lambda name: name == key or name.endswith("." + key)


@dataclass
class ModuleSelection:
    """Which Linears inside decoder blocks are pruned, and with which spec each.

    ``targets`` empty means every Linear inside the decoder blocks. Embeddings, norms, biases and
    ``lm_head`` are never candidates: they live outside the blocks or are not Linear weights.
    ``overrides`` maps a name / suffix / ``re:`` pattern to its own sparsity; the first match wins.
    """

    default: SparsitySpec
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    overrides: dict[str, SparsitySpec] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        sparsity: float | str | SparsitySpec,
        targets: Iterable[str] | None = None,
        ignore: Iterable[str] | None = None,
        overrides: Mapping[str, float | str] | None = None,
    ) -> ModuleSelection:
        sel = cls(
            default=SparsitySpec.parse(sparsity),
            targets=list(targets or []),
            ignore=list(ignore or []),
            overrides={k: SparsitySpec.parse(v) for k, v in (overrides or {}).items()},
        )
        for key in [*sel.targets, *sel.ignore, *sel.overrides]:
            _matcher(key)  # validate regexes early
        return sel

    def selects(self, name: str) -> bool:
        if any(_matcher(k)(name) for k in self.ignore):
            return False
        return not self.targets or any(_matcher(k)(name) for k in self.targets)

    def spec_for(self, name: str) -> SparsitySpec:
        for key, spec in self.overrides.items():
            if _matcher(key)(name):
                return spec
        return self.default
