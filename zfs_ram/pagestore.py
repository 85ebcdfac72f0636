"""Files as page tables over the pool: write, read, truncate and free, with zram's accounting.

A file's pages live in a two-level table: page number -> 64-bit entry, kept in array('Q')
chunks of CHUNK_PAGES entries, so that a file costs 8 bytes per page it has and nothing for the
holes of a sparse file (a write at 2 TiB makes one chunk, not a 4 GiB array).

Entry encoding (one word per page, no Python object per page):
    0                 a hole: reads as zeros, costs nothing, does not count as used
    handle << 1 | 1   a pool object (lz4 or raw page, see codec)
    SAME_ENTRY        a same-filled page; its word is in FileData.same_words unless it is 0

Accounting follows zram's mm_stat: orig_data_size counts every page held (same-filled and
huge included), compr_data_size the bytes of pool objects (a raw page counts PAGE_SIZE).
Every change goes through this module, so the counters are exact. The pages of detached files
(unlinked, not yet forgotten: see PageStore.detach) are held but do not count against the size
limit; detached_pages follows every write, truncate and release of such a file.

Frees are announced, not polled: every public call (write, truncate, release) that freed at
least one pool object (an overwrite frees the old one) calls on_free() once, as it returns or
raises, so the compactor can be woken.

Correctness rules. A write that fails leaves the file as it was for the page that failed; pages
before it are written (the caller reports a short write). A new object is stored before the old
one is freed, as zram does, so a failed store never loses the old page. A refused truncate
changes nothing, and a shrinking truncate is never refused: it frees what lies past the new end
and only then needs room, to store the cut page with its tail zeroed. If even that does not fit,
the old page stays, tail and all (FileData.stale_tail): the bytes past the end of file cannot be
read, and the first call that grows the file zeroes them before it changes anything else.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from zfs_ram.codec import (
    ZERO_PAGE,
    Encoded,
    decode,
    decode_many,
    encode_page,
    encode_pages,
    fill_page,
)
from zfs_ram.pool import Pool, PoolFullError
from zfs_ram.vocabulary import PAGE_SIZE

CHUNK_SHIFT = 9  # 512 pages = 2 MiB of file per chunk: 4 KiB of table when full
CHUNK_PAGES = 1 << CHUNK_SHIFT
CHUNK_MASK = CHUNK_PAGES - 1
SAME_ENTRY = 2  # even and non-zero: cannot be a hole (0) or an object (odd)
# The largest file: the kernel's MAX_LFS_FILESIZE, as tmpfs.
MAX_FILE_SIZE = (1 << 63) - 1


class NoSpaceError(Exception):
    """A write stopped because a limit was reached; `written` bytes landed before it."""

    def __init__(self, written: int, physical: bool) -> None:
        kind = "mem_limit" if physical else "size"
        super().__init__(f"no space ({kind} reached) after {written} bytes")
        self.written = written
        self.physical = physical


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

    def entries(self, first: int, stop: int) -> list[int]:
        """The entries of pages first..stop-1, holes included (as 0)."""
        out: list[int] = []
        page = first
        while page < stop:
            key = page >> CHUNK_SHIFT
            base = key << CHUNK_SHIFT
            upto = min(stop, base + CHUNK_PAGES)
            chunk = self.chunks.get(key)
            part = chunk[page - base : upto - base].tolist() if chunk is not None else []
            out += part
            if len(part) < upto - page:
                out += [0] * (upto - page - len(part))
            page = upto
        return out

    def pages(self) -> Iterator[tuple[int, int]]:
        """(page, entry) for every page that is not a hole, in no particular order."""
        for key, chunk in self.chunks.items():
            base = key << CHUNK_SHIFT
            for index, value in enumerate(chunk):
                if value:
                    yield base + index, value


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


def _nothing() -> None:
    """The default on_free: nobody to tell."""


class PageStore:
    """All files' pages over one pool; enforces the logical limit (tmpfs size=, in pages)."""

    def __init__(
        self, pool: Pool, size_limit_pages: int = 0, on_free: Callable[[], None] = _nothing
    ) -> None:
        self.pool = pool
        self.size_limit_pages = size_limit_pages  # tmpfs's size=; 0 = unlimited
        self.on_free = on_free  # called once after a public call that freed pool objects
        self._huge_size = pool.huge_class_size
        self.stored_pages = 0
        self.compr_bytes = 0
        self.same_pages = 0
        self.huge_pages = 0
        self.huge_pages_since = 0
        self._freed = 0  # pool objects freed so far: a public call that moves it calls on_free
        # Pages of files nobody can reach by name or handle any more, kept only until the
        # kernel forgets the inode (see detach); they do not count against size_limit_pages.
        self.detached_pages = 0

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
        )

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

    # -- one page ---------------------------------------------------------------------------

    def _page(self, data: FileData, page: int) -> bytes:
        value = data.entry(page)
        if value & 1:
            return decode(self.pool.read(value >> 1))
        if value == SAME_ENTRY:
            words = data.same_words
            return fill_page(words.get(page, 0) if words else 0)
        return ZERO_PAGE

    def _pages(self, data: FileData, first: int, stop: int) -> list[bytes]:
        """The contents of pages first..stop-1: objects fetched and decoded in one batch each."""
        entries = data.entries(first, stop)
        handles = [value >> 1 for value in entries if value & 1]
        decoded = decode_many(self.pool.read_many(handles))
        if len(decoded) == len(entries):  # no holes, no same-filled pages: the common case
            return decoded
        objects = iter(decoded)
        words = data.same_words
        return [
            next(objects)
            if value & 1
            else fill_page(words.get(page, 0) if words else 0)
            if value == SAME_ENTRY
            else ZERO_PAGE
            for page, value in enumerate(entries, first)
        ]

    def _drop(self, data: FileData, page: int, value: int) -> None:
        """Forget what entry `value` of `page` holds (the table entry is left to the caller)."""
        if value & 1:
            size = self.pool.free(value >> 1)
            self._freed += 1
            self.compr_bytes -= size
            data.footprint -= size
            if size == PAGE_SIZE:
                self.huge_pages -= 1
        elif value == SAME_ENTRY:
            self.same_pages -= 1
            if data.same_words:
                data.same_words.pop(page, None)
        data.stored_pages -= 1
        self.stored_pages -= 1
        if data.detached:
            self.detached_pages -= 1

    def _put(self, data: FileData, page: int, content: bytes) -> None:
        """Make `page` hold `content` (a full page); see _store."""
        self._store(data, page, encode_page(content, self._huge_size))

    def _store(self, data: FileData, page: int, encoded: Encoded) -> None:
        """Make `page` hold an encoded page: a same-filled word (int) or an object to store.

        Raises NoSpaceError(0, ...) and changes nothing if a limit stops it."""
        old = data.entry(page)
        if not old and self.size_limit_pages and self.used_pages >= self.size_limit_pages:
            raise NoSpaceError(0, physical=False)
        if encoded.__class__ is int:
            new = SAME_ENTRY
        else:
            try:
                handle = self.pool.store(encoded)  # type: ignore[arg-type]
            except PoolFullError:
                raise NoSpaceError(0, physical=True) from None
            new = handle << 1 | 1
        if old:
            self._drop(data, page, old)
        data.set_entry(page, new)
        data.stored_pages += 1
        self.stored_pages += 1
        if data.detached:
            self.detached_pages += 1
        if new == SAME_ENTRY:
            self.same_pages += 1
            if encoded:
                if data.same_words is None:
                    data.same_words = {}
                data.same_words[page] = encoded  # type: ignore[assignment]
        else:
            size = len(encoded)  # type: ignore[arg-type]
            self.compr_bytes += size
            data.footprint += size
            if size == PAGE_SIZE:
                self.huge_pages += 1
                self.huge_pages_since += 1

    # -- files ------------------------------------------------------------------------------

    def read(self, data: FileData, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`; short at end of file, empty past it."""
        end = min(offset + length, data.size)
        if offset >= end:
            return b""
        first = offset // PAGE_SIZE
        last = (end - 1) // PAGE_SIZE
        if first == last:
            start = offset - first * PAGE_SIZE
            return self._page(data, first)[start : start + end - offset]
        joined = b"".join(self._pages(data, first, last + 1))
        start = offset - first * PAGE_SIZE
        return joined[start : start + end - offset]

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
            # Whole pages: all encoded first, then stored in order.
            whole = (end - position) // PAGE_SIZE
            if whole:
                first = position // PAGE_SIZE
                base = position - offset
                view = memoryview(buf)
                pages = [
                    view[base + i * PAGE_SIZE : base + (i + 1) * PAGE_SIZE] for i in range(whole)
                ]
                for i, encoded in enumerate(encode_pages(pages, self._huge_size)):
                    self._store(data, first + i, encoded)
                    position += PAGE_SIZE
                    if position > data.size:
                        data.size = position
            if position < end:  # a partial last page
                position = self._write_partial(data, offset, buf, position, end)
        except NoSpaceError as error:
            raise NoSpaceError(position - offset, error.physical) from None
        return len(buf)

    def _write_partial(
        self, data: FileData, offset: int, buf: bytes, position: int, end: int
    ) -> int:
        """Read-modify-write the page holding `position`; returns where the write goes on."""
        page, start = divmod(position, PAGE_SIZE)
        page_start = page * PAGE_SIZE
        stop = min(end - page_start, PAGE_SIZE)
        piece = buf[position - offset : position - offset + stop - start]
        # A page at or past the end of file reads as zeros.
        old = self._page(data, page) if page_start < data.size else ZERO_PAGE
        self._put(data, page, old[:start] + piece + old[stop:])
        position = page_start + stop
        if position > data.size:
            data.size = position
        return position

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
        """Free every page numbered first_page or higher."""
        for key in sorted(data.chunks):
            chunk = data.chunks[key]
            base = key << CHUNK_SHIFT
            if base + len(chunk) <= first_page:
                continue
            start = max(first_page - base, 0)
            for index in range(start, len(chunk)):
                value = chunk[index]
                if value:
                    self._drop(data, base + index, value)
            if start == 0:
                del data.chunks[key]
            else:
                del chunk[start:]

    def release(self, data: FileData) -> None:
        """Free every page of a file that is gone (detached or not): it is empty afterwards."""
        freed = self._freed
        self._free_from(data, 0)  # counts a detached file's pages out of detached_pages too
        data.size = 0
        data.stale_tail = False
        data.detached = False  # no pages left to count either way
        if self._freed != freed:
            self.on_free()
