"""What a pruning run reports: per-module sparsity and error, per-block timings, provenance."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor


@dataclass
class ModuleReport:
    name: str  # full module name in the model, e.g. "model.layers.0.self_attn.q_proj"
    shape: tuple[int, int]  # (out, in)
    target: str  # the resolved spec: "0.5" or "2:4"
    sparsity: float  # achieved: fraction of exact zeros in the written weight
    layer_error: float | None = None  # mean_tokens ||(W - W') x||^2 when the Hessian was collected
    seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)  # llmprune.solvers.fallbacks.MEANINGS keys


@dataclass
class BlockReport:
    index: int
    name: str
    seconds: float  # calibrate + solve + propagate
    recon_error: float  # ||Y_pruned - Y_dense||^2 / ||Y_dense||^2 on the block's calibration inputs


@dataclass
class PruneResult:
    method: str
    sparsity: str  # the default target as given
    options: dict[str, Any]
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    blocks: list[BlockReport] = field(default_factory=list)
    keep_masks: dict[str, Tensor] = field(default_factory=dict, repr=False)  # bool (out, in), cpu
    calibration_hash: str = ""
    num_calibration_samples: int = 0
    max_seq_length: int = 0
    seed: int = 0
    seconds: float = 0.0
    dense_weights: int = 0  # weights of the block Linears the selection left dense (--ignore, --targets)
    allocation: dict[str, Any] | None = None  # how per-layer sparsities were chosen (non-uniform only)
    recovery: dict[str, Any] | None = None  # block-wise reconstruction fused into the pass (recover=...)

    @property
    def overall_sparsity(self) -> float:
        """Zeros over all decoder-block Linear weights, the number papers report: the Linears left dense
        by ``ignore``/``targets`` count too, so ignoring a layer lowers it."""
        total = sum(m.shape[0] * m.shape[1] for m in self.modules.values()) + self.dense_weights
        zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.modules.values())
        return zeros / total if total else 0.0

    @property
    def fallbacks(self) -> dict[str, list[str]]:
        """Modules whose solve took a fallback (see ``llmprune.solvers.fallbacks.MEANINGS``)."""
        return {name: list(m.fallbacks) for name, m in self.modules.items() if m.fallbacks}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (masks left out: they are saved as tensors)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "keep_masks"}
        out["modules"] = {k: asdict(m) for k, m in self.modules.items()}
        out["blocks"] = [asdict(b) for b in self.blocks]
        out["overall_sparsity"] = self.overall_sparsity
        out["fallbacks"] = self.fallbacks
        return out
