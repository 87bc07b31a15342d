"""Structured pruning: remove whole decoder blocks, MLP channels and attention heads, so the model is
really smaller and faster, and save it as a plain checkpoint any runtime loads.

Layout (pure math apart from the passes, as for the unstructured solvers):

* ``scores.py``   block influence, angular distance, Wanda-SP, FLAP fluctuation, OBS group removal
* ``refit.py``    least-squares refit of the remaining columns (and bias) from the calibration Hessian
* ``plan.py``     parameter accounting; how many of each structure for a target fraction; auto split
* ``arch.py``     where each architecture keeps its MLP and attention projections, what it can express
* ``surgery.py``  the smaller state dict and config, rebuilt as a plain transformers model
* ``passes.py``   block-sequential calibration passes (one block and its activations in memory)
* ``edits.py``    function-equivalent edits during a pass (zero columns, refit, restore)
* ``auto.py``     auto's search: the proxy proposes splits, the calibration loss picks
* ``pipeline.py`` ``prune_structured``: plan → passes → rebuild; ``save.py``: ``structure.json`` + card

Entry points: ``llmprune.prune(model, tok, structure="auto", sparsity=0.3)`` and
``llmprune prune --structure auto --sparsity 0.3``. This package imports nothing at import time, so
leaf modules (``card.py``) can be used from ``llmprune.io`` without cycles.
"""
