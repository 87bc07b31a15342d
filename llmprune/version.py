"""Versions: of the package, and of the recipe format it reads and writes. A module of its own so that
any module can record them without importing ``llmprune`` (whose ``__init__`` imports the whole API)
or ``recipe`` (which sits high in the layers)."""

__version__ = "0.1.0"

#: the ``version:`` key of recipe.yaml files this llmprune reads and writes
RECIPE_VERSION = 1
