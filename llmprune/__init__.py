"""llmprune: post-training pruning for large language models.

>>> import llmprune
>>> model, tok = llmprune.load_model()                                  # doctest: +SKIP
>>> result = llmprune.prune(model, tok, method="sparsegpt", sparsity=0.5)  # doctest: +SKIP
"""

from llmprune.api import prune
from llmprune.errors import ConfigError, DataError, LlmpruneError, ModelLoadError
from llmprune.evaluation.perplexity import perplexity
from llmprune.io.export import export
from llmprune.io.models import load_model
from llmprune.io.save import save_pruned
from llmprune.registry import available_solvers, get_solver, register_solver
from llmprune.result import PruneResult
from llmprune.spec import NMPattern, SparsitySpec

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "LlmpruneError",
    "ModelLoadError",
    "NMPattern",
    "PruneResult",
    "SparsitySpec",
    "available_solvers",
    "export",
    "get_solver",
    "load_model",
    "perplexity",
    "prune",
    "register_solver",
    "save_pruned",
]
