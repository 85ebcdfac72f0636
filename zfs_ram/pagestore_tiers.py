"""The page store's second tier: access stamps, idle pages and recompression (zram's idle,
recompress and recomp_algorithm), as a part of PageStore kept in a module of its own.

PageStore inherits these methods; they keep the store's accounting exact as its other methods
do (compr_data_size, huge_pages, the second algorithm's pages and bytes) and touch only the
store's pool, tables and counters. Each public call is synchronous and bounded: one page-table
chunk (CHUNK_PAGES pages) at most, so the caller can yield between chunks.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass

from zfs_ram.codec import Codec
from zfs_ram.pagetable import (
    HUGE_BIT,
    PRIORITY_FIELD,
    PRIORITY_SHIFT,
    STAMP_FIELD,
    STAMP_MAX,
    TRIED_BIT,
    FileData,
    handle_of,
)
from zfs_ram.pool import Pool
from zfs_ram.vocabulary import PAGE_SIZE


@dataclass(frozen=True)
class AlgorithmStats:
    """The pages one compressor holds: compressed by it and kept (raw pages are no one's)."""

    pages: int
    compr_data_size: int


def _zeros(typecode: str, count: int) -> array[int]:
    return array(typecode, bytes(array(typecode).itemsize * count))


class StoreTiers:
    """The access-stamp and recompression methods of PageStore (which sets these up)."""

    pool: Pool
    codec: Codec
    recomp_codec: Codec | None
    clock: Callable[[], float]
    on_free: Callable[[], None]
    compr_bytes: int
    huge_pages: int
    recompressed_pages: int
    recompressed_bytes: int
    _epoch: float
    _freed: int
    _huge_size: int
    _touch: Callable[[array[int], int, int, int], None]
    _mark_idle: Callable[[array[int], int], int]

    def algorithm_statistics(self) -> dict[str, AlgorithmStats]:
        """Per compressor, the pages it encoded and their bytes. O(1): the pool's object count
        less the raw (huge) pages is what the store's one algorithm compressed."""
        pages = self.pool.objects - self.huge_pages - self.recompressed_pages
        compressed = self.compr_bytes - self.huge_pages * PAGE_SIZE - self.recompressed_bytes
        result = {self.codec.algorithm.name: AlgorithmStats(pages, compressed)}
        if self.recomp_codec is not None:
            result[self.recomp_codec.algorithm.name] = AlgorithmStats(
                self.recompressed_pages, self.recompressed_bytes
            )
        return result

    def _stamp(self) -> int:
        """Now, as an access stamp: whole seconds since the store began, plus 1 (0 is idle)."""
        return min(int(self.clock() - self._epoch) + 1, STAMP_MAX)

    def _touch_pages(self, data: FileData, first: int, stop: int) -> None:
        """Pages first..stop-1 were read: their objects are not idle (zram clears ZRAM_IDLE)."""
        stamp = self._stamp()
        for chunk, start, end in data.spans(first, stop):
            if chunk is not None and start < len(chunk):
                self._touch(chunk, start, min(end, len(chunk)) - start, stamp)

    def idle_cutoff(self, seconds: float | None) -> int:
        """The newest access stamp that `echo SECONDS > idle` marks idle (None: all)."""
        if seconds is None:
            return STAMP_MAX
        return max(int(self.clock() - self._epoch - seconds) + 1, 0)

    def mark_idle(self, data: FileData, cutoff: int) -> int:
        """The file's objects accessed at or before `cutoff` become idle; how many did."""
        return sum(self._mark_idle(chunk, cutoff) for chunk in data.chunks.values())

    def recompress_chunk(self, data: FileData, key: int, idle: bool, huge: bool) -> int:
        """zram's recompress for chunk `key` of a file: each page encoded by comp_algorithm
        (and not tried before) that is idle (if `idle`) and raw (if `huge`) is encoded by
        recomp_codec, and the result kept if it is smaller and not raw; the pages it did not
        shrink are marked tried. Returns the pages recompressed. The pool may refuse part of
        the new objects (mem_limit): those pages stay as they were, untried."""
        codec = self.recomp_codec
        if codec is None:
            raise ValueError("no recomp_algorithm: nothing to recompress with")
        chunk = data.chunks.get(key)
        if chunk is None:
            return 0
        skip = PRIORITY_FIELD | TRIED_BIT
        picks = [
            i
            for i, entry in enumerate(chunk)
            if entry & 1
            and not entry & skip
            and (not idle or not entry & STAMP_FIELD)
            and (not huge or entry & HUGE_BIT)
        ]
        if not picks:
            return 0
        handles = array("Q", [handle_of(chunk[i]) for i in picks])
        blob, old_sizes = self.pool.read_joined(handles)
        pages = self.codec.decode(blob, old_sizes, _zeros("Q", len(picks)))
        new_blob, new_sizes, _ = codec.encode(pages, self._huge_size)
        kept: list[int] = []  # indexes into picks
        pieces: list[bytes] = []
        position = 0
        for j, size in enumerate(new_sizes):
            if 0 < size < old_sizes[j] and size != PAGE_SIZE:
                kept.append(j)
                pieces.append(new_blob[position : position + size])
            position += size
        kept_sizes = array("H", [new_sizes[j] for j in kept])
        new_handles = self.pool.store_many(b"".join(pieces), kept_sizes) if kept else array("Q")
        landed = len(new_handles)
        untried = set(kept)  # landed now, or refused by the pool: not marked tried
        for j, i in enumerate(picks):  # what did not shrink is not tried again
            if j not in untried:
                chunk[i] |= TRIED_BIT
        if not landed:
            return 0
        secondary = 1 << PRIORITY_SHIFT
        for handle, j in zip(new_handles, kept, strict=False):
            i = picks[j]
            assert handle >> 32 == 0, "a handle past the entry's 32 bits"
            chunk[i] = handle << 1 | 1 | (chunk[i] & STAMP_FIELD) | secondary
        freed = self.pool.free_many(array("Q", [handles[j] for j in kept[:landed]]))
        self._freed += len(freed)
        added = sum(kept_sizes[:landed])
        self.compr_bytes += added - sum(freed)
        data.footprint += added - sum(freed)
        self.huge_pages -= freed.count(PAGE_SIZE)
        self.recompressed_pages += landed
        self.recompressed_bytes += added
        self.on_free()
        return landed
