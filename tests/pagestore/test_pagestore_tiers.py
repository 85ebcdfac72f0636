"""Idle pages and recompression (zram's idle, recompress, recomp_algorithm) in the page store.

Each test runs on both engines. zstd is the second algorithm here: its frames are not lz4's, so
a page decoded with the wrong algorithm is corrupt (lz4hc's blocks would decode as lz4).
"""

from __future__ import annotations

import importlib
import random
from array import array

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from page_kinds import page_of_kind

from zfs_ram import native, pagetable
from zfs_ram.codec import Codec
from zfs_ram.pagestore import PageStore
from zfs_ram.pagetable import (
    HANDLE_MASK,
    PRIORITY_SHIFT,
    SAME_ENTRY,
    STAMP_FIELD,
    STAMP_MAX,
    TRIED_BIT,
    FileData,
    handle_of,
    object_entry,
    priority_of,
    stamp_of,
)
from zfs_ram.pool import create_pool
from zfs_ram.vocabulary import PAGE_SIZE

ENGINES = [native.PYTHON, native.NATIVE]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_store(engine: str, clock: Clock, recomp: str | None = "zstd") -> PageStore:
    return PageStore(
        create_pool("zsmalloc"),
        codec=Codec("lz4", engine=engine),
        recomp_codec=Codec(recomp, engine=engine) if recomp else None,
        clock=clock,
    )


def pages(kind: str, count: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(page_of_kind(kind, rng, n) for n in range(count))


def recompress_all(store: PageStore, files: list[FileData], idle: bool, huge: bool) -> int:
    return sum(
        store.recompress_chunk(data, key, idle, huge) for data in files for key in list(data.chunks)
    )


def walk(store: PageStore, files: list[FileData]) -> tuple[int, int]:
    """(pages, bytes) of the objects the second algorithm encoded, from the tables."""
    count = size = 0
    for data in files:
        for _page, entry in data.pages():
            if entry & 1 and priority_of(entry):
                count += 1
                size += store.pool.object_size(handle_of(entry))
    return count, size


@pytest.mark.parametrize("engine", ENGINES)
def test_recompressed_pages_read_back_and_are_counted(engine: str) -> None:
    clock = Clock()
    store = make_store(engine, clock)
    files = [FileData() for _ in range(3)]
    contents = [bytearray(pages("text", 40, seed)) for seed in range(3)]
    for data, content in zip(files, contents, strict=True):
        store.write(data, 0, bytes(content))
    before = store.compr_bytes
    assert sum(store.mark_idle(data, store.idle_cutoff(None)) for data in files) == 120
    assert recompress_all(store, files, idle=True, huge=False) == 120
    assert store.compr_bytes < 0.95 * before
    assert walk(store, files) == (store.recompressed_pages, store.recompressed_bytes)
    stats = store.algorithm_statistics()
    assert stats["zstd"].pages == 120 and stats["lz4"].pages == 0
    assert stats["zstd"].compr_data_size == store.compr_bytes == store.pool.bytes_stored
    for data, content in zip(files, contents, strict=True):
        assert store.read(data, 0, len(content)) == content  # one batch
        assert (
            store.read(data, 5 * PAGE_SIZE + 7, 3 * PAGE_SIZE)
            == content[5 * PAGE_SIZE + 7 : 8 * PAGE_SIZE + 7]
        )
        assert store.read(data, 9 * PAGE_SIZE, PAGE_SIZE) == content[9 * PAGE_SIZE : 10 * PAGE_SIZE]
    # Overwrites, a partial write and a truncate free second-algorithm objects: counted out.
    fresh = pages("text", 3, 99)
    store.write(files[0], 2 * PAGE_SIZE, fresh)
    contents[0][2 * PAGE_SIZE : 5 * PAGE_SIZE] = fresh
    store.write(files[1], 100, b"x" * 10)
    contents[1][100:110] = b"x" * 10
    store.truncate(files[2], 7 * PAGE_SIZE)
    del contents[2][7 * PAGE_SIZE :]
    store.release(files[0])
    assert walk(store, files) == (store.recompressed_pages, store.recompressed_bytes)
    for data, content in zip(files[1:], contents[1:], strict=True):
        assert store.read(data, 0, len(content) + 1) == content
    store.pool.check()


@pytest.mark.parametrize("engine", ENGINES)
def test_reads_and_writes_clear_idle_and_seconds_count(engine: str) -> None:
    clock = Clock()
    store = make_store(engine, clock)
    data = FileData()
    content = pages("text", 10, 1)
    store.write(data, 0, content)
    clock.now += 10
    store.write(data, 9 * PAGE_SIZE, content[-PAGE_SIZE:])  # rewritten: new
    store.read(data, 2 * PAGE_SIZE, PAGE_SIZE)  # one page
    store.read(data, 5 * PAGE_SIZE, 2 * PAGE_SIZE)  # a batch of two
    clock.now += 3
    assert store.mark_idle(data, store.idle_cutoff(5)) == 6  # untouched for 13 s, not 3
    idle = sorted(page for page, entry in data.pages() if stamp_of(entry) == 0)
    assert idle == [0, 1, 3, 4, 7, 8]
    assert store.mark_idle(data, store.idle_cutoff(5)) == 0  # idle already
    assert store.recompress_chunk(data, 0, idle=True, huge=False) == 6
    busy = [page for page, entry in data.pages() if priority_of(entry) == 0]
    assert busy == [2, 5, 6, 9]
    assert store.mark_idle(data, store.idle_cutoff(None)) == 4  # all: the rest
    assert store.read(data, 0, len(content)) == content
    assert all(stamp_of(entry) for _page, entry in data.pages())  # the read touched them all


@pytest.mark.parametrize("engine", ENGINES)
def test_huge_pages_that_do_not_shrink_are_tried_once(engine: str) -> None:
    clock = Clock()
    store = make_store(engine, clock)
    data = FileData()
    content = pages("random", 3, 2) + pages("text", 3, 3)
    store.write(data, 0, content)
    assert store.huge_pages == 3
    assert store.recompress_chunk(data, 0, idle=False, huge=True) == 0
    flags = [(priority_of(e), bool(e & TRIED_BIT)) for _page, e in sorted(data.pages())]
    assert flags == [(0, True)] * 3 + [(0, False)] * 3  # text pages are not huge: untouched
    assert store.recompress_chunk(data, 0, idle=True, huge=True) == 0  # nothing idle
    store.mark_idle(data, store.idle_cutoff(None))
    assert store.recompress_chunk(data, 0, idle=True, huge=False) == 3  # the text pages
    assert store.recompress_chunk(data, 0, idle=True, huge=False) == 0  # tried or done
    store.write(data, 0, content[:PAGE_SIZE])  # a rewrite forgets "tried"
    assert not data.entry(0) & TRIED_BIT
    assert store.read(data, 0, len(content)) == content
    assert store.huge_pages == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_without_a_recomp_algorithm_nothing_changes(engine: str) -> None:
    store = make_store(engine, Clock(), recomp=None)
    data = FileData()
    store.write(data, 0, pages("text", 4, 4))
    store.mark_idle(data, store.idle_cutoff(None))
    table = {key: array("Q", chunk) for key, chunk in data.chunks.items()}
    with pytest.raises(ValueError, match="no recomp_algorithm"):
        store.recompress_chunk(data, 0, idle=True, huge=False)
    assert data.chunks == table
    assert list(store.algorithm_statistics()) == ["lz4"]


def test_a_recomp_algorithm_on_another_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="engine"):
        PageStore(
            create_pool("zsmalloc"),
            codec=Codec(engine=native.PYTHON),
            recomp_codec=Codec("zstd", engine=native.NATIVE),
        )


# -- the table loops of both engines --------------------------------------------------------

ENTRY = st.one_of(
    st.just(0),
    st.just(SAME_ENTRY),
    st.builds(
        lambda handle, stamp, tried, priority, huge: (
            object_entry(handle, stamp, huge) | tried * TRIED_BIT | priority << PRIORITY_SHIFT
        ),
        st.integers(1, HANDLE_MASK),
        st.integers(0, STAMP_MAX),
        st.booleans(),
        st.integers(0, 1),
        st.booleans(),
    ),
)
TABLES = [pagetable, importlib.import_module("zfs_ram._codec")]


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(ENTRY, max_size=40),
    stamp=st.integers(0, STAMP_MAX),
    cutoff=st.integers(0, STAMP_MAX),
    data=st.data(),
)
def test_touch_mark_idle_and_priorities_alike_on_both_engines(
    entries: list[int], stamp: int, cutoff: int, data: st.DataObject
) -> None:
    start = data.draw(st.integers(0, len(entries)))
    count = data.draw(st.integers(0, len(entries) - start))
    results = []
    for table in TABLES:
        chunk = array("Q", entries)
        table.touch(chunk, start, count, stamp)
        touched = list(chunk)
        marked = table.mark_idle(chunk, cutoff)
        out = bytearray(len(chunk))
        found = table.priorities_of(chunk, out)
        results.append((touched, marked, list(chunk), found, bytes(out)))
    assert results[0] == results[1]
    touched, marked, idle, found, priorities = results[0]
    for i, (before, after) in enumerate(zip(entries, touched, strict=True)):
        if before & 1 and start <= i < start + count:
            assert stamp_of(after) == stamp and handle_of(after) == handle_of(before)
            assert after & ~STAMP_FIELD == before & ~STAMP_FIELD  # nothing else changed
        else:
            assert after == before
    assert marked == sum(1 for e in touched if e & 1 and 0 < stamp_of(e) <= cutoff)
    assert [bool(e & 1) and stamp_of(e) == 0 for e in idle] == [
        bool(e & 1) and (stamp_of(e) == 0 or stamp_of(e) <= cutoff) for e in touched
    ]
    assert list(priorities) == [priority_of(e) if e & 1 else 0 for e in idle]
    assert found == sum(1 for p in priorities if p)
    for table in TABLES:
        with pytest.raises(ValueError):
            table.touch(array("Q", entries), 0, len(entries) + 1, stamp)
        with pytest.raises(ValueError):
            table.priorities_of(array("Q", entries), bytearray(len(entries) + 1))
