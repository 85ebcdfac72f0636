"""zbud in userspace: at most two objects ("buddies") per frame, the baseline zsmalloc beat.

Like Linux's mm/zbud.c (removed in 6.15): a frame holds a "first" buddy left-justified at
offset 0 and a "last" buddy right-justified to the frame's end, sizes rounded up to 64-byte
chunks. Frames holding one buddy sit on `unbuddied[free_chunks]`; an allocation takes the first
frame of the first non-empty list with enough free chunks (first fit), else a new frame. A frame
is freed the moment both buddies are gone. zbud never moves objects, so it has no compaction:
compact_step() and can_compact() return 0. That is Mel Gorman's simple, predictable baseline.

Differences from the kernel: the zbud header is kept out of line, so all 64 chunks of a frame
are usable and a 4096-byte object gets a frame alone; the unbuddied lists have a bitmask so the
first fit is one bit trick; class_statistics() returns an empty list (zbud has no size classes).

Per-frame arrays, indexed by frame number (grown with the arena):
    first[f], last[f]   chunks used by each buddy (0 = that buddy is free)
    prev[f], next[f]    intrusive links of the unbuddied list the frame is on (-1 = none)
A live handle-table word is  frame << 14 | buddy << 13 | (size - 1) << 1 | 1  (buddy 1 = last).

Invariants (verified by check()):
  * A frame is in use iff first + last > 0; in-use frames are never on the arena's free list.
  * A frame is on unbuddied[k] iff exactly one buddy is used and k = 64 - first - last > 0;
    `mask` bit k is set iff that list is non-empty.
  * Each used buddy belongs to exactly one live handle whose size rounds up to its chunks.
"""

from __future__ import annotations

from array import array

from zfs_ram.vocabulary import PAGE_SHIFT, PAGE_SIZE

from .base import LIVE, BytesLike, Pool
from .classes import build_classes
from .errors import InvalidSizeError, PoolCorruptionError, PoolFullError
from .frames import SEGMENT_MASK, SEGMENT_SHIFT
from .stats import ClassStats

#: zbud's allocation unit: 64-byte chunks (CHUNK_SHIFT 6), so a frame has 64 of them.
CHUNK_SHIFT = 6
CHUNK_SIZE = 1 << CHUNK_SHIFT
NCHUNKS = PAGE_SIZE >> CHUNK_SHIFT

_SIZE_SHIFT = 1
_SIZE_MASK = 0xFFF
_BUDDY_BIT = 1 << 13  #: set for the last (right-justified) buddy
_FRAME_SHIFT = 14
# The byte offset of a frame in its segment is written `<< 12` below: a literal costs no lookup.
assert PAGE_SHIFT == 12

#: Same raw-storage threshold as zsmalloc, so both pools see the same compressed objects and
#: their figures compare like for like (zbud itself has no huge class).
_HUGE_SIZE = build_classes()[2]


class ZbudPool(Pool):
    """The zbud allocator (see the module comment)."""

    kind = "zbud"

    def __init__(self, mem_limit_pages: int = 0) -> None:
        super().__init__(mem_limit_pages)
        self._first = array("B")
        self._last = array("B")
        self._prev = array("i")
        self._next = array("i")
        self._heads = [-1] * (NCHUNKS + 1)
        self._mask = 0

    @property
    def huge_class_size(self) -> int:
        return _HUGE_SIZE

    # -- unbuddied lists ----------------------------------------------------------------------

    def _link(self, f: int, k: int) -> None:
        x = self._heads[k]
        self._prev[f] = -1
        self._next[f] = x
        if x >= 0:
            self._prev[x] = f
        else:
            self._mask |= 1 << k
        self._heads[k] = f

    def _unlink(self, f: int, k: int) -> None:
        p = self._prev[f]
        x = self._next[f]
        if p >= 0:
            self._next[p] = x
        else:
            self._heads[k] = x
            if x < 0:
                self._mask &= ~(1 << k)
        if x >= 0:
            self._prev[x] = p
        self._prev[f] = self._next[f] = -1

    # -- alloc / free -------------------------------------------------------------------------

    def _alloc(self, size: int) -> int:
        if not 0 < size <= PAGE_SIZE:
            raise InvalidSizeError(f"object size {size} outside 1..{PAGE_SIZE}")
        self._check_handle_room()
        chunks = (size + CHUNK_SIZE - 1) >> CHUNK_SHIFT
        m = self._mask >> chunks << chunks
        if m:
            k = (m & -m).bit_length() - 1
            f = self._heads[k]
            self._unlink(f, k)
            if self._first[f] == 0:
                self._first[f] = chunks
                buddy = 0
            else:
                self._last[f] = chunks
                buddy = _BUDDY_BIT
        else:
            if self.mem_limit_pages and self.pages_used >= self.mem_limit_pages:
                raise PoolFullError(f"mem_limit of {self.mem_limit_pages} pages reached")
            f = self.arena.alloc()
            while len(self._first) <= f:
                self._first.append(0)
                self._last.append(0)
                self._prev.append(-1)
                self._next.append(-1)
            self._first[f] = chunks
            buddy = 0
            if chunks < NCHUNKS:
                self._link(f, NCHUNKS - chunks)
            self.pages_used += 1
            if self.pages_used > self.max_pages_used:
                self.max_pages_used = self.pages_used
        if size >= _HUGE_SIZE:
            self.huge_objects += 1
        self.bytes_stored += size
        return self._take_handle(f << _FRAME_SHIFT | buddy | (size - 1) << _SIZE_SHIFT | LIVE)

    def malloc(self, size: int) -> int:
        return self._alloc(size)

    def store(self, data: BytesLike) -> int:
        n = len(data)
        h = self._alloc(n)
        w = self.hloc[h]
        f = w >> _FRAME_SHIFT
        pos = (f & SEGMENT_MASK) << 12
        if w & _BUDDY_BIT:
            pos += PAGE_SIZE - (((n + CHUNK_SIZE - 1) >> CHUNK_SHIFT) << CHUNK_SHIFT)
        self.arena.segments[f >> SEGMENT_SHIFT][pos : pos + n] = data
        return h

    def free(self, h: int) -> int:
        w = self._word(h)
        f = w >> _FRAME_SHIFT
        first, last = self._first[f], self._last[f]
        if first and last:  # buddied: becomes unbuddied
            if w & _BUDDY_BIT:
                self._last[f] = 0
                self._link(f, NCHUNKS - first)
            else:
                self._first[f] = 0
                self._link(f, NCHUNKS - last)
        else:  # the only buddy: the frame goes back to the OS
            if first + last < NCHUNKS:
                self._unlink(f, NCHUNKS - first - last)
            self._first[f] = self._last[f] = 0
            self.arena.free(f)
            self.pages_used -= 1
        size = (w >> _SIZE_SHIFT & _SIZE_MASK) + 1
        if size >= _HUGE_SIZE:
            self.huge_objects -= 1
        self._release_handle(h)
        self.bytes_stored -= size
        return size

    # -- access -------------------------------------------------------------------------------

    def _pos(self, w: int, n: int) -> int:
        """Byte position of the object in its segment; n is its size."""
        pos = (w >> _FRAME_SHIFT & SEGMENT_MASK) << 12
        if w & _BUDDY_BIT:
            pos += PAGE_SIZE - (((n + CHUNK_SIZE - 1) >> CHUNK_SHIFT) << CHUNK_SHIFT)
        return pos

    def read(self, h: int) -> bytes:
        w = self._word(h)
        n = (w >> _SIZE_SHIFT & _SIZE_MASK) + 1
        pos = self._pos(w, n)
        return self.arena.segments[w >> (_FRAME_SHIFT + SEGMENT_SHIFT)][pos : pos + n]

    def write(self, h: int, data: BytesLike) -> None:
        w = self._word(h)
        n = len(data)
        size = (w >> _SIZE_SHIFT & _SIZE_MASK) + 1
        if n > size:
            raise InvalidSizeError(f"write of {n} bytes into a {size}-byte object")
        pos = self._pos(w, size)
        self.arena.segments[w >> (_FRAME_SHIFT + SEGMENT_SHIFT)][pos : pos + n] = data

    def object_size(self, h: int) -> int:
        return (self._word(h) >> _SIZE_SHIFT & _SIZE_MASK) + 1

    # -- statistics and checks ----------------------------------------------------------------

    def class_statistics(self) -> list[ClassStats]:
        """Empty: zbud has no size classes (see statistics() for the pool-wide figures)."""
        return []

    def _zspage_count(self) -> int:
        return self.pages_used

    def _structures(self) -> list[object]:
        return [self._first, self._last, self._prev, self._next, self._heads]

    def check(self) -> None:
        self._check_common()
        nf = self.arena.frames_created
        first, last = self._first, self._last
        if len(first) < nf or not len(first) == len(last) == len(self._prev) == len(self._next):
            raise PoolCorruptionError("per-frame arrays have the wrong length")
        free = set(self.arena.unused_frames())
        used = 0
        expect_listed: set[int] = set()
        for f in range(len(first)):
            a, b = first[f], last[f]
            if a + b > NCHUNKS:
                raise PoolCorruptionError(f"frame {f}: buddies overlap ({a}+{b} chunks)")
            if a or b:
                if f in free or f >= nf:
                    raise PoolCorruptionError(f"frame {f} in use but free or never created")
                used += 1
                if (a == 0) != (b == 0) and a + b < NCHUNKS:
                    expect_listed.add(f)
        if used != self.pages_used:
            raise PoolCorruptionError(f"pages_used {self.pages_used} != {used} frames in use")
        listed: set[int] = set()
        for k in range(NCHUNKS + 1):
            f = self._heads[k]
            if (f >= 0) != bool(self._mask >> k & 1):
                raise PoolCorruptionError(f"unbuddied mask bit {k} wrong")
            prev = -1
            while f >= 0:
                if f in listed or f >= len(first):
                    raise PoolCorruptionError(f"unbuddied list {k} broken at frame {f}")
                if self._prev[f] != prev or NCHUNKS - first[f] - last[f] != k:
                    raise PoolCorruptionError(f"frame {f} misplaced on unbuddied list {k}")
                listed.add(f)
                prev, f = f, self._next[f]
        if listed != expect_listed:
            raise PoolCorruptionError("unbuddied lists do not hold exactly the one-buddy frames")
        owners: set[tuple[int, int]] = set()
        total = huge = 0
        for h in range(1, len(self.hloc)):
            w = self.hloc[h]
            if not w & LIVE:
                continue
            f = w >> _FRAME_SHIFT
            size = (w >> _SIZE_SHIFT & _SIZE_MASK) + 1
            chunks = (size + CHUNK_SIZE - 1) >> CHUNK_SHIFT
            key = (f, w & _BUDDY_BIT)
            have = (last if w & _BUDDY_BIT else first)[f] if f < len(first) else 0
            if key in owners or have != chunks:
                raise PoolCorruptionError(f"handle {h} does not match frame {f}'s buddy")
            owners.add(key)
            total += size
            huge += size >= _HUGE_SIZE
        buddies = sum(1 for f in range(len(first)) for x in (first[f], last[f]) if x)
        if buddies != len(owners):
            raise PoolCorruptionError(f"{buddies} used buddies but {len(owners)} handles")
        if total != self.bytes_stored or huge != self.huge_objects:
            raise PoolCorruptionError("bytes_stored or huge_objects counter wrong")
