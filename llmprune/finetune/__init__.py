"""Fine-tuning a pruned model without losing its zeros: in any training loop, through ``Trainer`` and TRL,
through a peft LoRA merge, and gradual pruning while training.

* :func:`keep_sparsity` (``keep.py``): gradient mask + post-step re-zeroing, a removable handle;
* :class:`KeepSparsityCallback`, :class:`GradualPruningCallback` (``callbacks.py``): the same for ``Trainer``;
* :func:`merge_adapter` (``merge.py``): LoRA merged as ``W + s·(BA) ⊙ keep``;
* ``schedule.py``: Zhu & Gupta's cubic ramp; ``gradual.py``: the pruner it drives; ``sources.py``: masks.

The callbacks import ``transformers.TrainerCallback`` (seconds), so they load on first use.
"""

from llmprune.finetune.keep import SparsityHandle, SparsityStats, keep_sparsity
from llmprune.finetune.merge import MergeReport, merge_adapter
from llmprune.finetune.schedule import CubicSchedule

_LAZY = {"KeepSparsityCallback", "GradualPruningCallback"}


def __getattr__(name: str):
    if name in _LAZY:
        from llmprune.finetune import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'llmprune.finetune' has no attribute {name!r}")


__all__ = [
    "CubicSchedule",
    "GradualPruningCallback",
    "KeepSparsityCallback",
    "MergeReport",
    "SparsityHandle",
    "SparsityStats",
    "keep_sparsity",
    "merge_adapter",
]
