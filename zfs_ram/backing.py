"""The backing file: zram's backing_dev, writeback and bd_stat, for a file on a real disk.

Written back, a page leaves the pool: its stored (compressed) bytes go to a slot of the
backing file, its pool object is freed, and its page-table entry says where the bytes are
(pagetable: "written back", slot and size in the entry, no Python object per page). Pages are
chosen as zram chooses them (`echo idle|huge|huge_idle|incompressible > writeback`), a page-
table chunk at a time, and, with writeback=auto, when mem_limit refuses a new object (idle
pages first, then huge ones, then any) before the write is answered ENOSPC.

Slots. One slot is PAGE_SIZE bytes of the file at slot * PAGE_SIZE; an object of fewer bytes
is written padded with zeros, so that a run of consecutive slots is one pwrite. A slot map
(one byte per slot, a bytearray: 0 free, 1 used) and the lowest slot that may be free find a
slot with bytearray.find at C speed. A freed slot's blocks are given back to the disk at once
(fallocate PUNCH_HOLE | KEEP_SIZE), one call per run of consecutive slots a store call freed.

Reads are served from the file (pread of the slot's stored bytes, then the usual decode), and
the page stays written back, as zram's read_from_bdev leaves ZRAM_WB pages on the device: the
kernel's page cache above the mount keeps what is read often, so copying the page back into
the pool would spend RAM twice on it, undo the writeback a cold tree's read pass makes, and
make a read fail at mem_limit. An overwrite, truncate or release frees the slot.

Accounting, as zram's (zram_free_page then atomic64_inc(pages_stored) in its writeback):
a written-back page leaves compr_data_size, mem_used_total (once its zspage empties) and
huge_pages, and stays in orig_data_size; bd_count counts the slots in use, bd_reads and
bd_writes the pages read from and written to the file (zram's bd_stat, in pages).

Failures. A write the file refuses (ENOSPC on a full disk, EROFS, EIO) stops the writeback:
the pages written before it are written back, the rest stay in the pool as they were, and
BackingWriteError says, in one line, what happened (the control file answers its errno).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from zfs_ram.pagestore_tiers import StoreTiers
from zfs_ram.pagetable import (
    HUGE_BIT,
    PRIORITY_FIELD,
    SAME_ENTRY,
    SLOT_MASK,
    STAMP_FIELD,
    TRIED_BIT,
    FileData,
    backed_entry,
    backed_size_of,
    handle_of,
    is_backed,
    priority_of,
    slot_of,
)
from zfs_ram.pool import PoolFullError
from zfs_ram.vocabulary import PAGE_SIZE

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02
# The slot map grows by this many slots at a time (4 KiB of map, 16 MiB of file).
MAP_GROWTH = 4096
# With writeback=auto, one refusal by mem_limit writes back at least this many pages (if there
# are so many) before the store is tried again: 4 MiB of pages, whose objects fill whole zspages
# more often than a few pages' would, so that their frames can come back.
AUTO_WRITEBACK_PAGES = 1024


class BackingFileError(Exception):
    """The backing file cannot be used (mount refused). ``str()`` is one line."""


class NoBackingFileError(ValueError):
    """writeback on a mount without backing_file= (the control file answers ENODEV, as zram)."""


class BackingWriteError(Exception):
    """The backing file refused a write; `errno` is its error. ``str()`` is one line."""

    def __init__(self, path: str, error: OSError, written: int) -> None:
        super().__init__(path, error)
        self.path = path
        self.reason = error.strerror or str(error)
        self.errno = error.errno or errno.EIO
        self.written = written  # pages written back before it (a walk adds its own)

    def __str__(self) -> str:
        return (
            f"writeback to {self.path} stopped after {self.written} pages: {self.reason}"
            " (the other pages stay in memory)"
        )


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2), which os does not offer with PUNCH_HOLE; None if it is missing."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


def _runs(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted slots as (first, count) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for slot in sorted(slots):
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs


@dataclass(frozen=True)
class BackingStats:
    """zram's bd_stat (in pages) and what the file costs on its disk."""

    backing_file: str
    bd_count: int  # slots holding a page now
    bd_reads: int  # pages read from the file
    bd_writes: int  # pages written to it
    failed_writes: int  # writebacks a write error stopped
    slots: int  # the file's length in slots (the highest ever used, plus 1)
    allocated_bytes: int  # st_blocks * 512: the disk space it takes now
    auto: bool  # writeback=auto: mem_limit writes back before it answers ENOSPC
    auto_pages: int  # pages written back that way


class BackingFile:
    """A file of PAGE_SIZE slots: written, read and freed by slot number."""

    def __init__(self, path: str, *, max_slots: int = SLOT_MASK + 1) -> None:
        """Open (or create) `path` read-write. Raises BackingFileError, creating nothing, if
        it cannot be used: a directory or other non-regular file, a non-empty file (zfs_ram
        would overwrite what it holds), or one that cannot be opened for writing.
        `max_slots`: the most pages it may hold (zram: the backing device's size)."""
        self.path = path
        try:
            existing = os.stat(path)
        except FileNotFoundError:
            existing = None
        except OSError as e:
            raise BackingFileError(f"backing_file={path}: {e.strerror}") from None
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            kind = "a directory" if stat.S_ISDIR(existing.st_mode) else "not a regular file"
            raise BackingFileError(f"backing_file={path}: is {kind}")
        if existing is not None and existing.st_size:
            raise BackingFileError(
                f"backing_file={path}: is not empty ({existing.st_size} bytes; zfs_ram would"
                " overwrite them: remove it or name a new file)"
            )
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise BackingFileError(f"backing_file={path}: {e.strerror}") from None
        opened = os.fstat(self.fd)
        if not stat.S_ISREG(opened.st_mode) or opened.st_size:  # replaced since the stat
            os.close(self.fd)
            raise BackingFileError(f"backing_file={path}: changed while it was opened")
        self.max_slots = max_slots
        self._map = bytearray()  # one byte per slot: 1 used, 0 free
        self._lowest_free = 0  # no slot below it is free
        self.count = 0  # bd_count
        self.reads = 0  # bd_reads
        self.writes = 0  # bd_writes
        self.failed_writes = 0
        self.punch_error: str | None = None  # set once hole punching failed (then off)

    def close(self, remove_contents: bool = True) -> None:
        """After unmount: give the disk space back (the file stays, empty) and close it."""
        if self.fd < 0:
            return
        if remove_contents:
            try:
                os.ftruncate(self.fd, 0)
            except OSError as e:
                log.warning("cannot empty backing file %s: %s", self.path, e.strerror)
        os.close(self.fd)
        self.fd = -1

    # -- slots --------------------------------------------------------------------------------

    def _allocate(self, count: int) -> array[int]:
        """Up to `count` free slots, lowest first, marked used (fewer if max_slots is met)."""
        slots = array("Q")
        used = self._map
        at = self._lowest_free
        while len(slots) < count:
            found = used.find(0, at)
            if found < 0:
                at = len(used)
                if at >= self.max_slots:
                    break
                found = at
                used.extend(bytes(min(MAP_GROWTH, self.max_slots - at)))
            used[found] = 1
            slots.append(found)
            at = found + 1
        self._lowest_free = at
        self.count += len(slots)
        return slots

    def free(self, slots: Iterable[int], punch: bool = True) -> None:
        """The slots hold nothing any more: their blocks go back to the disk (unless
        `punch` is False: nothing was written to them)."""
        runs = _runs(slots)
        used = self._map
        for first, count in runs:
            assert used[first : first + count] == b"\x01" * count, "a slot freed twice"
            used[first : first + count] = bytes(count)
            self.count -= count
        if runs:
            self._lowest_free = min(self._lowest_free, runs[0][0])
            if punch:
                for first, count in runs:
                    self._punch(first * PAGE_SIZE, count * PAGE_SIZE)

    def _punch(self, offset: int, length: int) -> None:
        """Give the file's bytes offset..offset+length back to the disk. A file system that
        cannot (EOPNOTSUPP) is told once and not asked again."""
        if _fallocate is None or self.punch_error is not None:
            return
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _fallocate(self.fd, mode, offset, length) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EOPNOTSUPP:
            self.punch_error = os.strerror(code)
        log.warning(
            "backing file %s: freed slots keep their disk space (fallocate: %s)",
            self.path,
            os.strerror(code),
        )

    def is_used(self, slot: int) -> bool:
        return slot < len(self._map) and self._map[slot] == 1

    # -- data ---------------------------------------------------------------------------------

    def write(self, blob: bytes, sizes: array[int]) -> tuple[array[int], BackingWriteError | None]:
        """Store the objects `sizes` cuts `blob` into, in order, one per slot. Returns the
        slots of those written (a prefix of them) and, if the file refused the rest, the
        error; the slots of pages not written are free again."""
        slots = self._allocate(len(sizes))
        error: OSError | None = None
        if len(slots) < len(sizes):
            error = OSError(errno.ENOSPC, f"all {self.max_slots} slots of the file are used")
        written = 0  # objects written
        position = 0  # in blob
        for first, count in _runs(slots):  # slots are ascending: runs are in object order
            pieces = []
            for size in sizes[written : written + count]:
                pieces.append(blob[position : position + size])
                if size < PAGE_SIZE:
                    pieces.append(bytes(PAGE_SIZE - size))
                position += size
            landed, failure = self._pwrite_all(b"".join(pieces), first * PAGE_SIZE)
            written += landed // PAGE_SIZE  # the slots written whole are kept
            if failure is not None:
                if landed % PAGE_SIZE:  # a slot written in part: its blocks go back
                    self._punch(first * PAGE_SIZE + landed // PAGE_SIZE * PAGE_SIZE, PAGE_SIZE)
                error = failure
                break
        if written < len(slots):
            self.free(slots[written:], punch=False)  # nothing (else) written to them
            del slots[written:]
        self.writes += written
        if error is None:
            return slots, None
        self.failed_writes += 1
        return slots, BackingWriteError(self.path, error, written)

    def _pwrite_all(self, data: bytes, offset: int) -> tuple[int, OSError | None]:
        """`data` at `offset`: (bytes written, the error that stopped it or None). A disk
        that fills up writes part (a short pwrite), then refuses (ENOSPC)."""
        view = memoryview(data)
        landed = 0
        while landed < len(data):
            try:
                done = os.pwrite(self.fd, view[landed:], offset + landed)
            except OSError as error:
                return landed, error
            if done <= 0:
                return landed, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            landed += done
        return landed, None

    def read(self, slot: int, size: int) -> bytes:
        """The `size` stored bytes in `slot`. OSError if the file cannot give them."""
        stored = os.pread(self.fd, size, slot * PAGE_SIZE)
        if len(stored) != size:
            raise OSError(errno.EIO, f"backing file {self.path}: slot {slot} is short")
        self.reads += 1
        return stored

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    @property
    def slots(self) -> int:
        """The map's length: the file is at most this many slots long."""
        return len(self._map)


class StoreBacking(StoreTiers):
    """The backing-file methods of PageStore (zfs_ram.pagestore), which calls the hooks; they
    keep the store's counters exact as its own methods do."""

    def _init_backing(self) -> None:
        self.backing: BackingFile | None = None
        self.backed_pages = 0  # written-back entries in all tables: 0 skips every hook
        self.auto_writeback = False
        self.auto_pages = 0
        self._auto_refused: int | None = None  # the errno last logged by _make_room
        self._victims: Callable[[], Iterable[FileData]] = tuple

    def attach_backing(
        self,
        backing: BackingFile,
        files: Callable[[], Iterable[FileData]] = tuple,
        auto: bool = False,
    ) -> None:
        """Write pages back to `backing` from now on; with `auto`, also when mem_limit refuses
        an object, choosing among `files` (every regular file's data)."""
        if self.backing is not None:
            raise ValueError("the store has a backing file already")
        self.backing = backing
        self._victims = files
        self.auto_writeback = auto

    def backing_statistics(self) -> BackingStats | None:
        backing = self.backing
        if backing is None:
            return None
        return BackingStats(
            backing_file=backing.path,
            bd_count=backing.count,
            bd_reads=backing.reads,
            bd_writes=backing.writes,
            failed_writes=backing.failed_writes,
            slots=backing.slots,
            allocated_bytes=backing.allocated_bytes(),
            auto=self.auto_writeback,
            auto_pages=self.auto_pages,
        )

    # -- writing back -------------------------------------------------------------------------

    def writeback_chunk(
        self, data: FileData, key: int, idle: bool, huge: bool, incompressible: bool = False
    ) -> int:
        """_writeback_chunk, as a public call: on_free() once if it freed pool objects."""
        freed = self._freed
        try:
            return self._writeback_chunk(data, key, idle, huge, incompressible)
        finally:
            if self._freed != freed:
                self.on_free()

    def _writeback_chunk(
        self, data: FileData, key: int, idle: bool, huge: bool, incompressible: bool = False
    ) -> int:
        """zram's writeback for chunk `key` of a file: each object that is idle (if `idle`),
        raw (if `huge`) and was tried by recompress in vain (if `incompressible`) goes to the
        backing file. Returns the pages written back. NoBackingFileError without a file;
        BackingWriteError if the file refused a write (the pages before it are written back,
        the rest are as they were)."""
        backing = self.backing
        if backing is None:
            raise NoBackingFileError("no backing_file (mount with -o backing_file=PATH)")
        chunk = data.chunks.get(key)
        if chunk is None:
            return 0
        picks = [
            i
            for i, entry in enumerate(chunk)
            if entry & 1
            and (not idle or not entry & STAMP_FIELD)
            and (not huge or entry & HUGE_BIT)
            and (not incompressible or entry & TRIED_BIT)
        ]
        if not picks:
            return 0
        handles = array("Q", [handle_of(chunk[i]) for i in picks])
        blob, sizes = self.pool.read_joined(handles)
        slots, error = backing.write(blob, sizes)
        done = len(slots)
        if done:
            for j in range(done):
                i = picks[j]
                entry = chunk[i]
                if entry & PRIORITY_FIELD:
                    self.recompressed_pages -= 1
                    self.recompressed_bytes -= sizes[j]
                chunk[i] = backed_entry(slots[j], sizes[j], entry)
            freed = self.pool.free_many(handles[:done])
            self._freed += done
            size = sum(freed)
            self.compr_bytes -= size
            data.footprint -= size
            self.huge_pages -= freed.count(PAGE_SIZE)
            self.backed_pages += done
        if error is not None:
            raise error
        return done

    def _make_room(self) -> bool:
        """writeback=auto: mem_limit refused an object. Write back AUTO_WRITEBACK_PAGES pages
        (idle ones first, then huge ones, then any); whether any left the pool."""
        if not self.auto_writeback or self.backing is None:
            return False
        done = 0
        for idle, huge in ((True, False), (False, True), (False, False)):
            for data in list(self._victims()):
                for key in sorted(data.chunks):
                    try:
                        done += self._writeback_chunk(data, key, idle, huge)
                    except BackingWriteError as error:
                        done += error.written
                        if error.errno != self._auto_refused:  # once, not on every write
                            log.warning("writeback=auto: %s", error)
                            self._auto_refused = error.errno
                        self.auto_pages += done
                        return done > 0
                    if done >= AUTO_WRITEBACK_PAGES:
                        self.auto_pages += done
                        self._auto_refused = None
                        return True
            if done:
                break
        self.auto_pages += done
        if done:
            self._auto_refused = None
        return done > 0

    def _store_object(self, encoded: bytes) -> int:
        """pool.store, with writeback=auto's room made when mem_limit refuses it (raises
        PoolFullError when there is nothing left to write back)."""
        while True:
            try:
                return self.pool.store(encoded)
            except PoolFullError:
                if not self._make_room():
                    raise

    # -- the hooks: reading and freeing written-back pages ------------------------------------

    def _backed_page(self, entry: int) -> bytes:
        """The page a written-back entry stands for, read from its slot."""
        assert self.backing is not None, "a written-back page needs its file"
        stored = self.backing.read(slot_of(entry), backed_size_of(entry))
        if entry & PRIORITY_FIELD:
            assert self.recomp_codec is not None, "a recompressed page needs its codec"
            return self.recomp_codec.decode_object(stored)
        return self.codec.decode_object(stored)

    def _read_mixed(
        self, data: FileData, first: int, entries: array[int], skip: int, length: int
    ) -> bytes:
        """_read_pages for pages some of which are written back: the pool's objects and the
        file's slots gathered into one batch, decoded in one codec call."""
        backing = self.backing
        assert backing is not None, "a written-back page needs its file"
        count = len(entries)
        objects = array("Q", [handle_of(entry) for entry in entries if entry & 1])
        blob, object_sizes = self.pool.read_joined(objects)
        pieces: list[bytes] = []
        sizes = array("H", bytes(2 * count))
        words = array("Q", bytes(8 * count))
        priorities = bytearray(count)
        position = taken = 0
        same_words = data.same_words or {}
        for i, entry in enumerate(entries):
            if entry & 1:
                size = object_sizes[taken]
                taken += 1
                pieces.append(blob[position : position + size])
                position += size
            elif entry == SAME_ENTRY:
                words[i] = same_words.get(first + i, 0)
                continue
            elif entry:
                size = backed_size_of(entry)
                pieces.append(backing.read(slot_of(entry), size))
            else:
                continue
            sizes[i] = size
            priorities[i] = priority_of(entry)
        mixed = any(priorities)
        result = self.codec.decode(
            b"".join(pieces),
            sizes,
            words,
            skip,
            length,
            secondary=self.recomp_codec if mixed else None,
            priorities=priorities if mixed else None,
        )
        self._touch_pages(data, first, first + count)
        return result

    @staticmethod
    def _any_backed(entries: array[int], objects: int) -> bool:
        """Whether some of `entries`, of which `objects` are objects, are written back."""
        return objects + entries.count(0) + entries.count(SAME_ENTRY) < len(entries)

    def _backed_in(self, data: FileData, first: int, count: int) -> list[int]:
        """The written-back entries of pages first..first+count-1 (while any page is)."""
        if not self.backed_pages:
            return []
        return [entry for entry in data.entry_array(first, first + count) if is_backed(entry)]

    def _free_backed(self, entries: Iterable[int]) -> int:
        """The written-back ones among `entries` (replaced or cut by the caller) free their
        slots; how many there were."""
        if not self.backed_pages:
            return 0
        slots = [slot_of(entry) for entry in entries if is_backed(entry)]
        if slots:
            assert self.backing is not None, "a written-back page needs its file"
            self.backing.free(slots)
            self.backed_pages -= len(slots)
        return len(slots)

    def check_backing(self, files: Iterable[FileData]) -> None:
        """Every written-back entry names a used slot of its own, and the counts agree."""
        seen: set[int] = set()
        for data in files:
            for _page, entry in data.pages():
                if is_backed(entry):
                    slot = slot_of(entry)
                    assert self.backing is not None and self.backing.is_used(slot), slot
                    assert slot not in seen, f"slot {slot} is held twice"
                    seen.add(slot)
        assert len(seen) == self.backed_pages, (len(seen), self.backed_pages)
        if self.backing is not None:
            assert self.backing.count == self.backed_pages, (self.backing.count, len(seen))
