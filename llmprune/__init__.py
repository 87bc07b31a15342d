"""llmprune: post-training pruning for large language models.

>>> import llmprune
>>> model, tok = llmprune.load_model()                                  # doctest: +SKIP
>>> result = llmprune.prune(model, tok, method="sparsegpt", sparsity=0.5)  # doctest: +SKIP
>>> llmprune.save_pruned(model, tok, "out/sparsegpt-50", result=result)   # doctest: +SKIP
"""

from llmprune.api import prune
from llmprune.errors import ConfigError, DataError, LlmpruneError, ModelLoadError
from llmprune.evaluation.perplexity import perplexity
from llmprune.finetune import keep_sparsity, merge_adapter
from llmprune.io.export import export
from llmprune.io.models import load_model
from llmprune.io.save import save_pruned
from llmprune.registry import available_solvers, get_solver, register_solver
from llmprune.result import PruneResult
from llmprune.spec import NMPattern, SparsitySpec
from llmprune.version import __version__


def __getattr__(name: str):
    """Trainer callbacks load transformers' trainer (seconds): only when first used."""
    if name in ("KeepSparsityCallback", "GradualPruningCallback"):
        from llmprune.finetune import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DataError",
    "GradualPruningCallback",
    "KeepSparsityCallback",
    "LlmpruneError",
    "ModelLoadError",
    "NMPattern",
    "PruneResult",
    "SparsitySpec",
    "__version__",
    "available_solvers",
    "export",
    "get_solver",
    "keep_sparsity",
    "load_model",
    "merge_adapter",
    "perplexity",
    "prune",
    "register_solver",
    "save_pruned",
]
