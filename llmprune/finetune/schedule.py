"""The cubic sparsity ramp of Zhu & Gupta ("To prune, or not to prune", 2017, eq. 1).

    s_t = s_f + (s_i - s_f) · (1 - (t - t_0) / (n Δt))^3     for t in {t_0, t_0 + Δt, …, t_0 + n Δt}

Sparsity rises fast while the network has many redundant weights and slowly near the target, where
each removed weight costs more; between pruning steps the mask is fixed and training recovers.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.errors import ConfigError


@dataclass(frozen=True)
class CubicSchedule:
    """``final`` sparsity reached at ``end_step``, starting from ``initial`` at ``start_step``, updated
    every ``every`` steps (and at ``end_step``).

    >>> s = CubicSchedule(final=0.5, start_step=0, end_step=100, every=10)
    >>> [round(s.sparsity_at(t), 4) for t in (0, 10, 50, 99, 100, 200)]
    [0.0, 0.1355, 0.4375, 0.4995, 0.5, 0.5]
    """

    final: float
    start_step: int
    end_step: int
    every: int = 1
    initial: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise ConfigError(
                f"gradual pruning needs 0 <= initial_sparsity <= sparsity < 1, got {self.initial} and "
                f"{self.final}."
            )
        if self.start_step < 0 or self.end_step < self.start_step:
            raise ConfigError(
                f"gradual pruning needs 0 <= start_step <= end_step, got {self.start_step} and "
                f"{self.end_step}: set end_step below the number of training steps."
            )
        if self.every < 1:
            raise ConfigError(f"every must be a positive number of steps, got {self.every}.")

    def is_pruning_step(self, step: int) -> bool:
        """Whether the mask is updated after optimiser step ``step``."""
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.every == 0 or step == self.end_step

    def sparsity_at(self, step: int) -> float:
        """Target sparsity in force after ``step``: held between pruning steps, ``final`` after the end."""
        if step < self.start_step:
            return self.initial
        if step >= self.end_step:
            return self.final
        last = self.start_step + (step - self.start_step) // self.every * self.every
        progress = (last - self.start_step) / (self.end_step - self.start_step)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3
