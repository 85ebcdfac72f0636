"""Files as page tables over the pool: write, read, truncate and free, with zram's accounting.

A file's pages live in its page table (zfs_ram.pagetable: FileData, one 64-bit entry per page
in array('Q') chunks, with the layout of an entry: handle, access stamp, priority, flags).

Accounting follows zram's mm_stat: orig_data_size counts every page held (same-filled and
huge included), compr_data_size the bytes of pool objects (a raw page counts PAGE_SIZE).
Every change goes through this module, so the counters are exact. The pages of detached files
(unlinked, not yet forgotten: see PageStore.detach) are held but do not count against the size
limit; detached_pages follows every write, truncate and release of such a file.

Batches. A write of several pages is encoded in one codec call (zfs_ram.codec: the objects back
to back, a size and a word per page), its objects stored with one Pool.store_many, and placed in
the page table chunk by chunk by place(), whose old objects go back with one Pool.free_many; the
counters follow from the arrays' sums and counts, not from a Python step per page. A read of
several pages gathers its objects with one Pool.read_joined and decodes them into one bytes
object. The table loops (place, handles_of, spread) have a C twin in zfs_ram._codec, run when
the codec runs compiled. One aligned page, the commonest small write, keeps a path of its own.

Frees are announced, not polled: every public call (write, truncate, release) that freed at
least one pool object (an overwrite frees the old one) calls on_free() once, as it returns or
raises, so the compactor can be woken.

Written-back pages (zfs_ram.backing: their bytes in a slot of the backing file, not in the pool)
are read from the file, and an overwrite, truncate or release frees their slots: the hooks that
say so cost nothing while no page is written back (backed_pages is 0).

Partial pages. A write that ends inside the file's last page (tar's 10 KiB records end inside
every other page) leaves that page pending: kept uncompressed in FileData.pending, its table
entry a hole, its bytes past the end of file zeros, until a write fills it (then it is
compressed once, not once per write), the file grows past it, or flush() stores it (the FUSE
layer calls it on release and fsync). At most pending_limit_pages files hold one; the oldest
is stored to make room for another. A pending page counts as zram would count the page once
the page cache wrote it back, as far as that is known before compressing it: as a page held
(stored_pages, orig_data_size, the size limit's used_pages, detached_pages for a detached
file), and in same_pages if it is same-filled (it will need no object); not in
compr_data_size, footprint or huge_pages, as no pool object holds it yet; pending_pages says
how many there are. A pending page made from a stored one frees that object; storing it never
needs the size limit's room.

Correctness rules. A write that fails leaves the file as it was for the page that failed; pages
before it are written (the caller reports a short write). A new object is stored before the old
one is freed, as zram does, so a failed store never loses the old page; when the pool refuses
part of a batch, the pages before the refused object land and free their old objects, and the
rest is tried again for as long as that frees something. A refused truncate
changes nothing, and a shrinking truncate is never refused: it frees what lies past the new end
and only then needs room, to store the cut page with its tail zeroed. If even that does not fit,
the old page stays, tail and all (FileData.stale_tail): the bytes past the end of file cannot be
read, and the first call that grows the file zeroes them before it changes anything else.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from zfs_ram.backing import StoreBacking
from zfs_ram.codec import DEFAULT_CODEC, ZERO_PAGE, Codec, fill_page, same_filled_word
from zfs_ram.pagetable import (
    CHUNK_MASK,
    CHUNK_PAGES,
    CHUNK_SHIFT,
    PRIORITY_FIELD,
    SAME_ENTRY,
    STAMP_FIELD,
    STAMP_SHIFT,
    FileData,
    handle_of,
    handles_of,
    mark_idle,
    object_entry,
    place,
    priorities_of,
    spread,
    stamp_of,
    touch,
)
from zfs_ram.pool import Pool, PoolFullError
from zfs_ram.vocabulary import PAGE_SIZE

# Pending pages the whole store holds at most (256 KiB uncompressed): one per file being
# appended to, and many more files than that are seldom written at once.
PENDING_LIMIT_PAGES = 64
# The largest file: the kernel's MAX_LFS_FILESIZE, as tmpfs.
MAX_FILE_SIZE = (1 << 63) - 1


class NoSpaceError(Exception):
    """A write stopped because a limit was reached; `written` bytes landed before it."""

    def __init__(self, written: int, physical: bool) -> None:
        kind = "mem_limit" if physical else "size"
        super().__init__(f"no space ({kind} reached) after {written} bytes")
        self.written = written
        self.physical = physical


@dataclass(frozen=True)
class StoreStats:
    """zram's mm_stat counters that belong to the data, not to the allocator."""

    orig_data_size: int
    compr_data_size: int
    same_pages: int
    huge_pages: int
    huge_pages_since: int
    stored_pages: int
    detached_pages: int
    size_limit_pages: int
    pending_pages: int


class StoreBusyError(Exception):
    """The store holds data, so its compressor may not change (zram: EBUSY once initialised)."""


def _nothing() -> None:
    """The default on_free: nobody to tell."""


def _zeros(typecode: str, count: int) -> array[int]:
    return array(typecode, bytes(array(typecode).itemsize * count))


class PageStore(StoreBacking):
    """All files' pages over one pool; enforces the logical limit (tmpfs size=, in pages).

    `codec` encodes and decodes the pages (default: lz4 on the engine chosen at import); the
    page-table loops run on the same engine. `recomp_codec` (zram's recomp_algorithm) is the
    one recompress_chunk() tries on idle or huge pages; `clock` gives the seconds that access
    stamps count (time.monotonic; tests pass their own)."""

    def __init__(
        self,
        pool: Pool,
        size_limit_pages: int = 0,
        on_free: Callable[[], None] = _nothing,
        codec: Codec = DEFAULT_CODEC,
        pending_limit_pages: int = PENDING_LIMIT_PAGES,
        recomp_codec: Codec | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.size_limit_pages = size_limit_pages  # tmpfs's size=; 0 = unlimited
        self.on_free = on_free  # called once after a public call that freed pool objects
        self.codec = codec
        compiled = codec.compiled
        self._place = place if compiled is None else compiled.place
        self._handles_of = handles_of if compiled is None else compiled.handles_of
        self._spread = spread if compiled is None else compiled.spread
        self._touch = touch if compiled is None else compiled.touch
        self._priorities_of = priorities_of if compiled is None else compiled.priorities_of
        self._mark_idle = mark_idle if compiled is None else compiled.mark_idle
        if recomp_codec is not None and recomp_codec.engine != codec.engine:
            raise ValueError(f"{recomp_codec!r} does not run on {codec!r}'s engine")
        self.recomp_codec = recomp_codec
        self.clock = clock
        self._epoch = clock()
        # The pages recomp_codec encoded (priority 1) and their bytes: the second algorithm's
        # share of compr_data_size. While 0, no read or free looks at priorities.
        self.recompressed_pages = 0
        self.recompressed_bytes = 0
        self._huge_size = pool.huge_class_size
        self.stored_pages = 0
        self.compr_bytes = 0
        self._same_words = 0  # same-filled pages in the tables (see same_pages)
        self.huge_pages = 0
        self.huge_pages_since = 0
        self._freed = 0  # pool objects freed so far: a public call that moves it calls on_free
        # Pages of files nobody can reach by name or handle any more, kept only until the
        # kernel forgets the inode (see detach); they do not count against size_limit_pages.
        self.detached_pages = 0
        # The files with a pending page, oldest first (see "Partial pages"); at most
        # pending_limit_pages of them (0: every page is compressed as it is written).
        self.pending_limit_pages = pending_limit_pages
        self._pending: dict[FileData, None] = {}
        self._init_backing()  # none until attach_backing (zfs_ram.backing)

    # -- statistics -----------------------------------------------------------------------

    def statistics(self) -> StoreStats:
        return StoreStats(
            orig_data_size=self.stored_pages * PAGE_SIZE,
            compr_data_size=self.compr_bytes,
            same_pages=self.same_pages,
            huge_pages=self.huge_pages,
            huge_pages_since=self.huge_pages_since,
            stored_pages=self.stored_pages,
            detached_pages=self.detached_pages,
            size_limit_pages=self.size_limit_pages,
            pending_pages=len(self._pending),
        )

    def change_codec(self, codec: Codec) -> None:
        """Encode with `codec` from now on. Refused (StoreBusyError, nothing changed) once any
        page is held: the pages stored name no algorithm, the store's is theirs."""
        if codec.engine != self.codec.engine:
            raise ValueError(f"{codec!r} does not run on the store's engine")
        if self.recomp_codec is not None and self.recomp_codec.algorithm == codec.algorithm:
            raise ValueError(f"{codec.algorithm.name} is the recomp_algorithm already")
        if self.stored_pages:
            raise StoreBusyError(
                f"comp_algorithm cannot change while data is stored ({self.stored_pages} pages)"
            )
        self.codec = codec

    @property
    def same_pages(self) -> int:
        """zram's same_pages: the same-filled pages held, pending ones included (they will
        need no object either: counted as they will be stored, so that a file's last page
        counts the same before and after it is flushed)."""
        same = self._same_words
        for data in self._pending:
            assert data.pending is not None
            same += same_filled_word(data.pending) is not None
        return same

    @property
    def used_pages(self) -> int:
        """Pages that count against the logical limit (tmpfs size=) and in statfs."""
        return self.stored_pages - self.detached_pages

    def detach(self, data: FileData) -> None:
        """The file lost its last name and handle: its pages stop counting as used.

        They are not freed yet: a path walk that ended before the unlink may still open the
        inode (the kernel holds it until it sends forget), and must find the data intact.
        Detaching a detached file does nothing; release() frees a detached file's pages too."""
        if not data.detached:
            data.detached = True
            self.detached_pages += data.stored_pages

    def reattach(self, data: FileData) -> None:
        """A detached file was opened after all: its pages count again (nothing if attached)."""
        if data.detached:
            data.detached = False
            self.detached_pages -= data.stored_pages

    # -- reading pages ----------------------------------------------------------------------

    def _page(self, data: FileData, page: int) -> bytes:
        if page == data.pending_page:
            return bytes(data.pending)  # type: ignore[arg-type]  # set with pending_page
        value = data.entry(page)
        if value & 1:
            stored = self.pool.read(handle_of(value))
            stamp = self._stamp()
            if stamp_of(value) != stamp:  # accessed: not idle any more
                data.set_entry(page, value & ~STAMP_FIELD | stamp << STAMP_SHIFT)
            if value & PRIORITY_FIELD:
                assert self.recomp_codec is not None, "a recompressed page needs its codec"
                return self.recomp_codec.decode_object(stored)
            return self.codec.decode_object(stored)
        if value == SAME_ENTRY:
            words = data.same_words
            return fill_page(words.get(page, 0) if words else 0)
        return self._backed_page(value) if value else ZERO_PAGE

    def _read_pages(self, data: FileData, first: int, stop: int, skip: int, length: int) -> bytes:
        """`length` bytes from byte `skip` of page `first` (within pages first..stop-1): the
        objects gathered in one pool call, decoded in one codec call into one buffer."""
        pending = data.pending_page
        if first <= pending < stop:  # the file's last page, so the read's last page too
            head = pending * PAGE_SIZE - (first * PAGE_SIZE + skip)  # bytes before it
            start = max(-head, 0)
            tail = bytes(data.pending[start : start + length - max(head, 0)])  # type: ignore[index]
            if head <= 0:
                return tail
            return self._read_pages(data, first, pending, skip, head) + tail
        entries = data.entry_array(first, stop)
        count = len(entries)
        handles = _zeros("Q", count)
        del handles[self._handles_of(entries, handles) :]
        if self.backed_pages and self._any_backed(entries, len(handles)):
            return self._read_mixed(data, first, entries, skip, length)
        blob, object_sizes = self.pool.read_joined(handles)
        if len(handles) == count:  # no holes, no same-filled pages: the common case
            sizes = object_sizes
        else:
            sizes = _zeros("H", count)
            self._spread(entries, object_sizes, sizes)
        words = _zeros("Q", count)
        same_words = data.same_words
        if same_words and entries.count(SAME_ENTRY):
            for i, entry in enumerate(entries):
                if entry == SAME_ENTRY:
                    words[i] = same_words.get(first + i, 0)
        priorities = None
        if self.recompressed_pages:  # some page may be the second algorithm's
            priorities = bytearray(count)
            if not self._priorities_of(entries, priorities):
                priorities = None
        result = self.codec.decode(
            blob, sizes, words, skip, length, secondary=self.recomp_codec, priorities=priorities
        )
        self._touch_pages(data, first, stop)
        return result

    # -- storing pages ----------------------------------------------------------------------

    def _put(self, data: FileData, page: int, content: bytes | bytearray | memoryview) -> None:
        """Make `page` hold `content` (a full page). Raises NoSpaceError(0, ...) and changes
        nothing if a limit stops it. One page has a path of its own: a batch's arrays would
        cost more than its encoding (4 KiB random writes, small files, partial pages)."""
        if page == data.pending_page:  # the pending page is stored (or overwritten) at last
            pending = data.pending
            assert pending is not None
            self._unpend(data)
            try:
                self._put(data, page, content)
            except NoSpaceError:
                self._count_pending(data, page, pending)  # as it was
                raise
            return
        encoded = self.codec.encode_page(content, self._huge_size)
        old = data.entry(page)
        if not old and self.size_limit_pages and self.used_pages >= self.size_limit_pages:
            raise NoSpaceError(0, physical=False)
        if encoded.__class__ is int:
            new = SAME_ENTRY
        else:
            try:
                handle = self._store_object(encoded)  # type: ignore[arg-type]  # not an int
            except PoolFullError:
                raise NoSpaceError(0, physical=True) from None
            if self.auto_writeback:  # making room may have written this very page back
                old = data.entry(page)
            huge = len(encoded) == PAGE_SIZE  # type: ignore[arg-type]  # not an int
            new = object_entry(handle, self._stamp(), huge)
        if old:
            self._drop(data, page, old)
        data.set_entry(page, new)
        data.stored_pages += 1
        self.stored_pages += 1
        if data.detached:
            self.detached_pages += 1
        if new == SAME_ENTRY:
            self._same_words += 1
            if encoded:
                if data.same_words is None:
                    data.same_words = {}
                data.same_words[page] = encoded  # type: ignore[assignment]  # an int here
        else:
            size = len(encoded)  # type: ignore[arg-type]  # not an int
            self.compr_bytes += size
            data.footprint += size
            if size == PAGE_SIZE:
                self.huge_pages += 1
                self.huge_pages_since += 1

    def _drop(self, data: FileData, page: int, value: int) -> None:
        """Forget what entry `value` of `page` holds (the table entry is left to the caller)."""
        if value & 1:
            size = self.pool.free(handle_of(value))
            self._freed += 1
            if value & PRIORITY_FIELD:
                self.recompressed_pages -= 1
                self.recompressed_bytes -= size
            self.compr_bytes -= size
            data.footprint -= size
            if size == PAGE_SIZE:
                self.huge_pages -= 1
        elif value == SAME_ENTRY:
            self._same_words -= 1
            if data.same_words:
                data.same_words.pop(page, None)
        else:
            self._free_backed((value,))
        data.stored_pages -= 1
        self.stored_pages -= 1
        if data.detached:
            self.detached_pages -= 1

    def _room_for(self, data: FileData, first: int, count: int) -> int:
        """How many of pages first.. (at most count) the size limit lets land: a page that is
        a hole now is refused once used_pages has reached the limit."""
        limit = self.size_limit_pages
        if not limit:
            return count
        room = limit - self.used_pages
        entries = data.entry_array(first, first + count)
        holes = entries.count(0)
        if holes <= room or (data.detached and room > 0):  # a detached file's pages don't count
            return count
        if room <= 0:
            return entries.index(0) if holes else count
        for i, entry in enumerate(entries):  # stop at the hole that would pass the limit
            if not entry:
                if room == 0:
                    return i
                room -= 1
        return count

    def _store_batch(
        self, data: FileData, first: int, blob: bytes, sizes: array[int], words: array[int]
    ) -> tuple[int, bool]:
        """Make pages first.. hold a batch from the codec, in order, as far as the limits let
        it: returns (pages landed, whether mem_limit stopped it). Each page's new object is
        stored before its old one is freed; the pages past the first one that did not land are
        as they were. When the pool refuses an object, the pages before it land, their old
        objects are freed, and the rest is tried again while that frees something."""
        count = self._room_for(data, first, len(sizes))
        done = 0
        position = 0  # in blob, where page `done`'s object starts
        while done < count:
            if done == 0 and count == len(sizes):
                objects = array("H", filter(None, sizes))
            else:
                objects = array("H", filter(None, sizes[done:count]))
            stored_bytes = sum(objects)
            handles = (
                self.pool.store_many(memoryview(blob)[position : position + stored_bytes], objects)
                if objects
                else array("Q")
            )
            landed = count
            if len(handles) < len(objects):  # the pool is full: land the pages before it
                landed = done
                left = len(handles)
                while landed < count and (left or not sizes[landed]):
                    left -= sizes[landed] != 0
                    landed += 1
                stored_bytes = sum(objects[: len(handles)])
            freed = self._commit(data, first + done, sizes, words, done, landed - done, handles)
            self.compr_bytes += stored_bytes
            data.footprint += stored_bytes
            position += stored_bytes
            done = landed
            if done < count and not freed and not self._make_room():
                return done, True
        return done, False

    def _commit(
        self,
        data: FileData,
        page: int,
        sizes: array[int],
        words: array[int],
        first: int,
        count: int,
        handles: array[int],
    ) -> int:
        """Pages page..page+count-1 take the entries of sizes[first:first+count] (their
        objects stored already, as `handles`); the objects they held are freed, and every
        counter but the new objects' bytes (the caller's) follows. Returns objects freed."""
        olds = _zeros("Q", count)
        new_pages = old_same = old_objects = used = 0
        done = 0
        stamp = self._stamp()
        # The entries replaced, for the second algorithm's counters (only while it has pages).
        replaced = data.entry_array(page, page + count) if self.recompressed_pages else None
        backed = self._backed_in(data, page, count)  # place() counts them as same-filled
        while done < count:
            key = (page + done) >> CHUNK_SHIFT
            start = (page + done) & CHUNK_MASK
            part = min(count - done, CHUNK_PAGES - start)
            chunk = data.chunk_for(key, start + part)
            n, s, o, u = self._place(
                chunk, start, sizes, first + done, part, handles, used, olds, old_objects, stamp
            )
            new_pages += n
            old_same += s
            old_objects += o
            used += u
            done += part
        old_same -= self._free_backed(backed)
        placed = sizes[first : first + count]
        same_new = count - used
        same_words = data.same_words
        if same_words and old_same:  # forget the words of same-filled pages replaced
            for number in range(page, page + count):
                same_words.pop(number, None)
        if same_new and words[first : first + count].count(0) != count:
            if same_words is None:
                same_words = data.same_words = {}
            for i in range(count):
                word = words[first + i]
                if word and not placed[i]:
                    same_words[page + i] = word
        data.stored_pages += new_pages
        self.stored_pages += new_pages
        if data.detached:
            self.detached_pages += new_pages
        self._same_words += same_new - old_same
        huge = placed.count(PAGE_SIZE)
        self.huge_pages += huge
        self.huge_pages_since += huge
        if old_objects:
            del olds[old_objects:]
            self._free_objects(data, olds, replaced)
        return old_objects

    def _free_objects(
        self, data: FileData, handles: array[int], entries: array[int] | None
    ) -> None:
        """Free pool objects the file held (their entries changed by the caller). `entries`
        holds the old entries, the objects' in the same order among others, while the second
        algorithm has pages: those it encoded leave its counters."""
        freed = self.pool.free_many(handles)
        self._freed += len(freed)
        size = sum(freed)
        self.compr_bytes -= size
        data.footprint -= size
        self.huge_pages -= freed.count(PAGE_SIZE)
        if entries is not None and self.recompressed_pages:
            objects = [entry for entry in entries if entry & 1]
            for entry, freed_size in zip(objects, freed, strict=True):
                if entry & PRIORITY_FIELD:
                    self.recompressed_pages -= 1
                    self.recompressed_bytes -= freed_size

    # -- files ------------------------------------------------------------------------------

    def read(self, data: FileData, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`; short at end of file, empty past it."""
        end = min(offset + length, data.size)
        if offset >= end:
            return b""
        first = offset // PAGE_SIZE
        last = (end - 1) // PAGE_SIZE
        start = offset - first * PAGE_SIZE
        if first == last:
            return self._page(data, first)[start : start + end - offset]
        return self._read_pages(data, first, last + 1, start, end - offset)

    def write(self, data: FileData, offset: int, buf: bytes) -> int:
        """Write buf at offset and grow the file; returns len(buf).

        Raises NoSpaceError with the bytes that landed when a limit stops it part-way; the pages
        it reports as not written are as they were.
        """
        freed = self._freed
        try:
            return self._write(data, offset, buf)
        finally:
            if self._freed != freed:  # overwritten pages freed their old objects
                self.on_free()

    def _write(self, data: FileData, offset: int, buf: bytes) -> int:
        if offset + len(buf) > MAX_FILE_SIZE:
            raise OverflowError("file too large")
        if data.stale_tail and offset + len(buf) > data.size:
            self._zero_tail(data)  # a NoSpaceError here says that 0 bytes landed
        if data.pending is not None and buf:
            self._settle_pending(data, offset, offset + len(buf))  # NoSpaceError: 0 landed
        if len(buf) == PAGE_SIZE and not offset % PAGE_SIZE:
            # One whole page, the commonest small write: no slicing, no batch. A NoSpaceError
            # from _put already says that 0 bytes landed.
            self._put(data, offset // PAGE_SIZE, buf)
            if offset + PAGE_SIZE > data.size:
                data.size = offset + PAGE_SIZE
            return PAGE_SIZE
        position = offset
        end = offset + len(buf)
        try:
            if offset % PAGE_SIZE:  # a partial first page
                position = self._write_partial(data, offset, buf, offset, end)
            # Whole pages: encoded in one batch, stored with one pool call, placed per chunk.
            whole = (end - position) // PAGE_SIZE
            if whole:
                base = position - offset
                batch = self.codec.encode(
                    memoryview(buf)[base : base + whole * PAGE_SIZE], self._huge_size
                )
                landed, physical = self._store_batch(data, position // PAGE_SIZE, *batch)
                position += landed * PAGE_SIZE
                if landed and position > data.size:
                    data.size = position
                if landed < whole:
                    raise NoSpaceError(0, physical)
            if position < end:  # a partial last page
                position = self._write_partial(data, offset, buf, position, end)
        except NoSpaceError as error:
            raise NoSpaceError(position - offset, error.physical) from None
        return len(buf)

    def _write_partial(
        self, data: FileData, offset: int, buf: bytes, position: int, end: int
    ) -> int:
        """Read-modify-write the page holding `position`; returns where the write goes on.
        A page the write leaves unfinished at the end of file is kept pending instead."""
        page, start = divmod(position, PAGE_SIZE)
        page_start = page * PAGE_SIZE
        stop = min(end - page_start, PAGE_SIZE)
        piece = buf[position - offset : position - offset + stop - start]
        # A page at or past the end of file reads as zeros.
        old = self._page(data, page) if page_start < data.size else ZERO_PAGE
        content = bytearray(old)
        content[start:stop] = piece
        size = max(data.size, page_start + stop)
        if stop < PAGE_SIZE and (size - 1) // PAGE_SIZE == page and self._may_pend(data):
            # Zero what lies past the end of file: a stale tail, if the page had one, is gone.
            content[size - page_start :] = bytes(PAGE_SIZE - (size - page_start))
            self._pend(data, page, content)  # NoSpaceError: nothing changed
        else:
            self._put(data, page, content)
        data.size = size
        return page_start + stop

    # -- partial pages ----------------------------------------------------------------------

    def _may_pend(self, data: FileData) -> bool:
        """Whether `data` may keep a pending page: it has one, or there is room for one (the
        oldest other one is stored to make it, if the pool has room for that)."""
        if data.pending is not None:
            return True
        if not self.pending_limit_pages:
            return False
        if len(self._pending) >= self.pending_limit_pages:
            try:
                self._flush_pending(next(iter(self._pending)))
            except NoSpaceError:
                return False  # the page is stored as it is written, or the write refused
        return True

    def _pend(self, data: FileData, page: int, content: bytearray) -> None:
        """Make `page` (the file's last) the pending page with `content`, its stored object
        freed if it had one. Raises NoSpaceError(0, physical=False), changing nothing, if the
        page is new and the size limit is reached."""
        if page == data.pending_page:
            data.pending = content
            del self._pending[data]  # the most recently written, last
            self._pending[data] = None
            return
        assert data.pending is None, "a file has at most one pending page"
        old = data.entry(page)
        if not old and self.size_limit_pages and self.used_pages >= self.size_limit_pages:
            raise NoSpaceError(0, physical=False)
        if old:
            self._drop(data, page, old)
            data.set_entry(page, 0)
        self._count_pending(data, page, content)
        data.stale_tail = False  # the tail is zeroed in content: the page is the last one

    def _count_pending(self, data: FileData, page: int, content: bytearray) -> None:
        """Hold `content` as the pending `page`, counted as a stored page."""
        data.pending = content
        data.pending_page = page
        self._pending[data] = None
        data.stored_pages += 1
        self.stored_pages += 1
        if data.detached:
            self.detached_pages += 1

    def _unpend(self, data: FileData) -> None:
        """Forget the pending page, counts and all (its content is the caller's)."""
        del self._pending[data]
        data.pending = None
        data.pending_page = -1
        data.stored_pages -= 1
        self.stored_pages -= 1
        if data.detached:
            self.detached_pages -= 1

    def _flush_pending(self, data: FileData) -> None:
        """Store the pending page in the pool. Raises NoSpaceError(0, physical=True) if the
        pool has no room: then it stays pending."""
        assert data.pending is not None
        self._put(data, data.pending_page, data.pending)

    def _settle_pending(self, data: FileData, offset: int, end: int) -> None:
        """Before a write of offset..end: store the pending page unless the write leaves it the
        file's last page, or merges into it (it starts or ends inside it)."""
        pending = data.pending_page
        first = offset // PAGE_SIZE
        last = (end - 1) // PAGE_SIZE
        if last < pending or (first == pending == last):
            return
        if first == pending and offset % PAGE_SIZE:  # starts inside: merged, then stored
            return
        if last == pending and end % PAGE_SIZE:  # ends inside: merged, still pending
            return
        self._flush_pending(data)  # it is overwritten whole, or no longer the last page

    def flush(self, data: FileData) -> None:
        """Store the file's pending page, if it has one: on close, fsync and flush, so that an
        idle file holds no page uncompressed. Raises NoSpaceError(0, physical=True) if the pool
        has no room; the page then stays pending (and readable), and a later call retries."""
        if data.pending is None:
            return
        freed = self._freed
        try:
            self._flush_pending(data)  # frees the page's old object, if it had one
        finally:
            if self._freed != freed:
                self.on_free()

    def truncate(self, data: FileData, size: int) -> None:
        """Set the file's size; pages past it are freed and the tail of a cut page zeroed.

        Shrinking is never refused (see the module comment); growing a file whose last page
        has a stale tail may be, with NoSpaceError(0, physical=True), and then changes nothing.
        """
        freed = self._freed
        try:
            self._truncate(data, size)
        finally:
            if self._freed != freed:
                self.on_free()

    def _truncate(self, data: FileData, size: int) -> None:
        if size > MAX_FILE_SIZE:
            raise OverflowError("file too large")
        pending = data.pending
        if pending is not None and size != data.size:
            cut = size - data.pending_page * PAGE_SIZE
            if cut <= 0:  # cut off whole
                self._unpend(data)
            elif cut <= PAGE_SIZE:  # still the last page: zeroed past the new end, in place
                pending[cut:] = bytes(PAGE_SIZE - cut)
            else:  # no longer the last page
                self._flush_pending(data)  # NoSpaceError: refused, nothing changed
        if size > data.size:
            if data.stale_tail:
                self._zero_tail(data)
        elif size < data.size:
            page, cut = divmod(size, PAGE_SIZE)
            self._free_from(data, page + 1 if cut else page)
            # The cut page is stored only after the pages past it are freed: they make room.
            data.stale_tail = bool(cut) and not self._try_zero_from(data, page, cut)
        data.size = size

    def _try_zero_from(self, data: FileData, page: int, cut: int) -> bool:
        """Zero `page` from byte `cut` on; False (and nothing changed) if the pool is full."""
        if not data.entry(page):
            return True
        content = self._page(data, page)
        if content[cut:] == ZERO_PAGE[cut:]:
            return True
        try:
            # The page is stored already, so the size limit cannot refuse it: only mem_limit.
            self._put(data, page, content[:cut] + ZERO_PAGE[cut:])
        except NoSpaceError:
            return False
        return True

    def _zero_tail(self, data: FileData) -> None:
        """Zero the stale bytes past the end of file, before the file grows over them.

        Raises NoSpaceError(0, physical=True) and changes nothing if the pool has no room."""
        page, cut = divmod(data.size, PAGE_SIZE)
        if not self._try_zero_from(data, page, cut):
            raise NoSpaceError(0, physical=True)
        data.stale_tail = False

    def _free_from(self, data: FileData, first_page: int) -> None:
        """Free every page numbered first_page or higher: each chunk's objects in one call."""
        pages = same = 0
        for key in sorted(data.chunks):
            chunk = data.chunks[key]
            base = key << CHUNK_SHIFT
            if base + len(chunk) <= first_page:
                continue
            start = max(first_page - base, 0)
            cut = chunk[start:] if start else chunk
            handles = _zeros("Q", len(cut))
            del handles[self._handles_of(cut, handles) :]
            pages += len(cut) - cut.count(0)
            same += cut.count(SAME_ENTRY)
            self._free_backed(cut)
            if start == 0:
                del data.chunks[key]
            else:
                del chunk[start:]
            if handles:
                self._free_objects(data, handles, cut)
        if data.same_words:
            for number in [n for n in data.same_words if n >= first_page]:
                del data.same_words[number]
        self._same_words -= same
        data.stored_pages -= pages
        self.stored_pages -= pages
        if data.detached:
            self.detached_pages -= pages

    def release(self, data: FileData) -> None:
        """Free every page of a file that is gone (detached or not): it is empty afterwards."""
        freed = self._freed
        if data.pending is not None:
            self._unpend(data)
        self._free_from(data, 0)  # counts a detached file's pages out of detached_pages too
        data.size = 0
        data.stale_tail = False
        data.detached = False  # no pages left to count either way
        if self._freed != freed:
            self.on_free()
