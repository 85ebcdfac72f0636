"""The two zsmalloc engines for the pool tests: the pure-Python reference and the compiled one.

Tests that look at the layout read it through layout() (the native engine exports a copy of
its tables as a Python ZsmallocPool); tests that corrupt it write through poke().
"""

from __future__ import annotations

import pytest

from zfs_ram.pool import Pool, ZbudPool, ZsmallocPool
from zfs_ram.pool import native as native_pool
from zfs_ram.pool.native import NativeZsmallocPool

ENGINES = ["python", "native"]
#: Every allocator and engine: the kinds of create_pool() with zsmalloc's two engines apart.
KINDS = ["zsmalloc-python", "zsmalloc-native", "zbud"]


def make(engine: str, mem_limit_pages: int = 0) -> Pool:
    """A zsmalloc pool of the given engine (the native one skips the test if not built)."""
    if engine == "native":
        if not native_pool.BUILT:
            pytest.skip("zfs_ram.pool._zsmalloc was not built")
        return NativeZsmallocPool(mem_limit_pages)
    assert engine == "python"
    return ZsmallocPool(mem_limit_pages)


def make_kind(kind: str, mem_limit_pages: int = 0) -> Pool:
    if kind == "zbud":
        return ZbudPool(mem_limit_pages)
    return make(kind.removeprefix("zsmalloc-"), mem_limit_pages)


def layout(pool: Pool) -> ZsmallocPool:
    """The pool's tables as a Python ZsmallocPool: the pool itself, or the native one's copy."""
    if isinstance(pool, NativeZsmallocPool):
        return pool.mirror()
    assert isinstance(pool, ZsmallocPool)
    return pool


def poke(pool: Pool, name: str, cid: int, index: int, value: int) -> None:
    """Overwrite one word of the pool's tables (see the C engine's _poke for the names)."""
    if isinstance(pool, NativeZsmallocPool):
        pool._poke(name, cid, index, value)
        return
    assert isinstance(pool, ZsmallocPool)
    if name in ("frames", "slots", "inuse", "next"):
        getattr(pool._classes[cid], name)[index] = value
    elif name == "hloc":
        pool.hloc[index] = value
    elif name == "push_free_frame":
        pool.arena.free_frames.append(value)
    else:
        setattr(pool, name, value)
