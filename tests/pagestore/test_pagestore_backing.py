"""The page store with a backing file, against a model: zram's writeback among every other step.

PageStoreMachine's steps (writes, overwrites, truncates, releases, reads, recompression, both
limits, detached files, on both engines) run with a backing file attached to the store and to
its twin, plus writeback steps: `echo idle|huge|huge_idle|incompressible > writeback` over
every chunk, and refused ones, a file that is full (its max_slots, zram's device size; and a
real ENOSPC from /dev/full in its place) or read-only (EBADF from the write), which must write
back the pages before the failure and leave every other page as it was. Some sequences run with
writeback=auto, where mem_limit writes pages back before it answers ENOSPC.

After every step: every file reads back as the model says (written-back pages from the file),
every written-back entry names a used slot of its own, the counters follow zram's (a written-
back page leaves compr_data_size and huge_pages, stays in orig_data_size), bd_count equals the
slots in use and the file's allocated blocks, and the twin on the other engine holds the same
entries (slot numbers included).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import replace

import hypothesis.strategies as st
import pytest
from hypothesis import event, given, settings
from hypothesis.stateful import initialize, invariant, rule
from test_pagestore_model import PageStoreMachine, _settings

from zfs_ram import native
from zfs_ram.backing import BackingFile, BackingFileError, BackingWriteError, NoBackingFileError
from zfs_ram.codec import Codec
from zfs_ram.pagestore import PageStore
from zfs_ram.pagetable import (
    HUGE_BIT,
    SAME_ENTRY,
    STAMP_FIELD,
    TRIED_BIT,
    FileData,
    backed_size_of,
    handle_of,
    is_backed,
    priority_of,
    slot_of,
)
from zfs_ram.pool import create_pool
from zfs_ram.vocabulary import PAGE_SIZE

KINDS = {
    "idle": (True, False, False),
    "huge": (False, True, False),
    "huge_idle": (True, True, False),
    "incompressible": (False, False, True),
    "any": (False, False, False),
}


@contextlib.contextmanager
def fd_replaced(backings: list[BackingFile], path: str, flags: int) -> Iterator[None]:
    """The backing files' descriptors point at `path` (opened with `flags`) for a while."""
    saved = [os.dup(backing.fd) for backing in backings]
    other = os.open(path, flags)
    try:
        for backing in backings:
            os.dup2(other, backing.fd)
        yield
    finally:
        for backing, fd in zip(backings, saved, strict=True):
            os.dup2(fd, backing.fd)
            os.close(fd)
        os.close(other)


class BackingMachine(PageStoreMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="zfs_ram-backing-")
        self.backings: list[BackingFile] = []

    def teardown(self) -> None:
        for backing in self.backings:
            backing.close()
        shutil.rmtree(self.directory)
        super().teardown()

    @initialize(max_slots=st.sampled_from([6, 20, 1 << 20]), auto=st.booleans())
    def attach(self, max_slots: int, auto: bool) -> None:
        for name, store, files in (
            ("store", self.store, lambda: self.files),
            ("twin", self.twin, lambda: self.twin_files),
        ):
            backing = BackingFile(os.path.join(self.directory, name), max_slots=max_slots)
            store.attach_backing(backing, files, auto=auto)
            self.backings.append(backing)

    def _writeback_all(self, kind: str) -> tuple[int, int | None]:
        """writeback of `kind` over every chunk of every file, on both stores: (pages, the
        errno that stopped it or None)."""
        idle, huge, incompressible = KINDS[kind]
        total = 0
        for i, data in enumerate(self.files):
            for key in sorted(data.chunks):

                def step(s: PageStore, files: list[FileData], i: int = i, key: int = key) -> int:
                    return s.writeback_chunk(files[i], key, idle, huge, incompressible)

                try:
                    total += self._call(step)
                except BackingWriteError as error:
                    with pytest.raises(BackingWriteError) as twin_error:
                        step(self.twin, self.twin_files)
                    assert (twin_error.value.errno, twin_error.value.written) == (
                        error.errno,
                        error.written,
                    )
                    assert str(error).count("\n") == 0
                    return total + error.written, error.errno
        return total, None

    @rule(kind=st.sampled_from(sorted(KINDS)), older_than=st.sampled_from([None, 0, 2]))
    def writeback(self, kind: str, older_than: int | None) -> None:
        """`echo all|SECONDS > idle`, then `echo KIND > writeback`: the chosen objects go to
        the file (all of them, unless the file is full), and nothing else changes."""
        cutoff = self.store.idle_cutoff(older_than)
        for data, twin in zip(self.files, self.twin_files, strict=True):
            assert self.store.mark_idle(data, cutoff) == self.twin.mark_idle(twin, cutoff)
        idle, huge, incompressible = KINDS[kind]
        before = [dict(data.pages()) for data in self.files]
        done, error = self._writeback_all(kind)
        event(f"writeback {kind}: {'some' if done else 'no'} pages" + (" (full)" if error else ""))
        if error is not None:
            assert error == errno.ENOSPC  # the slots ran out
        moved = 0
        for data, entries in zip(self.files, before, strict=True):
            for page, old in entries.items():
                new = data.entry(page)
                chosen = (
                    old & 1
                    and (not idle or not old & STAMP_FIELD)
                    and (not huge or old & HUGE_BIT)
                    and (not incompressible or old & TRIED_BIT)
                )
                if not chosen:
                    assert new == old
                elif is_backed(new):
                    moved += 1
                    assert priority_of(new) == priority_of(old)
                    assert bool(new & HUGE_BIT) == bool(old & HUGE_BIT)
                else:
                    assert error is not None and new == old, "a chosen page was left behind"
        assert moved == done

    @rule(kind=st.sampled_from(["any", "huge"]), device=st.sampled_from(["full", "read-only"]))
    def writeback_refused(self, kind: str, device: str) -> None:
        """A backing file on a full disk (ENOSPC) or a read-only one (EBADF here): the write
        fails, every page stays as it was, and the error is one line."""
        before = [dict(data.pages()) for data in self.files]
        counters = (self.store.statistics(), self.store.backed_pages, self.backings[0].count)
        if device == "full":
            replaced = fd_replaced(self.backings, "/dev/full", os.O_WRONLY)
            expected = errno.ENOSPC
        else:
            replaced = fd_replaced(self.backings, self.backings[0].path, os.O_RDONLY)
            expected = errno.EBADF
        with replaced:
            done, error = self._writeback_all(kind)
        assert done == 0
        if error is None:
            assert not any(
                entry & 1 and (kind == "any" or entry & HUGE_BIT)
                for entries in before
                for entry in entries.values()
            ), "a page to write back was there"
            return
        event(f"writeback refused: {device}")
        full = self.backings[0].count == self.backings[0].max_slots
        assert error == expected or (error == errno.ENOSPC and full)
        assert [dict(data.pages()) for data in self.files] == before
        assert (self.store.statistics(), self.store.backed_pages, self.backings[0].count) == (
            counters
        )

    # -- the checks ----------------------------------------------------------------------------

    @invariant()
    def backing_matches(self) -> None:
        if not self.backings:
            return
        store, backing = self.store, self.backings[0]
        store.check_backing(self.files)
        self.twin.check_backing(self.twin_files)
        if store.auto_pages:
            event("writeback=auto wrote pages back")
        stats = store.backing_statistics()
        assert self.twin.backing_statistics() == replace(stats, backing_file=self.backings[1].path)
        assert stats is not None and stats.bd_count == store.backed_pages == backing.count
        # Every used slot takes its one block on the disk, and a freed one none: hole-punched.
        assert stats.allocated_bytes == stats.bd_count * PAGE_SIZE
        assert stats.bd_writes >= stats.bd_count

    @invariant()
    def counters_match(self) -> None:
        """PageStoreMachine's counters, with written-back pages: held (orig_data_size), but
        not in the pool (compr_data_size, huge_pages, the second algorithm's counters)."""
        pool, store = self.pool, self.store
        pool.check()
        stored = same = objects = compr = huge = backed = 0
        second_pages = second_bytes = 0
        for data in self.files:
            pages = footprint = 0
            for _page, entry in data.pages():
                pages += 1
                if entry & 1:
                    size = pool.object_size(handle_of(entry))
                    assert bool(entry >> 63) == (size == PAGE_SIZE), "HUGE is a raw page"
                    if priority_of(entry):
                        second_pages += 1
                        second_bytes += size
                    objects += 1
                    footprint += size
                    huge += size == PAGE_SIZE
                elif entry == SAME_ENTRY:
                    same += 1
                else:
                    assert is_backed(entry), hex(entry)
                    assert bool(entry >> 63) == (backed_size_of(entry) == PAGE_SIZE)
                    backed += 1
            if data.pending is not None:
                pages += 1
                same += bytes(data.pending) == data.pending[:8] * (PAGE_SIZE // 8)
            assert (data.stored_pages, data.footprint) == (pages, footprint)
            stored += pages
            compr += footprint
        stats = store.statistics()
        assert stats.stored_pages == stored
        assert stats.orig_data_size == stored * PAGE_SIZE
        assert stats.compr_data_size == compr == pool.bytes_stored
        assert stats.same_pages == same
        assert stats.huge_pages == huge
        assert pool.objects == objects
        assert store.backed_pages == backed
        assert (store.recompressed_pages, store.recompressed_bytes) == (second_pages, second_bytes)

    @invariant()
    def slots_are_the_twins(self) -> None:
        for data, twin in zip(self.files, self.twin_files, strict=True):
            mine = {page: entry for page, entry in data.pages() if is_backed(entry)}
            assert {page: entry for page, entry in twin.pages() if is_backed(entry)} == mine
            for entry in mine.values():
                assert slot_of(entry) < self.backings[0].slots


TestPageStoreWithBackingFile = BackingMachine.TestCase
# As ZbudPageStoreMachine's: @settings may decorate the base class only.
TestPageStoreWithBackingFile.settings = _settings


# -- plain cases ------------------------------------------------------------------------------

ENGINES = [native.PYTHON, native.NATIVE]


def text_pages(count: int) -> bytes:
    """`count` whole pages of text, each its own (none same-filled)."""
    return b"".join((f"page {n:05d} ".encode() * PAGE_SIZE)[:PAGE_SIZE] for n in range(count))


@pytest.mark.parametrize("engine", ENGINES)
def test_writeback_without_a_backing_file_changes_nothing(engine: str) -> None:
    store = PageStore(create_pool("zsmalloc"), codec=Codec(engine=engine))
    data = FileData()
    store.write(data, 0, text_pages(8))
    table = {key: array("Q", chunk) for key, chunk in data.chunks.items()}
    before = store.statistics()
    with pytest.raises(NoBackingFileError, match="backing_file"):
        store.writeback_chunk(data, 0, idle=False, huge=False)
    assert data.chunks == table and store.statistics() == before


@pytest.mark.parametrize("engine", ENGINES)
def test_written_back_pages_leave_the_pool_and_read_back(engine: str, tmp_path: str) -> None:
    pool = create_pool("zsmalloc")
    store = PageStore(pool, codec=Codec(engine=engine), recomp_codec=Codec("zstd", engine=engine))
    backing = BackingFile(os.path.join(tmp_path, "backing"))
    files = [FileData() for _ in range(3)]
    store.attach_backing(backing, lambda: files)
    content = text_pages(600) + os.urandom(3 * PAGE_SIZE)  # two chunks, three huge pages
    for data in files:
        store.write(data, 0, content)
    store.mark_idle(files[0], store.idle_cutoff(None))
    assert store.recompress_chunk(files[0], 0, idle=True, huge=False) > 0  # zstd's, then out
    used = pool.pages_used
    stored = store.stored_pages
    done = sum(
        store.writeback_chunk(data, key, idle=False, huge=False)
        for data in files
        for key in sorted(data.chunks)
    )
    assert done == 3 * 603 == backing.count
    assert store.compr_bytes == 0 and store.huge_pages == 0 and store.recompressed_pages == 0
    assert pool.pages_used <= 0.2 * used and store.stored_pages == stored
    assert backing.allocated_bytes() == done * PAGE_SIZE
    for data in files:
        assert store.read(data, 0, len(content)) == content
        assert (
            store.read(data, 599 * PAGE_SIZE + 5, PAGE_SIZE)
            == content[599 * PAGE_SIZE + 5 : 600 * PAGE_SIZE + 5]
        )
    assert (
        store.read(files[0], 7 * PAGE_SIZE + 1, 100)
        == content[7 * PAGE_SIZE + 1 : 7 * PAGE_SIZE + 101]
    )
    assert backing.reads >= 3 * 603
    store.write(files[0], 10, b"new")  # read, changed, stored in the pool again
    store.write(files[0], PAGE_SIZE, content[PAGE_SIZE : 5 * PAGE_SIZE])  # a batch over four
    assert store.same_pages == 0 and store.stored_pages == stored
    assert store.compr_bytes == pool.bytes_stored > 0
    store.truncate(files[1], 100 * PAGE_SIZE)
    store.release(files[2])
    assert backing.count == 598 + 100
    assert backing.allocated_bytes() == backing.count * PAGE_SIZE
    store.check_backing(files)


def test_a_backing_file_that_cannot_be_used_is_one_line(tmp_path: str) -> None:
    os.mkdir(os.path.join(tmp_path, "dir"))
    with open(os.path.join(tmp_path, "full"), "wb") as file:
        file.write(b"data")
    for name, reason in [
        ("dir", "is a directory"),
        ("full", "is not empty"),
        ("missing/file", "No such file or directory"),
    ]:
        with pytest.raises(BackingFileError, match=reason) as error:
            BackingFile(os.path.join(tmp_path, name))
        assert "\n" not in str(error.value)
    assert os.path.getsize(os.path.join(tmp_path, "full")) == 4


@pytest.mark.parametrize("engine", ENGINES)
def test_auto_writeback_makes_room_at_mem_limit(engine: str, tmp_path: str) -> None:
    """writeback=auto: a pool of four frames takes twenty raw pages, the oldest written back
    to make room; a page overwritten while mem_limit is reached may be the one moved."""
    pool = create_pool("zsmalloc", mem_limit_pages=4)
    store = PageStore(pool, codec=Codec(engine=engine))
    data = FileData()
    store.attach_backing(BackingFile(os.path.join(tmp_path, "backing")), lambda: [data], True)
    content = bytearray(os.urandom(20 * PAGE_SIZE))  # raw pages: one frame each
    store.write(data, 0, bytes(content))
    assert store.auto_pages > 0 and pool.pages_used <= 4
    for page in (19, 18, 0):  # in the pool, in the pool, written back
        fresh = os.urandom(PAGE_SIZE)
        store.write(data, page * PAGE_SIZE, fresh)
        content[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = fresh
        pool.check()
        store.check_backing([data])
    assert store.read(data, 0, len(content)) == content
    assert store.stored_pages == 20 and store.compr_bytes == pool.bytes_stored
    store.release(data)
    assert store.backed_pages == 0 and pool.objects == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_full_backing_file_takes_what_fits(engine: str, tmp_path: str) -> None:
    """zram's backing device has a size: past it, writeback stops with ENOSPC, the pages it
    wrote stay written back and the others stay in memory; a freed slot is used again."""
    store = PageStore(create_pool("zsmalloc"), codec=Codec(engine=engine))
    data = FileData()
    store.attach_backing(BackingFile(os.path.join(tmp_path, "backing"), max_slots=4))
    content = text_pages(10)
    store.write(data, 0, content)
    with pytest.raises(BackingWriteError) as error:
        store.writeback_chunk(data, 0, idle=False, huge=False)
    assert (error.value.errno, error.value.written) == (errno.ENOSPC, 4)
    assert "\n" not in str(error.value)
    kinds = [is_backed(data.entry(page)) for page in range(10)]
    assert kinds == [True] * 4 + [False] * 6 and store.pool.objects == 6
    store.write(data, 0, content[:PAGE_SIZE])  # slot 0 is free again
    with pytest.raises(BackingWriteError) as error:
        store.writeback_chunk(data, 0, idle=False, huge=False)
    assert error.value.written == 1  # page 0, into slot 0
    assert [slot_of(data.entry(page)) for page in range(4)] == [0, 1, 2, 3]
    assert store.backed_pages == 4 and store.read(data, 0, len(content)) == content
    store.check_backing([data])


@settings(max_examples=100, deadline=None)
@given(
    max_slots=st.integers(1, 12),
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(1, 6), st.integers(0, 2**16)), min_size=4, max_size=30
    ),
)
def test_slots_go_lowest_first_and_come_back(
    max_slots: int, steps: list[tuple[bool, int, int]]
) -> None:
    """The slot map against a set: a write takes the lowest free slots (as many as there are),
    a free gives them back and punches their blocks, and each slot holds what was written."""
    with tempfile.TemporaryDirectory() as directory:
        backing = BackingFile(os.path.join(directory, "backing"), max_slots=max_slots)
        held: dict[int, bytes] = {}
        for write, count, seed in steps:
            rng = random.Random(seed)
            if write:
                sizes = array("H", [rng.randrange(1, PAGE_SIZE + 1) for _ in range(count)])
                blob = rng.randbytes(sum(sizes))
                slots, error = backing.write(blob, sizes)
                free = [slot for slot in range(max_slots) if slot not in held]
                assert list(slots) == free[:count]
                assert (error is not None) == (len(free) < count)
                position = 0
                for slot, size in zip(slots, sizes, strict=False):
                    held[slot] = blob[position : position + size]
                    position += size
            elif held:
                gone = rng.sample(sorted(held), min(count, len(held)))
                backing.free(gone)
                for slot in gone:
                    del held[slot]
            assert backing.count == len(held)
            assert backing.allocated_bytes() == len(held) * PAGE_SIZE
            for slot, stored in held.items():
                assert backing.read(slot, len(stored)) == stored
        backing.close()
