"""The page store on its own: a file's pages of every kind, read back in one batch, and the
single-page write path.

A FUSE read of 128 KiB asks for 32 pages at once; they may be holes, same-filled pages, lz4
objects or raw pages, in any mix, and the read may start and end inside a page. A 4 KiB write
at a page boundary (random writes, small files) takes a path of its own, which must keep the
same accounting and the same all-or-nothing rule at the size limit.
"""

from __future__ import annotations

import importlib
import random
from array import array
from collections.abc import Sequence
from types import ModuleType

import pytest
from page_kinds import page_of_kind

from zfs_ram import pagetable
from zfs_ram.codec import encode_page
from zfs_ram.pagestore import NoSpaceError, PageStore
from zfs_ram.pagetable import FileData
from zfs_ram.pool import InvalidHandleError, create_pool
from zfs_ram.vocabulary import PAGE_SIZE


def page_of(kind: str, rng: random.Random) -> bytes | None:
    """A page of `kind`, or None for a hole (nothing written)."""
    return None if kind == "hole" else page_of_kind(kind, rng)


@pytest.mark.parametrize("kind", ["zsmalloc", "zbud"])
def test_batch_read_of_mixed_pages(kind: str) -> None:
    rng = random.Random(7)
    pool = create_pool(kind)
    store = PageStore(pool)
    data = FileData()
    kinds = ["hole", "zero", "same", "text", "random"]
    # Past one page-table chunk (512 pages), so that a read crosses from one chunk to the next.
    pages = [page_of(rng.choice(kinds), rng) for _ in range(700)]
    model = bytearray()
    for number, content in enumerate(pages):
        if content is not None:
            store.write(data, number * PAGE_SIZE, content)
        model += content if content is not None else bytes(PAGE_SIZE)
    store.truncate(data, len(model) - 100)
    del model[-100:]
    for _ in range(300):
        offset = rng.randrange(len(model) + 10)
        length = rng.choice([1, 100, PAGE_SIZE, 32 * PAGE_SIZE, 40 * PAGE_SIZE + 17])
        assert store.read(data, offset, length) == bytes(model[offset : offset + length])
    assert store.read(data, 0, len(model) + PAGE_SIZE) == bytes(model)
    assert store.stored_pages == sum(1 for p in pages if p is not None)
    pool.check()


def test_read_many_rejects_a_dead_handle() -> None:
    pool = create_pool("zsmalloc")
    live = pool.store(b"x" * 100)
    dead = pool.store(b"y" * 100)
    pool.free(dead)
    with pytest.raises(InvalidHandleError):
        pool.read_many([live, dead])
    with pytest.raises(InvalidHandleError):
        pool.read_many([0])
    with pytest.raises(InvalidHandleError):
        pool.read_many([10**6])


@pytest.mark.parametrize("kind", ["zsmalloc", "zbud"])
def test_single_page_overwrites_keep_contents_and_accounting(kind: str) -> None:
    rng = random.Random(11)
    pool = create_pool(kind)
    store = PageStore(pool, size_limit_pages=48)
    data = FileData()
    model = bytearray()
    refused = 0
    stored: dict[int, bytes] = {}  # page -> content, for recounting zram's page kinds
    for _ in range(2000):
        number = rng.randrange(64)  # more pages than the limit allows: some writes are refused
        content = page_of(rng.choice(["zero", "same", "text", "random"]), rng)
        assert content is not None
        before = (data.size, store.stored_pages, store.read(data, number * PAGE_SIZE, PAGE_SIZE))
        try:
            assert store.write(data, number * PAGE_SIZE, content) == PAGE_SIZE
        except NoSpaceError as error:
            assert (error.written, error.physical) == (0, False)
            assert (
                data.size,
                store.stored_pages,
                store.read(data, number * PAGE_SIZE, PAGE_SIZE),
            ) == before  # nothing changed
            refused += 1
            continue
        stored[number] = content
        end = (number + 1) * PAGE_SIZE
        if end > len(model):
            model += bytes(end - len(model))
        model[number * PAGE_SIZE : end] = content
    assert refused > 0
    assert data.size == len(model)
    assert store.read(data, 0, len(model)) == bytes(model)
    assert store.stored_pages == store.used_pages == 48
    assert store.compr_bytes == data.footprint == pool.bytes_stored
    kinds = [encode_page(content, pool.huge_class_size) for content in stored.values()]
    assert store.same_pages == sum(isinstance(k, int) for k in kinds)
    assert store.huge_pages == sum(not isinstance(k, int) and len(k) == PAGE_SIZE for k in kinds)
    pool.check()
    store.release(data)
    assert (store.stored_pages, store.compr_bytes, pool.objects) == (0, 0, 0)


def _filled_to_mem_limit(rng: random.Random) -> tuple[PageStore, FileData, bytearray]:
    """A zsmalloc pool of 16 frames filled with one file of mixed pages (text, every fifth
    random) until a write is refused at mem_limit; the file's bytes as a model."""
    store = PageStore(create_pool("zsmalloc", mem_limit_pages=16))
    data = FileData()
    model = bytearray()
    while True:
        number = len(model) // PAGE_SIZE
        content = page_of_kind("mixed", rng, number)
        assert content is not None
        try:
            store.write(data, number * PAGE_SIZE, content)
        except NoSpaceError as error:
            assert error.physical
            return store, data, model
        model += content


def test_a_truncate_at_mem_limit_keeps_the_file() -> None:
    """The issue's reproduction: a pool filled with text pages, every fifth one random (stored
    raw), then a truncate into the middle of a random page. Rewriting the cut page needs room
    the pool does not have; the truncate must still cut exactly, and never lose what it keeps
    (it used to free the pages past the cut, fail anyway, and leave them reading as zeros).
    zsmalloc only: zbud gives whole frames back as the pages past the cut go, so there the cut
    page always fits after them (the state machine covers both pools)."""
    left_stale = 0
    for trial in range(12):
        rng = random.Random(trial)
        store, data, model = _filled_to_mem_limit(rng)
        number = rng.choice(range(4, len(model) // PAGE_SIZE, 5))
        size = number * PAGE_SIZE + rng.randrange(1, PAGE_SIZE)
        store.truncate(data, size)  # shrinking is never refused
        del model[size:]
        assert data.size == size and store.read(data, 0, size + PAGE_SIZE) == bytes(model)
        left_stale += data.stale_tail
        # Growing the file again shows zeros past the old cut, never the page's old tail.
        grown = size + PAGE_SIZE
        try:
            store.truncate(data, grown)
        except NoSpaceError as error:
            assert error.physical and data.stale_tail  # refused: nothing changed
            assert data.size == size and store.read(data, 0, grown) == bytes(model)
        else:
            assert store.read(data, 0, grown) == bytes(model) + bytes(PAGE_SIZE)
        store.pool.check()
    assert left_stale > 0  # some cut pages found no room even after the pages past them went


TABLES = [pagetable, importlib.import_module("zfs_ram._codec")]


@pytest.mark.parametrize("table", TABLES, ids=["python", "native"])
def test_the_table_loops_of_both_engines(table: ModuleType) -> None:
    """place, handles_of and spread: the per-page loops of a batch, on a chunk with a hole,
    a same-filled page and objects, and refused whole when the handles run short."""
    chunk = array("Q", [0, pagetable.SAME_ENTRY, 7 << 1 | 1, 0, 9 << 1 | 1])
    sizes = array("H", [99, 100, 0, 200, 0, 300])
    handles = array("Q", [0, 11, 12, 13])
    olds = array("Q", bytes(8 * 6))
    # Pages 1..5 of the chunk take sizes[1:5]: two objects (handles 11, 12) and two same.
    assert table.place(chunk, 1, sizes, 1, 4, handles, 1, olds, 1, 0) == (1, 1, 2, 2)
    assert list(chunk) == [0, 11 << 1 | 1, pagetable.SAME_ENTRY, 12 << 1 | 1, pagetable.SAME_ENTRY]
    assert list(olds[1:3]) == [7, 9]
    before = chunk.tobytes()
    with pytest.raises(ValueError):
        table.place(chunk, 0, sizes, 0, 4, handles, 3, olds, 0, 0)  # 3 objects, 1 handle left
    with pytest.raises(ValueError):
        table.place(chunk, 2, sizes, 0, 4, handles, 0, olds, 0, 0)  # past the chunk's end
    assert chunk.tobytes() == before
    out = array("Q", bytes(8 * len(chunk)))
    assert table.handles_of(chunk, out) == 2 and list(out[:2]) == [11, 12]
    spread = array("H", bytes(2 * len(chunk)))
    table.spread(chunk, array("H", [50, 60]), spread)
    assert list(spread) == [0, 50, 0, 60, 0]
    with pytest.raises(ValueError):
        table.spread(chunk, array("H", [50]), spread)


class CountingPool:
    """A zsmalloc pool whose stored objects are counted, store and store_many alike."""

    def __init__(self) -> None:
        self.pool = create_pool("zsmalloc")
        self.stored = 0
        store, store_many = self.pool.store, self.pool.store_many

        def counting_store(data: bytes) -> int:
            self.stored += 1
            return store(data)

        def counting_store_many(blob: bytes, sizes: Sequence[int]) -> array[int]:
            before = self.stored  # store_many may call store(): count its objects once
            handles = store_many(blob, sizes)
            self.stored = before + len(handles)
            return handles

        self.pool.store = counting_store  # type: ignore[method-assign, assignment]  # counting
        self.pool.store_many = counting_store_many  # type: ignore[method-assign, assignment]


def test_10k_appends_compress_each_page_once() -> None:
    """tar's records: every other one ends inside a page, which stays pending (uncompressed)
    until the next record fills it, instead of being compressed once per record."""
    rng = random.Random(3)
    counted = CountingPool()
    store = PageStore(counted.pool)
    data = FileData()
    content = b"".join(page_of_kind("text", rng) for _ in range(64))[: 63 * PAGE_SIZE + 1000]
    record = 10 * 1024
    for offset in range(0, len(content), record):
        store.write(data, offset, content[offset : offset + record])
        assert store.read(data, 0, offset + record) == content[: offset + record]
    assert counted.stored == 63  # every full page once; the last, partial one is pending
    stats = store.statistics()
    assert (stats.pending_pages, stats.stored_pages) == (1, 64)
    assert stats.orig_data_size == 64 * PAGE_SIZE  # held, as zram counts it
    assert stats.compr_data_size == counted.pool.bytes_stored  # but in no pool object
    store.flush(data)
    assert counted.stored == 64 and store.statistics().pending_pages == 0
    assert store.read(data, 0, len(content) + 1) == content
    store.truncate(data, 100)
    store.write(data, 100, b"x" * 50)  # the cut page, stored, comes back pending
    assert store.statistics().pending_pages == 1 and data.pending_page == 0
    assert store.read(data, 0, 200) == content[:100] + b"x" * 50
    store.release(data)
    assert (store.stored_pages, store.statistics().pending_pages, counted.pool.objects) == (0, 0, 0)


def test_the_oldest_pending_page_is_stored_for_a_new_one() -> None:
    counted = CountingPool()
    store = PageStore(counted.pool, pending_limit_pages=2)
    files = [FileData() for _ in range(3)]
    for number, data in enumerate(files):
        store.write(data, 0, bytes([number + 1]) * 100)
    assert [data.pending is not None for data in files] == [False, True, True]
    assert counted.stored == 1 and store.statistics().pending_pages == 2
    for number, data in enumerate(files):
        assert store.read(data, 0, 200) == bytes([number + 1]) * 100
    unlimited = PageStore(create_pool("zsmalloc"), pending_limit_pages=0)
    data = FileData()
    unlimited.write(data, 0, b"y" * 100)  # 0: no page is kept pending
    assert data.pending is None and unlimited.pool.objects == 1


def test_a_stale_tail_does_not_survive_into_a_pending_page() -> None:
    """A cut page left with its old tail (no room to store it zeroed) that becomes pending
    through a write that does not grow the file: growing it later must show zeros."""
    for trial in range(40):
        rng = random.Random(trial)
        store, data, model = _filled_to_mem_limit(rng)
        number = rng.choice(range(4, len(model) // PAGE_SIZE, 5))
        size = number * PAGE_SIZE + rng.randrange(20, PAGE_SIZE)
        store.truncate(data, size)
        if not data.stale_tail:
            continue
        del model[size:]
        store.write(data, size - 10, b"z" * 10)  # inside the last page: it becomes pending
        model[size - 10 : size] = b"z" * 10
        assert data.pending_page == number and not data.stale_tail
        store.truncate(data, size + 100)  # grows within the pending page
        assert store.read(data, 0, size + PAGE_SIZE) == bytes(model) + bytes(100)
        return
    pytest.fail("no trial left a stale tail")
