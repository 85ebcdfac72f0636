"""Process memory policy: handing the C heap's free pages back to the OS.

CPython's small objects and dicts live in glibc's heap; free() returns memory to the OS only at
the heap's top, so after a mass delete the freed middle stays resident. glibc's malloc_trim
gives those pages back. The daemon calls it at the moments when much was freed: when the inode
table was copied down (fs/namespace.py) and when the compactor finds the pool empty or packed
its tables.

malloc_trim gives back free pages inside every arena but the top of a thread's own arena, and
the codec's helper thread (codec.py) gets an arena of its own the first time it mallocs: the
back half of each write's batch is encoded there, and the top of that arena stayed resident
(0.7-1.2 MiB after 1 GiB written, 90 % deleted). One arena for the whole process (glibc's
M_ARENA_MAX, set at import, before the thread starts) keeps those blocks in the main heap,
which malloc_trim trims; the two threads take the arena's lock only for the few mallocs of
each batch.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

#: glibc's mallopt parameter number for the arena count (malloc.h).
M_ARENA_MAX = -8


def _libc_function(name: str) -> Callable[..., int] | None:
    """A glibc function by name, or None (another libc)."""
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    return function


MALLOC_TRIM = _libc_function("malloc_trim")
MALLOPT = _libc_function("mallopt")


def use_one_arena() -> None:
    """Serve every thread's mallocs from the main arena (see the module comment). Only
    threads that have not malloc'd yet are affected; harmless to call again."""
    if MALLOPT is not None:
        MALLOPT(M_ARENA_MAX, 1)


def release_c_heap() -> None:
    """Give the C heap's free pages back to the OS, where the C library can (glibc)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


use_one_arena()
