"""Thread control for solver loops made of many small torch ops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run torch ops on ``threads`` intra-op threads inside the block, then restore the caller's.

    Annealing is thousands of small ops in a row; with more than one thread each op pays a thread
    hand-off, which made it 10-100x slower on a 2-core machine (worst when the cores are busy).
    """
    previous = torch.get_num_threads()
    if previous == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
