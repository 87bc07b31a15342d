"""Recovery after pruning: PERP (sparsity-preserving LoRA + norms + biases) and LIFT (principal weights).

Both retrain briefly on token windows and hand back plain Linear weights with every pruned entry
exactly zero and the keep mask unchanged.

>>> from llmprune.recovery import recover
>>> result = recover(model, method="perp", input_ids=windows, steps=200)  # doctest: +SKIP
"""

from llmprune.recovery.api import (
    DEFAULT_LR,
    DEFAULT_TEACHER_TOP_K,
    METHODS,
    MODES,
    RUN_OPTIONS,
    RecoveryResult,
    method_options,
    recover,
)
from llmprune.recovery.masking import SparsityViolation, keep_masks_from_zeros

#: keywords shared by every method (CLI flags and recipe keys use the same names)
COMMON_OPTIONS = (
    "steps",
    "max_seconds",
    "lr",
    "batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "seed",
    "mode",
    *RUN_OPTIONS,
)

__all__ = [
    "COMMON_OPTIONS",
    "DEFAULT_LR",
    "DEFAULT_TEACHER_TOP_K",
    "METHODS",
    "MODES",
    "RUN_OPTIONS",
    "RecoveryResult",
    "SparsityViolation",
    "keep_masks_from_zeros",
    "method_options",
    "recover",
]
