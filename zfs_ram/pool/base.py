"""What every pool shares: the frame arena, the handle table, mem_limit and the counters.

The handle table `hloc` is one `array('Q')` indexed by handle. A live entry has bit 0 set and
encodes where the object is (the layout belongs to the subclass). The free handles form an
intrusive LIFO list of runs whose head is `hfree` (0 = empty): a run's first entry has bit 0
clear and holds the next run's first handle << 1 and, << RUN_SHIFT, how many free handles
follow it in its run, whose entries are 0. A freed handle is a run of one; packing chains
the free handles lowest first in maximal runs, and the compiled engine gives the whole pages
of a run's zero entries back to the OS. Entry 0 is never used, so handle 0 is always invalid.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from array import array
from collections.abc import Sequence

from zfs_ram.vocabulary import PAGE_SIZE

from .errors import InvalidHandleError, InvalidSizeError, PoolCorruptionError, PoolFullError
from .frames import FrameArena
from .stats import ClassStats, PoolStats

#: What store() and write() accept (Python 3.11 has no collections.abc.Buffer).
BytesLike = bytes | bytearray | memoryview

#: Live handle-table entries carry this bit, like the kernel's OBJ_ALLOCATED_TAG.
LIVE = 1
#: Handles are kept below 2**31 so that an out-of-line reverse map fits in 4 bytes per slot
#: (handle << 1 | LIVE in an array('I')); that is still 8 TiB of 4 KiB objects.
MAX_HANDLE = (1 << 31) - 1
#: The tables (handle table, per-zspage arrays) are packed once a compaction pass has settled
#: the pool and at least this share of their entries is free: a quarter bounds what the
#: tables keep (about 12 bytes per object ever held) to a third more than the live objects
#: need, and packing a table that is mostly live would copy it for little.
TABLE_SLACK_DIVISOR = 4
#: ... and, for the handle table, at least this many handles are free (half a KiB of table).
TABLE_MIN_FREE_HANDLES = 64
#: A free run's first entry: next run's first handle << 1 | the run's further handles << this.
RUN_SHIFT = 33
RUN_ONE = 1 << RUN_SHIFT
NEXT_MASK = (1 << 32) - 1


class Pool(ABC):
    """A compressed-object pool: malloc/store objects of 1..4096 bytes, get stable int handles.

    Pure and synchronous. Not thread-safe: one caller at a time (the filesystem's trio loop).
    """

    kind: str = "?"

    def __init__(self, mem_limit_pages: int = 0) -> None:
        if mem_limit_pages < 0:
            raise ValueError("mem_limit_pages must be >= 0 (0 = unlimited)")
        #: Frames the pool may hold at most (zram's mem_limit, in pages); 0 = unlimited. May be
        #: changed at any time; lowering it below pages_used only makes new allocations fail.
        self.mem_limit_pages = mem_limit_pages
        self.arena = FrameArena()
        self.hloc = array("Q", [0])
        self.hfree = 0
        self.pages_used = 0
        self.max_pages_used = 0
        self.objects = 0
        self.bytes_stored = 0
        self.huge_objects = 0
        self.pages_compacted = 0
        self.objects_moved = 0
        self.bytes_moved = 0

    # -- handles ----------------------------------------------------------------------------

    def _check_handle_room(self) -> None:
        """Raise before any change if no handle can be issued."""
        if not self.hfree and len(self.hloc) > MAX_HANDLE:
            raise PoolFullError("out of handles")

    def _take_handle(self, word: int) -> int:
        """Issue a handle for `word` and count its object in (call `_check_handle_room`
        first); `_release_handle` is its inverse."""
        self.objects += 1
        h = self.hfree
        hloc = self.hloc
        if h:
            w = hloc[h]
            if w >= RUN_ONE:  # the rest of h's run: h + 1 heads it now
                hloc[h + 1] = w - RUN_ONE
                self.hfree = h + 1
            else:
                self.hfree = w >> 1
            hloc[h] = word
        else:
            h = len(hloc)
            hloc.append(word)
        return h

    def _release_handle(self, h: int) -> None:
        """Put handle `h` back and count its object gone. The table keeps its peak length
        while objects live (handles cannot be renumbered), but a pool that empties starts a
        fresh one: after an rm of everything, its 8 bytes per object ever held go back too."""
        self.objects -= 1
        if self.objects == 0:
            self.hloc = array("Q", [0])
            self.hfree = 0
            return
        self.hloc[h] = self.hfree << 1
        self.hfree = h

    def pack_handle_table(self) -> None:
        """Cut the handle table's free tail and chain its free handles lowest first, if at
        least 1/TABLE_SLACK_DIVISOR of it (and TABLE_MIN_FREE_HANDLES) is free. Handles cannot
        be renumbered (the page store holds them), so the table keeps up to the highest live
        one; reissuing low handles first lets the live ones gather at the bottom, so that the
        next packing cuts more."""
        hloc = self.hloc
        free = len(hloc) - 1 - self.objects
        if free < TABLE_MIN_FREE_HANDLES or free * TABLE_SLACK_DIVISOR < len(hloc):
            return
        top = len(hloc) - 1
        while not hloc[top] & LIVE:  # objects > 0 here: an empty pool's table was reset
            top -= 1
        packed = hloc[: top + 1]  # a copy: an array keeps its capacity when it shrinks
        head = 0
        h = top  # handles below h are still to look at; top is live
        while h > 1:
            if packed[h - 1] & LIVE:
                h -= 1
                continue
            end = h  # the run is start..end-1
            while h > 1 and not packed[h - 1] & LIVE:
                h -= 1
            packed[h + 1 : end] = array("Q", bytes(8 * (end - h - 1)))
            packed[h] = head << 1 | (end - h - 1) << RUN_SHIFT
            head = h
        self.hloc = packed
        self.hfree = head

    def _word(self, h: int) -> int:
        """The live table entry of handle `h`, or InvalidHandleError."""
        try:
            w = self.hloc[h] if h > 0 else 0
        except (IndexError, TypeError):
            raise InvalidHandleError(f"unknown handle {h!r}") from None
        if not w & LIVE:
            raise InvalidHandleError(f"handle {h!r} is not allocated")
        return w

    def _check_handle_table(self) -> int:
        """Walk the free-handle list; return the number of live handles."""
        hloc = self.hloc
        if hloc[0] != 0:
            raise PoolCorruptionError("handle table entry 0 is used")
        seen: set[int] = set()
        h = self.hfree
        while h:
            if h in seen or not 0 < h < len(hloc):
                raise PoolCorruptionError(f"free-handle list broken at {h}")
            w = hloc[h]
            if w & LIVE:
                raise PoolCorruptionError(f"live handle {h} on the free-handle list")
            further = w >> RUN_SHIFT
            if h + further >= len(hloc):
                raise PoolCorruptionError(f"free-handle run at {h} broken")
            for k in range(h + 1, h + further + 1):
                if hloc[k] or k in seen:
                    raise PoolCorruptionError(f"free-handle run at {h} broken at {k}")
                seen.add(k)
            seen.add(h)
            h = w >> 1 & NEXT_MASK
        live = sum(1 for w in hloc if w & LIVE)
        if live + len(seen) + 1 != len(hloc):
            raise PoolCorruptionError(
                f"{len(hloc) - 1 - live - len(seen)} handles neither live nor free"
            )
        if live != self.objects:
            raise PoolCorruptionError(f"{live} live handles but objects == {self.objects}")
        return live

    # -- the public interface ---------------------------------------------------------------

    @property
    @abstractmethod
    def huge_class_size(self) -> int:
        """Objects at least this long take a frame of their own (store a page raw instead)."""

    @abstractmethod
    def malloc(self, size: int) -> int:
        """Allocate an object of `size` bytes (1..4096); its contents are undefined."""

    @abstractmethod
    def store(self, data: BytesLike) -> int:
        """malloc(len(data)) and write data: the hot path. Raises PoolFullError."""

    @abstractmethod
    def write(self, h: int, data: BytesLike) -> None:
        """Write `data` at the start of object `h` (len(data) <= object size)."""

    @abstractmethod
    def read(self, h: int) -> bytes:
        """The object's bytes, exactly object_size(h) of them."""

    def read_many(self, handles: list[int]) -> list[bytes]:
        """read() of each handle, in order: one call for a whole FUSE read of many pages."""
        return [self.read(h) for h in handles]

    # Batches: one call per FUSE request instead of one per page. The compiled engine
    # overrides them with loops that run without the GIL; these are the reference semantics.

    def store_many(self, blob: BytesLike, sizes: Sequence[int]) -> array[int]:
        """store() each of the objects laid back to back in `blob` (sizes[i] bytes each), in
        order. Stops at the first object the pool cannot take (PoolFullError): the handles
        returned are those of a prefix of `sizes`, and nothing after it was stored. A size
        outside 1..PAGE_SIZE, or sizes adding up to more than the blob, are refused
        (InvalidSizeError) before anything is stored."""
        sizes = list(sizes)
        if not all(0 < size <= PAGE_SIZE for size in sizes):
            raise InvalidSizeError(f"a size outside 1..{PAGE_SIZE} in {len(sizes)} objects")
        if sum(sizes) > len(blob):
            raise InvalidSizeError(f"sizes add up to {sum(sizes)} bytes, the blob has {len(blob)}")
        handles = array("Q")
        view = memoryview(blob)
        pos = 0
        for size in sizes:
            try:
                handle = self.store(view[pos : pos + size])
            except PoolFullError:
                break
            handles.append(handle)
            pos += size
        return handles

    def read_joined(self, handles: Sequence[int]) -> tuple[bytes, array[int]]:
        """The objects of `handles`, concatenated in order, and each one's size: a whole FUSE
        read in two Python objects rather than one per page."""
        objects = self.read_many(list(handles))
        return b"".join(objects), array("H", [len(obj) for obj in objects])

    def free_many(self, handles: Sequence[int]) -> array[int]:
        """free() each handle, in order; the freed objects' sizes. A handle that is not
        allocated, or one given twice, is refused (InvalidHandleError) before anything is
        freed."""
        handles = list(handles)
        for h in handles:
            self._word(h)
        if len(set(handles)) != len(handles):
            raise InvalidHandleError("a handle given twice to free_many")
        return array("H", [self.free(h) for h in handles])

    @abstractmethod
    def object_size(self, h: int) -> int:
        """The size the object was allocated with."""

    @abstractmethod
    def free(self, h: int) -> int:
        """Free object `h` and return its size (callers that count bytes need no second
        lookup); the handle becomes invalid (and may be reissued later)."""

    def can_compact(self, pour: bool = True) -> int:
        """Frames compaction could free now (`pour`: counting what compact_step(pour=True)
        adds to the kernel's pass; see zsmalloc.py)."""
        return 0

    def compact_step(self, max_objects: int = 64, pour: bool = True) -> int:
        """Move at most `max_objects` objects; return how many moved (0 = nothing left).
        `pour=False` does only what the kernel's compaction does (the compactor's passes while
        requests keep coming: what it would pour then is often freed by the next ones)."""
        return 0

    def compact(self) -> int:
        """Compact to completion; return the number of frames freed."""
        before = self.pages_compacted
        while self.compact_step(1 << 16):
            pass
        self.trim()
        return self.pages_compacted - before

    def trim(self) -> int:
        """Give the arena's warm frames back to the OS (see frames.WARM_FRAMES)."""
        return self.arena.trim()

    @abstractmethod
    def class_statistics(self) -> list[ClassStats]:
        """One row per distinct size class (zsmalloc's debugfs `classes` table)."""

    @abstractmethod
    def check(self) -> None:
        """Verify every structure; raise PoolCorruptionError on any inconsistency."""

    @abstractmethod
    def _structures(self) -> list[object]:
        """Every Python object the pool keeps its bookkeeping in (for metadata_bytes)."""

    @abstractmethod
    def _zspage_count(self) -> int: ...

    def _structures_bytes(self) -> int:
        """sys.getsizeof summed over _structures(); a pool with many may keep it cached."""
        return sum(sys.getsizeof(s) for s in self._structures())

    def metadata_bytes(self) -> int:
        """Bytes of Python bookkeeping: sys.getsizeof summed over every structure held."""
        return (
            sys.getsizeof(self)
            + sys.getsizeof(self.__dict__)
            + sys.getsizeof(self.hloc)
            + self._structures_bytes()
            + self.arena.metadata_bytes()
        )

    def statistics(self) -> PoolStats:
        """A snapshot from counters: O(number of size classes), never a walk of the zspages or
        the objects (class_statistics() walks the fullness lists)."""
        return PoolStats(
            kind=self.kind,
            pages_used=self.pages_used,
            max_pages_used=self.max_pages_used,
            mem_limit_pages=self.mem_limit_pages,
            objects=self.objects,
            bytes_stored=self.bytes_stored,
            pages_compacted=self.pages_compacted,
            objects_moved=self.objects_moved,
            bytes_moved=self.bytes_moved,
            huge_objects=self.huge_objects,
            freeable_pages=self.can_compact(),
            metadata_bytes=self.metadata_bytes(),
            zspages=self._zspage_count(),
            **self._frame_counts(),
        )

    def _frame_counts(self) -> dict[str, int]:
        """The arena's free and warm frames and mapped bytes, for statistics(); the compiled
        engine keeps its frames itself and answers from its own counters."""
        arena = self.arena
        return {
            "free_frames": len(arena.free_frames),
            "warm_frames": len(arena.warm_frames),
            "mapped_bytes": arena.mapped_bytes,
        }

    def reset_max_pages(self) -> None:
        """Restart the high-water mark from the current use (zram: echo 0 > mem_used_max)."""
        self.max_pages_used = self.pages_used

    def arena_rss_bytes(self) -> int:
        """Resident bytes of this pool's arena, from /proc/self/smaps."""
        return self.arena.rss_bytes()

    def close(self) -> None:
        """Unmap all memory. The pool must not be used afterwards (handles become invalid)."""
        self.arena.close()
        self.hloc = array("Q", [0])
        self.hfree = 0

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_common(self) -> None:
        """Checks that hold for every pool kind; subclasses call this from check()."""
        self._check_handle_table()
        arena = self.arena
        free = arena.unused_frames()
        if len(set(free)) != len(free):
            raise PoolCorruptionError("a frame is on the free-frame lists twice")
        if free and max(free) >= arena.frames_created:
            raise PoolCorruptionError("a never-created frame is on the free-frame list")
        if arena.frames_in_use != self.pages_used:
            raise PoolCorruptionError(
                f"pages_used {self.pages_used} != frames in use {arena.frames_in_use}"
            )
        if self.max_pages_used < self.pages_used:
            raise PoolCorruptionError("max_pages_used below pages_used")
        if self.mem_limit_pages < 0:
            raise PoolCorruptionError("negative mem_limit_pages")


__all__ = ["Pool", "BytesLike", "PAGE_SIZE", "LIVE", "MAX_HANDLE"]
