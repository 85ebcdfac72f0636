"""The compressed-object pool: zsmalloc (and zbud, its baseline) over an mmap frame arena.

Pure and synchronous: nothing here imports trio, pyfuse3 or any layer above. Callers store
objects of 1..4096 bytes and keep the integer handle; objects may move (compaction) but handles
stay valid until freed. See zsmalloc.py for the design and its invariants.
"""

from __future__ import annotations

from zfs_ram.native import load as _load_engine
from zfs_ram.vocabulary import PAGE_SHIFT, PAGE_SIZE

from .base import BytesLike, Pool
from .classes import SizeClass, build_classes
from .errors import (
    InvalidHandleError,
    InvalidSizeError,
    PoolCorruptionError,
    PoolError,
    PoolFullError,
)
from .frames import FrameArena, all_arenas_rss_bytes
from .stats import ClassStats, PoolStats
from .zbud import ZbudPool
from .zsmalloc import ZsmallocPool

# The zsmalloc engine, chosen once: the compiled one where it was built (and not refused by
# ZFS_RAM_ENGINE=python), else the pure-Python reference. zbud is pure Python either way.
if _load_engine("pool", "zfs_ram.pool._zsmalloc") is not None:
    from .native import NativeZsmallocPool

    ZSMALLOC_ENGINE: type[Pool] = NativeZsmallocPool
else:
    ZSMALLOC_ENGINE = ZsmallocPool

#: The allocators create_pool() knows, by the name mount options and the CLI use.
POOL_KINDS: dict[str, type[Pool]] = {"zsmalloc": ZSMALLOC_ENGINE, "zbud": ZbudPool}


def create_pool(kind: str = "zsmalloc", mem_limit_pages: int = 0) -> Pool:
    """A new, empty pool of the given kind ("zsmalloc" or "zbud"), holding at most
    mem_limit_pages frames (zram's mem_limit; 0 = unlimited)."""
    try:
        cls = POOL_KINDS[kind]
    except KeyError:
        choices = ", ".join(POOL_KINDS)
        raise ValueError(f"unknown pool kind {kind!r} (choose from {choices})") from None
    return cls(mem_limit_pages=mem_limit_pages)


def arena_rss_bytes(target: Pool | FrameArena | None = None) -> int:
    """Resident bytes of a pool's (or an arena's) mappings, from /proc/self/smaps.

    With no argument: of every live pool arena in this process.
    """
    if target is None:
        return all_arenas_rss_bytes()
    if isinstance(target, Pool):
        return target.arena_rss_bytes()
    return target.rss_bytes()


__all__ = [
    "POOL_KINDS",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "BytesLike",
    "ClassStats",
    "FrameArena",
    "InvalidHandleError",
    "InvalidSizeError",
    "Pool",
    "PoolCorruptionError",
    "PoolError",
    "PoolFullError",
    "PoolStats",
    "SizeClass",
    "ZSMALLOC_ENGINE",
    "ZbudPool",
    "ZsmallocPool",
    "arena_rss_bytes",
    "build_classes",
    "create_pool",
]
