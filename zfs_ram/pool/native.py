"""The compiled zsmalloc engine behind the Pool interface: NativeZsmallocPool.

zfs_ram/pool/_zsmalloc.c implements zsmalloc.py's algorithm in C (same classes, chains,
fullness groups, slot order, lazily made frames, compaction order; so the same calls give the
same handles and statistics), with the loops of the batch calls and of compaction run without
the GIL. This module only dresses it as a Pool: the class table comes from classes.py (one
source for both engines), statistics become the frozen records, and check() exports the C state
into a Python ZsmallocPool that zsmalloc_check.py verifies exactly as it verifies the reference
(after the C side checked what the export cannot show: capacities, segments, madvise).

Which engine create_pool() uses is chosen once, in zfs_ram.pool (through zfs_ram.native).
`BUILT` says whether the module exists at all; tests use the class directly to compare the two.
"""

from __future__ import annotations

import sys
from array import array
from typing import TYPE_CHECKING, Any

from zfs_ram.vocabulary import PAGE_SIZE

from . import frames
from .base import MAX_HANDLE, Pool
from .errors import PoolCorruptionError
from .stats import ClassStats
from .zsmalloc import NR_GROUPS, POUR_SLACK_PERCENT, ZsmallocPool, class_table

if TYPE_CHECKING:
    from ._zsmalloc import Engine
else:
    try:
        from ._zsmalloc import Engine
    except ImportError:

        class Engine:
            """Stands in for the compiled module where it was not built."""


#: Whether zfs_ram.pool._zsmalloc was built (and imports).
BUILT = hasattr(Engine, "store")


def _check_constants() -> None:
    from . import _zsmalloc

    expected = {
        "PAGE_SIZE": PAGE_SIZE,
        "SEGMENT_SHIFT": frames.SEGMENT_SHIFT,
        "WARM_FRAMES": frames.WARM_FRAMES,
        "MAX_HANDLE": MAX_HANDLE,
        "NR_GROUPS": NR_GROUPS,
        "POUR_SLACK_PERCENT": POUR_SLACK_PERCENT,
    }
    got = {name: getattr(_zsmalloc, name) for name in expected}
    if got != expected:
        raise ImportError(f"zfs_ram.pool._zsmalloc was built with {got}, not {expected}")


if BUILT:
    _check_constants()


def _array(typecode: str, data: bytes | None) -> array[int]:
    out = array(typecode)
    if data:
        out.frombytes(data)
    return out


class NativeZsmallocPool(Engine, Pool):
    """The zsmalloc allocator, compiled (see the module comment)."""

    kind = "zsmalloc"

    def __init__(self, mem_limit_pages: int = 0) -> None:
        if not BUILT:
            raise RuntimeError("zfs_ram.pool._zsmalloc was not built")
        if mem_limit_pages < 0:
            raise ValueError("mem_limit_pages must be >= 0 (0 = unlimited)")
        distinct, cid_of_size, watermark = class_table()
        rows = [(c.index, c.size, c.pages_per_zspage, c.objs_per_zspage, c.huge) for c in distinct]
        Engine.__init__(self, rows, cid_of_size, watermark, mem_limit_pages)
        frames.register_arena(self)

    # Pool's abstract methods are the engine's (store, read, free, ...); what follows turns
    # its raw answers into the records and checks the rest of zfs_ram knows.

    def _frame_counts(self) -> dict[str, int]:
        return {
            "free_frames": self.free_frame_count,
            "warm_frames": self.warm_frame_count,
            "mapped_bytes": self.mapped_bytes,
        }

    def class_statistics(self) -> list[ClassStats]:
        rows = [
            ClassStats(
                index=index,
                size=size,
                inuse_histogram=hist,
                obj_allocated=allocated,
                obj_used=used,
                pages_used=pages_used,
                pages_per_zspage=pages,
                objs_per_zspage=objs,
                freeable=freeable,
            )
            for index, size, hist, allocated, used, pages_used, pages, objs, freeable in (
                self._class_rows()
            )
        ]
        rows.sort(key=lambda r: r.index)
        return rows

    def metadata_bytes(self) -> int:
        """The Python object and every byte the C engine allocated for its bookkeeping."""
        return sys.getsizeof(self) + sys.getsizeof(self.__dict__) + self._heap_bytes()

    def _structures(self) -> list[object]:
        return [self.__dict__]

    def _zspage_count(self) -> int:
        return self.zspage_count

    def ranges(self) -> list[tuple[int, int]]:
        """The address ranges [start, end) of the engine's mmap segments."""
        return self._segment_ranges()

    def arena_rss_bytes(self) -> int:
        return frames.rss_of_ranges(self.ranges())

    def check(self) -> None:
        """The C-side checks, then zsmalloc_check.py over the exported state."""
        from .zsmalloc_check import check_zsmalloc

        self._check_native()
        mirror = self.mirror()
        try:
            check_zsmalloc(mirror)
        finally:
            mirror.close()

    def mirror(self) -> ZsmallocPool:
        """A Python ZsmallocPool holding a copy of this pool's tables (not its bytes: its arena
        has no memory), for check() and for tests that look at the layout."""
        state: dict[str, Any] = self._export()
        m = ZsmallocPool(self.mem_limit_pages)
        m.hloc = _array("Q", state["hloc"])
        m.hfree = state["hfree"]
        m.pages_used = self.pages_used
        m.max_pages_used = self.max_pages_used
        m.objects = self.objects
        m.bytes_stored = self.bytes_stored
        m.huge_objects = self.huge_objects
        m.pages_compacted = self.pages_compacted
        m.objects_moved = self.objects_moved
        m.bytes_moved = self.bytes_moved
        m._compact_cursor = state["compact_cursor"]
        m._compaction_debt = state["compaction_debt"]
        m._zspages = state["zspages"]
        m._settled = state["settled"]
        for c, row in zip(m._classes, state["classes"], strict=True):
            if (c.index, c.size, c.pages, c.objs) != (
                row["index"],
                row["size"],
                row["pages"],
                row["objs"],
            ):
                raise PoolCorruptionError(f"class {c.cid}: the engine's class table differs")
            c.frames = _array("I", row["frames"])
            c.slots = _array("I", row["slots"])
            c.inuse = _array("H", row["inuse"])
            c.freeobj = _array("h", row["freeobj"])
            c.group = _array("B", row["group"])
            c.prev = _array("i", row["prev"])
            c.next = _array("i", row["next"])
            c.free_zs = _array("i", row["free_zs"])
            c.heads = list(row["heads"])
            c.mask = row["mask"]
            c.zspages = row["zspages"]
            c.obj_used = row["obj_used"]
            c.frames_used = row["frames_used"]
            c.structures_bytes = -1
        m.arena.free_frames = _array("I", state["free_frames"])
        m.arena.warm_frames = _array("I", state["warm_frames"])
        m.arena.frames_created = state["frames_created"]
        return m


__all__ = ["BUILT", "NativeZsmallocPool"]
