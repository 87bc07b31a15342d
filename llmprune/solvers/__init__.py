"""Solvers: one algorithm per module, each registering itself in ``llmprune.registry``."""

#: modules imported (and so registered) the first time a solver is looked up
BUILTIN_MODULES = ("magnitude", "wanda", "sparsegpt", "icbs", "alps")
