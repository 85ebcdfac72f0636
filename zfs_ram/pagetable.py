"""The page table: a file's page number -> one 64-bit entry, and the loops over entries.

A file's pages live in a two-level table: page number -> 64-bit entry, kept in array('Q')
chunks of CHUNK_PAGES entries, so that a file costs 8 bytes per page it has and nothing for the
holes of a sparse file (a write at 2 TiB makes one chunk, not a 4 GiB array). FileData holds
them with the file's size; zfs_ram.pagestore does all the accounting.

Entry layout (one word per page, no Python object per page):
    0                 a hole: reads as zeros, costs nothing, does not count as used
    SAME_ENTRY (2)    a same-filled page; its word is in FileData.same_words unless it is 0
    bit 0 set         a pool object, with, from the bottom:
        bits 1-32     its handle (HANDLE_MASK: 4 G objects, 16 TiB of pages)
        bits 33-59    its access stamp, seconds since the store began plus 1; 0 is idle
                      (zram's ZRAM_IDLE and ac_time in one field: a read or a write sets it,
                      `echo all|SECONDS > idle` clears it)
        bit 60        TRIED: recompressed once and not made smaller (zram's
                      ZRAM_INCOMPRESSIBLE); not tried again until rewritten
        bits 61-62    its priority: 0 the store's comp_algorithm, 1 recomp_algorithm (zram's
                      per-slot priority; one secondary algorithm for now)
        bit 63        HUGE: a raw page of PAGE_SIZE bytes (zram's ZRAM_HUGE)
    bits 0-1 clear, not 0: written back (zram's ZRAM_WB) to a slot of the backing file
                      (zfs_ram.backing), with, from the bottom:
        bits 2-14     the stored object's size in bytes (1..PAGE_SIZE), what a read preads
        bits 15-46    its slot: the object's bytes start at byte slot * PAGE_SIZE of the file
        bits 61-62    its priority, as an object's (which algorithm decodes it)
        bit 63        HUGE, as an object's (a raw page)
                      No access stamp: a written-back page is served from the file, not
                      brought back, so it is neither busy nor idle (zram: ZRAM_WB pages are
                      not marked idle). The size is never 0, so the entry is never a hole
                      (0) or SAME_ENTRY (2), and every loop that tests `entry & 1` for an
                      object passes it by as it passes same-filled pages.
Same-filled entries and holes carry no flags, so `entry == SAME_ENTRY` stays a whole test.

The loops (place, handles_of, spread, touch, priorities_of, mark_idle) are the pure-Python twins of
zfs_ram._codec's, which the page store runs when its codec runs compiled.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from zfs_ram.vocabulary import PAGE_SIZE

CHUNK_SHIFT = 9  # 512 pages = 2 MiB of file per chunk: 4 KiB of table when full
CHUNK_PAGES = 1 << CHUNK_SHIFT
CHUNK_MASK = CHUNK_PAGES - 1
SAME_ENTRY = 2  # even and non-zero: cannot be a hole (0) or an object (odd)

HANDLE_BITS = 32
HANDLE_MASK = (1 << HANDLE_BITS) - 1
STAMP_SHIFT = 1 + HANDLE_BITS
STAMP_MAX = (1 << 27) - 1  # 4.25 years of seconds; a stamp past it stays at it
STAMP_FIELD = STAMP_MAX << STAMP_SHIFT
TRIED_BIT = 1 << 60
PRIORITY_SHIFT = 61
PRIORITY_FIELD = 3 << PRIORITY_SHIFT
HUGE_BIT = 1 << 63
BACKED_SIZE_SHIFT = 2
BACKED_SIZE_MASK = (1 << 13) - 1  # sizes up to PAGE_SIZE (4096) need 13 bits
BACKED_SLOT_SHIFT = 15
SLOT_BITS = 32
SLOT_MASK = (1 << SLOT_BITS) - 1  # 4 G slots: a 16 TiB backing file
BACKED_KEPT = PRIORITY_FIELD | HUGE_BIT  # what an object entry's write-back keeps of it


def handle_of(entry: int) -> int:
    """The pool handle of an object entry."""
    return entry >> 1 & HANDLE_MASK


def object_entry(handle: int, stamp: int, huge: bool) -> int:
    """A fresh object entry: encoded by the store's comp_algorithm, accessed at `stamp`."""
    return handle << 1 | 1 | stamp << STAMP_SHIFT | (HUGE_BIT if huge else 0)


def is_backed(entry: int) -> bool:
    """Whether an entry is a written-back page: even, and neither a hole nor same-filled."""
    return entry != 0 and not entry & 3


def backed_entry(slot: int, size: int, entry: int) -> int:
    """The entry of object entry `entry`'s page once its `size` bytes are in `slot`."""
    assert 0 < size <= PAGE_SIZE and 0 <= slot <= SLOT_MASK, (slot, size)
    return slot << BACKED_SLOT_SHIFT | size << BACKED_SIZE_SHIFT | entry & BACKED_KEPT


def slot_of(entry: int) -> int:
    """The backing-file slot of a written-back entry."""
    return entry >> BACKED_SLOT_SHIFT & SLOT_MASK


def backed_size_of(entry: int) -> int:
    """The stored bytes of a written-back entry: what its slot holds."""
    return entry >> BACKED_SIZE_SHIFT & BACKED_SIZE_MASK


def priority_of(entry: int) -> int:
    """Which algorithm encoded an object entry's page: 0 comp_algorithm, 1 recomp_algorithm."""
    return (entry & PRIORITY_FIELD) >> PRIORITY_SHIFT


def stamp_of(entry: int) -> int:
    """An object entry's access stamp; 0: idle."""
    return (entry & STAMP_FIELD) >> STAMP_SHIFT


class FileData:
    """The contents of one regular file: its logical size and its page table."""

    __slots__ = (
        "size",
        "chunks",
        "same_words",
        "stored_pages",
        "footprint",
        "stale_tail",
        "detached",
        "pending",
        "pending_page",
    )

    def __init__(self) -> None:
        self.size = 0
        self.chunks: dict[int, array[int]] = {}
        self.same_words: dict[int, int] | None = None  # page -> word, only for words != 0
        self.stored_pages = 0  # pages that are not holes
        self.footprint = 0  # bytes of pool objects, for st_blocks
        # The page holding the end of file may keep non-zero bytes past it (a shrinking
        # truncate found no room to store it zeroed): growing the file must zero them first.
        self.stale_tail = False
        # Unlinked and not open, but not yet forgotten by the kernel: see PageStore.detach.
        self.detached = False
        # The unfinished last page, kept uncompressed (see "Partial pages"), and its number
        # (-1: none). Its bytes past the end of file are zeros; its table entry is a hole.
        self.pending: bytearray | None = None
        self.pending_page = -1

    def entry(self, page: int) -> int:
        chunk = self.chunks.get(page >> CHUNK_SHIFT)
        if chunk is None:
            return 0
        index = page & CHUNK_MASK
        return chunk[index] if index < len(chunk) else 0

    def set_entry(self, page: int, value: int) -> None:
        key = page >> CHUNK_SHIFT
        index = page & CHUNK_MASK
        chunk = self.chunks.get(key)
        if chunk is None:
            if value == 0:
                return
            chunk = self.chunks[key] = array("Q")
        if index >= len(chunk):
            if value == 0:
                return
            # Grow to the page written, not to a whole chunk: a small file stays small.
            chunk.frombytes(bytes(8 * (index + 1 - len(chunk))))
        chunk[index] = value

    def entry_array(self, first: int, stop: int) -> array[int]:
        """The entries of pages first..stop-1, holes included (as 0), in one array('Q')."""
        if first >= stop:
            return array("Q")
        key = first >> CHUNK_SHIFT
        if key == (stop - 1) >> CHUNK_SHIFT:  # within one chunk: the common case
            chunk = self.chunks.get(key)
            base = key << CHUNK_SHIFT
            out = chunk[first - base : stop - base] if chunk is not None else array("Q")
            if len(out) < stop - first:
                out.frombytes(bytes(8 * (stop - first - len(out))))
            return out
        out = array("Q")
        for chunk, start, end in self.spans(first, stop):
            part = chunk[start:end] if chunk is not None else array("Q")
            out += part
            if len(part) < end - start:
                out.frombytes(bytes(8 * (end - start - len(part))))
        return out

    def spans(self, first: int, stop: int) -> Iterator[tuple[array[int] | None, int, int]]:
        """Pages first..stop-1 cut at chunk borders: (the chunk or None, start, end), start and
        end counted in the chunk, which may be shorter than end (its tail pages are holes)."""
        page = first
        while page < stop:
            key = page >> CHUNK_SHIFT
            base = key << CHUNK_SHIFT
            upto = min(stop, base + CHUNK_PAGES)
            yield self.chunks.get(key), page - base, upto - base
            page = upto

    def chunk_for(self, key: int, upto: int) -> array[int]:
        """Chunk `key`, made or grown to hold at least `upto` entries (holes)."""
        chunk = self.chunks.get(key)
        if chunk is None:
            chunk = self.chunks[key] = array("Q")
        if len(chunk) < upto:
            # Grow to the page written, not to a whole chunk: a small file stays small.
            chunk.frombytes(bytes(8 * (upto - len(chunk))))
        return chunk

    def pages(self) -> Iterator[tuple[int, int]]:
        """(page, entry) for every page that is not a hole, in no particular order."""
        for key, chunk in self.chunks.items():
            base = key << CHUNK_SHIFT
            for index, value in enumerate(chunk):
                if value:
                    yield base + index, value


# -- the table loops: the pure-Python twins of zfs_ram._codec's -----------------------------


def place(
    chunk: array[int],
    start: int,
    sizes: array[int],
    first: int,
    count: int,
    handles: array[int],
    hfirst: int,
    olds: array[int],
    ofirst: int,
    stamp: int,
) -> tuple[int, int, int, int]:
    """Entries chunk[start:start+count] become the pages sizes[first:first+count] describe: an
    object (the next handle of handles[hfirst:], accessed at `stamp`) or SAME_ENTRY (size 0).
    The replaced objects' handles go to olds[ofirst:]. Returns (holes filled, same-filled pages
    replaced, objects replaced, handles used); changes nothing (ValueError) if there are too
    few handles or one does not fit an entry."""
    for name, items, at in (
        ("chunk", chunk, start),
        ("sizes", sizes, first),
        ("olds", olds, ofirst),
    ):
        if at < 0 or count < 0 or at + count > len(items):
            raise ValueError(f"{name}: items {at}..{at}+{count} are not within it")
    if not 0 <= stamp <= STAMP_MAX:
        raise ValueError(f"place: stamp {stamp} is past {STAMP_MAX}")
    objects = sum(1 for i in range(first, first + count) if sizes[i])
    if objects > len(handles) - hfirst:
        raise ValueError("place: fewer handles than objects")
    if any(h > HANDLE_MASK for h in handles[hfirst : hfirst + objects]):
        raise ValueError("place: a handle does not fit in 32 bits")
    new_pages = old_same = old_objects = used = 0
    for i in range(count):
        size = sizes[first + i]
        if size:
            entry = object_entry(handles[hfirst + used], stamp, size == PAGE_SIZE)
            used += 1
        else:
            entry = SAME_ENTRY
        old = chunk[start + i]
        chunk[start + i] = entry
        if old & 1:
            olds[ofirst + old_objects] = handle_of(old)
            old_objects += 1
        elif old:
            old_same += 1
        else:
            new_pages += 1
    return new_pages, old_same, old_objects, used


def handles_of(entries: array[int], out: array[int]) -> int:
    """The handles of the object entries, in order, into out[:n]; returns n."""
    found = [handle_of(entry) for entry in entries if entry & 1]
    out[: len(found)] = array("Q", found)
    return len(found)


def spread(entries: array[int], object_sizes: array[int], out: array[int]) -> None:
    """out[i] = the next object's size where entries[i] is an object, else 0."""
    if len(out) != len(entries) or sum(1 for e in entries if e & 1) != len(object_sizes):
        raise ValueError("spread: the object entries and the object sizes do not match")
    objects = iter(object_sizes)
    for i, entry in enumerate(entries):
        out[i] = next(objects) if entry & 1 else 0


def touch(chunk: array[int], start: int, count: int, stamp: int) -> None:
    """The object entries of chunk[start:start+count] were accessed at `stamp`."""
    if start < 0 or count < 0 or start + count > len(chunk) or not 0 <= stamp <= STAMP_MAX:
        raise ValueError(f"touch: items {start}..{start}+{count} or stamp {stamp} do not fit")
    field = stamp << STAMP_SHIFT
    for i in range(start, start + count):
        entry = chunk[i]
        if entry & 1:
            chunk[i] = entry & ~STAMP_FIELD | field


def priorities_of(entries: array[int], out: bytearray) -> int:
    """out[i] = entry i's priority (0 for holes and same-filled pages); how many are not 0."""
    if len(out) != len(entries):
        raise ValueError(f"out holds {len(out)} bytes, not {len(entries)}")
    found = 0
    for i, entry in enumerate(entries):
        priority = priority_of(entry) if entry & 1 else 0
        out[i] = priority
        found += priority != 0
    return found


def mark_idle(chunk: array[int], cutoff: int) -> int:
    """Object entries accessed at or before `cutoff` (not idle yet) become idle; how many."""
    marked = 0
    for i, entry in enumerate(chunk):
        if entry & 1 and 0 < stamp_of(entry) <= cutoff:
            chunk[i] = entry & ~STAMP_FIELD
            marked += 1
    return marked
