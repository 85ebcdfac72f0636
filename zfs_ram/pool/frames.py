"""Physical memory for the pools: 4 KiB frames carved out of anonymous private mmap segments.

Invariants:
  * A frame number `f` lives in segment `f >> SEGMENT_SHIFT` at byte `(f & SEGMENT_MASK) << 12`.
    Segments are never unmapped before `close()`, so frame numbers stay valid.
  * Every frame below `frames_created` is either in use (owned by exactly one zspage or zbud
    page of the owning pool), on `warm_frames` or on `free_frames`; never two of these. Frames
    at or above it were never touched and cost no memory.
  * A frame on `free_frames` has been `madvise(MADV_DONTNEED)`-ed: it is not resident, and reads
    as zeros when reused. That is how freed memory goes back to the OS at once. A frame handed
    out by alloc() is made resident, so Rss of the arena == (frames in use + warm frames) *
    PAGE_SIZE.
  * `warm_frames` holds at most WARM_FRAMES freed frames that are still resident, like the
    kernel's per-CPU free page lists: under random overwrites some zspages empty while others
    grow, and handing a freed frame straight to the next zspage saves a madvise and a page
    fault each (10% of the daemon's time in fs_bench randwrite). trim() gives them back too;
    the compactor calls it after each pass.

The arena grows by whole segments instead of one mmap per zspage, because Linux caps the number
of mappings per process (vm.max_map_count, 65530 by default) and because a zspage never needs
contiguous frames (objects straddling two frames are copied in two pieces).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import weakref
from array import array
from collections.abc import Iterable, Iterator
from typing import Protocol

from zfs_ram.vocabulary import PAGE_SHIFT, PAGE_SIZE

from .errors import PoolFullError

#: 2**14 frames = 64 MiB of address space per segment: few mappings, cheap to reserve
#: (untouched pages cost nothing) and small enough that a tiny pool stays tiny in smaps.
SEGMENT_SHIFT = 14
SEGMENT_FRAMES = 1 << SEGMENT_SHIFT
SEGMENT_MASK = SEGMENT_FRAMES - 1
SEGMENT_BYTES = SEGMENT_FRAMES * PAGE_SIZE
#: Freed frames kept resident for reuse: 256 KiB, a rounding error next to any real pool.
WARM_FRAMES = 64

#: /proc/self/pagemap entry bit 63: the page is present in RAM (readable without privileges).
_PAGEMAP_PRESENT = 1 << 63


class Mapped(Protocol):
    """Anything that owns arena segments: a FrameArena, or the compiled engine's pool."""

    def ranges(self) -> list[tuple[int, int]]: ...


_live_arenas: weakref.WeakSet[Mapped] = weakref.WeakSet()


def register_arena(owner: Mapped) -> None:
    """Count `owner`'s segments in all_arenas_rss_bytes() while it lives."""
    _live_arenas.add(owner)


def _mapping_address(m: mmap.mmap) -> int:
    """Start address of an mmap; the temporary buffer export is dropped before returning so
    that the mmap can still be closed."""
    probe = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


class FrameArena:
    """A growable set of 4 KiB frames with immediate return of freed frames to the OS."""

    __slots__ = (
        "segments",
        "addresses",
        "free_frames",
        "warm_frames",
        "frames_created",
        "__weakref__",
    )

    def __init__(self) -> None:
        #: One mmap per 64 MiB segment; pools index these directly on their hot paths.
        self.segments: list[mmap.mmap] = []
        #: Start address of each segment, for the smaps/pagemap accounting.
        self.addresses: list[int] = []
        #: LIFO stack of freed (DONTNEED-ed) frame numbers, reused before fresh ones.
        self.free_frames = array("I")
        #: LIFO stack of freed frames still resident, reused first; at most WARM_FRAMES.
        self.warm_frames = array("I")
        self.frames_created = 0
        _live_arenas.add(self)

    # -- allocation -------------------------------------------------------------------------

    def alloc(self) -> int:
        """Return a frame number, resident. Raises PoolFullError if the OS refuses a segment.

        The frame is faulted in at once (one byte written) because the kernel's zspages are
        made of real pages too: pages_used * PAGE_SIZE then equals the arena's Rss, instead of
        running ahead of it by the untouched tail frames of fresh zspages.
        """
        if self.warm_frames:
            return self.warm_frames.pop()  # resident already; its old bytes are not cleared
        if self.free_frames:
            f = self.free_frames.pop()
        else:
            f = self.frames_created
            if f >> SEGMENT_SHIFT == len(self.segments):
                self._grow()
            self.frames_created = f + 1
        self.segments[f >> SEGMENT_SHIFT][(f & SEGMENT_MASK) << PAGE_SHIFT] = 0
        return f

    def free(self, f: int) -> None:
        """Keep frame `f` warm for the next alloc() if there is room, else give it back to the
        OS now; either way its number is kept for reuse."""
        if len(self.warm_frames) < WARM_FRAMES:
            self.warm_frames.append(f)
            return
        self._release(f)

    def _release(self, f: int) -> None:
        self.segments[f >> SEGMENT_SHIFT].madvise(
            mmap.MADV_DONTNEED, (f & SEGMENT_MASK) << PAGE_SHIFT, PAGE_SIZE
        )
        self.free_frames.append(f)

    def trim(self) -> int:
        """Give the warm frames back to the OS; returns how many there were."""
        warm = self.warm_frames
        count = len(warm)
        while warm:
            self._release(warm.pop())
        return count

    def pack(self) -> None:
        """Sort the free frames so that the lowest is reused first: the order the compiled
        engine's packed free stack keeps (runs of adjacent frames, two entries each, its
        pages past the top given back to the OS; _zsmalloc.c's arena_pack). Done when a
        compaction pass settles the pool, as the tables are packed."""
        self.free_frames = array("I", sorted(self.free_frames, reverse=True))

    def _grow(self) -> None:
        try:
            m = mmap.mmap(
                -1,
                SEGMENT_BYTES,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as e:
            raise PoolFullError(f"cannot map another {SEGMENT_BYTES >> 20} MiB segment: {e}") from e
        # Transparent huge pages would make one touched frame cost 2 MiB of Rss, and DONTNEED of
        # 4 KiB inside a huge page would not free anything until khugepaged splits it.
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)
        self.segments.append(m)
        self.addresses.append(_mapping_address(m))

    # -- facts ------------------------------------------------------------------------------

    def unused_frames(self) -> array[int]:
        """Every created frame that no zspage or page holds: the free and the warm ones."""
        return self.free_frames + self.warm_frames

    @property
    def frames_in_use(self) -> int:
        return self.frames_created - len(self.free_frames) - len(self.warm_frames)

    @property
    def mapped_bytes(self) -> int:
        return len(self.segments) * SEGMENT_BYTES

    def metadata_bytes(self) -> int:
        import sys

        return (
            sys.getsizeof(self)
            + sys.getsizeof(self.segments)
            + sum(sys.getsizeof(m) for m in self.segments)
            + sys.getsizeof(self.addresses)
            + sys.getsizeof(self.free_frames)
            + sys.getsizeof(self.warm_frames)
        )

    def ranges(self) -> list[tuple[int, int]]:
        """The address ranges [start, end) of the segments."""
        return [(a, a + SEGMENT_BYTES) for a in self.addresses]

    def rss_bytes(self) -> int:
        """Resident bytes of this arena's segments, from /proc/self/smaps."""
        return rss_of_ranges(self.ranges())

    def close(self) -> None:
        """Unmap every segment; the arena is empty afterwards."""
        for m in self.segments:
            m.close()
        self.segments.clear()
        self.addresses.clear()
        self.free_frames = array("I")
        self.warm_frames = array("I")
        self.frames_created = 0
        _live_arenas.discard(self)


def _smaps_vmas() -> Iterator[tuple[int, int, int]]:
    """Yield (start, end, rss_bytes) for every mapping in /proc/self/smaps."""
    start = end = -1
    with open("/proc/self/smaps", "rb") as fh:
        for line in fh:
            head = line[:1]
            if head in b"0123456789abcdef" and b"-" in line.split(b" ", 1)[0]:
                lo, hi = line.split(b" ", 1)[0].split(b"-")
                start, end = int(lo, 16), int(hi, 16)
            elif line.startswith(b"Rss:") and start >= 0:
                yield start, end, int(line.split()[1]) * 1024
                start = -1


def _pagemap_present_bytes(start: int, end: int) -> int:
    """Resident bytes in [start, end) counted page by page from /proc/self/pagemap."""
    n = (end - start) >> PAGE_SHIFT
    entries = array("Q")
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek((start >> PAGE_SHIFT) * 8)
        entries.frombytes(fh.read(n * 8))
    return sum(1 for e in entries if e & _PAGEMAP_PRESENT) * PAGE_SIZE


def rss_of_ranges(ranges: Iterable[tuple[int, int]]) -> int:
    """Rss of exactly the given address ranges.

    Adjacent anonymous mappings with the same flags may be merged by the kernel into one VMA
    (two of our segments, or a segment and a neighbour's memory). A VMA that lies wholly inside
    our ranges contributes its smaps Rss; one that only partly overlaps (merged with foreign
    memory) is counted page by page from /proc/self/pagemap over the overlap.
    """
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    if not merged:
        return 0
    starts = [lo for lo, _ in merged]
    total = 0
    for vstart, vend, rss in _smaps_vmas():
        i = bisect.bisect_right(starts, vstart) - 1
        candidates = range(max(i, 0), len(merged))
        for j in candidates:
            lo, hi = merged[j]
            if lo >= vend:
                break
            if hi <= vstart:
                continue
            if lo <= vstart and vend <= hi:
                total += rss
            else:
                total += _pagemap_present_bytes(max(lo, vstart), min(hi, vend))
    return total


def all_arenas_rss_bytes() -> int:
    """Resident bytes of every live arena in this process."""
    ranges: list[tuple[int, int]] = []
    for arena in list(_live_arenas):
        ranges.extend(arena.ranges())
    return rss_of_ranges(ranges)
