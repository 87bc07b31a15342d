"""Fallbacks taken while solving one Linear, collected so the result can say so, not only the log.

A solver stays a pure function of tensors; the numerical helpers it calls (``hessian.py``) note here
when they had to step back (more damping than asked, the Hessian's diagonal alone), and the engine,
which opened the collection around the solve, stores the notes in that module's report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

#: what each note means, for the summary table and sparsity.json readers
MEANINGS = {
    "damping_raised": "the Hessian needed more damping than dampening_frac to factor",
    "diagonal_hessian": "the Hessian could not be factored: its diagonal alone was used (no weight updates "
    "across input channels)",
    "kept_original_weights": "the solver's updated weights were not finite: the original weights were kept "
    "under its mask",
    "no_calibration_tokens": "no calibration token reached this Linear: it was pruned by weight magnitude",
    "statistics_per_batch": "its inputs were not laid out per sample (e.g. tokens routed to an expert): its "
    "statistics were summed per batch, so their last bits depend on the batch size and number of processes",
}
_notes: ContextVar[list[str] | None] = ContextVar("llmprune_fallbacks", default=None)


def note(kind: str) -> None:
    """Record a fallback in the collection that is open (if any)."""
    notes = _notes.get()
    if notes is not None and kind not in notes:
        notes.append(kind)


@contextlib.contextmanager
def collect() -> Iterator[list[str]]:
    """Collect the fallbacks noted inside the block into the yielded list."""
    notes: list[str] = []
    token = _notes.set(notes)
    try:
        yield notes
    finally:
        _notes.reset(token)
