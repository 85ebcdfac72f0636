"""Process memory policy: handing the C heap's free pages back to the OS.

CPython's small objects and dicts live in glibc's heap; free() returns memory to the OS only at
the heap's top, so after a mass delete the freed middle stays resident. glibc's malloc_trim
gives those pages back. The daemon calls it at the moments when much was freed: when the inode
table was copied down (fs/namespace.py) and when the compactor finds the pool empty.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another libc)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


MALLOC_TRIM = _find_malloc_trim()


def release_c_heap() -> None:
    """Give the C heap's free pages back to the OS, where the C library can (glibc)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
