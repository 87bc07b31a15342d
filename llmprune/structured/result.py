"""What a structured run did: the removal (exactly which blocks, channels, heads), sizes, scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from llmprune.structured.surgery import Removal

STRUCTURE_FORMAT = "llmprune.structure.v1"


@dataclass
class StructuredResult:
    """``model`` is the new, smaller model; the input model is left unchanged."""

    model: nn.Module = field(repr=False)
    structure: str
    method: str
    sparsity: float | None  # the requested fraction of decoder-block parameters (None: explicit shape)
    removal: Removal
    counts: dict[str, int]  # blocks, channels and kv_groups removed (the latter two per kept block)
    block_params: dict[str, int]  # dense / pruned decoder-block parameters
    total_params: dict[str, int]  # dense / pruned parameters of the whole model
    config: dict[str, Any]  # the shape keys of the new config
    block_scores: list[dict[str, float]] = field(default_factory=list)  # per original block
    search: list[dict[str, Any]] = field(default_factory=list)  # auto: candidates and calibration losses
    # auto: speed target, time model, predicted (and, with --bench, measured) speed-up, fallback
    speed: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    calibration_hash: str = ""
    num_calibration_samples: int = 0
    max_seq_length: int = 0
    seed: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # fallbacks and choices worth knowing

    @property
    def block_fraction_removed(self) -> float:
        return 1.0 - self.block_params["pruned"] / max(self.block_params["dense"], 1)

    @property
    def overall_sparsity(self) -> float:
        """Fraction of decoder-block parameters removed (the number ``--sparsity`` asks for)."""
        return self.block_fraction_removed

    def to_dict(self) -> dict[str, Any]:
        """The ``structure.json`` document."""
        return {
            "format": STRUCTURE_FORMAT,
            "structure": self.structure,
            "method": self.method,
            "target": self.sparsity,
            "block_params_removed": self.block_fraction_removed,
            "counts": self.counts,
            "block_params": self.block_params,
            "total_params": self.total_params,
            "config": self.config,
            "removed": self.removal.to_dict(),
            "block_scores": self.block_scores,
            "search": self.search,
            "speed": self.speed,
            "options": self.options,
            "calibration_hash": self.calibration_hash,
            "num_calibration_samples": self.num_calibration_samples,
            "max_seq_length": self.max_seq_length,
            "seed": self.seed,
            "seconds": self.seconds,
            "notes": self.notes,
        }
