"""Some rows of a captured block call: the same block inputs for a sub-batch of its windows.

A decoder block's captured call is its hidden states (B, L, d) plus whatever the model passed beside
them, which differs by architecture: a 4-D attention mask (B, 1, L, L) or none, rotary tables (B, L, r)
or (1, L, r) in a tuple, position ids (B, L) or (1, L), a 1-D ``cache_position`` (L,), flags. Block-wise
recovery trains on a few windows at a time, so it needs the call cut to those rows without knowing the
architecture. The rule: a tensor of two or more dimensions whose first is the batch's B is per window and
is cut; everything else (broadcast tensors with a first dimension of 1, 1-D tensors, scalars, flags) is
shared by every window and passed as is. Containers (tuples, lists, dicts) are cut element by element.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def take_rows(value: Any, rows: slice, batch: int) -> Any:
    """``value`` (a captured argument of a call on ``batch`` windows) restricted to windows ``rows``."""
    if isinstance(value, Tensor):
        return value[rows] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(take_rows(v, rows, batch) for v in value)
    if isinstance(value, list):
        return [take_rows(v, rows, batch) for v in value]
    if isinstance(value, dict):
        return {k: take_rows(v, rows, batch) for k, v in value.items()}
    return value


def cut_call(rows: slice, hidden: Tensor, *rest: Any) -> tuple[Any, ...]:
    """``(hidden, *rest)`` of one captured call (hidden states first, then its other arguments) cut to
    windows ``rows``; passed through as they are when ``rows`` is every window."""
    if rows == slice(None):
        return (hidden, *rest)
    batch = hidden.shape[0]
    return (hidden[rows], *(take_rows(part, rows, batch) for part in rest))


def row_chunks(batch: int, per_step: int) -> list[slice]:
    """``batch`` windows cut into consecutive slices of ``per_step`` (the last may be shorter); one slice
    of everything when ``per_step`` covers the batch, so a call is then passed through uncut."""
    if per_step >= batch:
        return [slice(None)]
    return [slice(a, min(a + per_step, batch)) for a in range(0, batch, per_step)]
