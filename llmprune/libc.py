"""glibc's allocator controls (``mallopt``, ``malloc_trim``), or None where the C library is not glibc.

One loader for the two places that tune the allocator: streaming hands freed block memory back to the
OS (``trim_heap``), recovery keeps it in the process during training (``recovery/heap.py``). A leaf.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # musl and others have no mallopt
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return lib


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (a no-op off glibc).

    glibc raises its mmap threshold after big frees, so later block-sized buffers come from the heap and
    stay resident once freed: without a trim, resident memory creeps up by about a block per block.
    """
    lib = glibc()
    if lib is not None:
        lib.malloc_trim(0)
