"""Memory facts measured from outside the pool: Rss after compaction, metadata per object."""

from __future__ import annotations

import random
import sys

import pytest
from pool_engines import KINDS, layout, make, make_kind

from zfs_ram.codec import PARALLEL_MIN_PAGES, Codec
from zfs_ram.pool import PAGE_SIZE, Pool, ZbudPool, arena_rss_bytes
from zfs_ram.pool import native as native_pool
from zfs_ram.pool.native import NativeZsmallocPool

MiB = 1 << 20


def realistic_sizes(n: int, seed: int) -> list[int]:
    """Sizes shaped like lz4 output of real file pages (research notes, /usr workload): about a
    quarter incompressible (stored raw, 4096 B), the rest spread over the classes with most
    between 1 and 3 KiB."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.25:
            out.append(PAGE_SIZE)
        else:
            out.append(min(3632, max(32, int(rng.lognormvariate(7.3, 0.6)))))
    return out


def fill(pool: Pool, sizes: list[int], seed: int) -> list[int]:
    rng = random.Random(seed)
    block = rng.randbytes(PAGE_SIZE)
    return [pool.store(block[:n]) for n in sizes]


@pytest.mark.parametrize("kind", KINDS)
def test_rss_follows_pages_used_after_free_and_compaction(kind: str) -> None:
    pool = make_kind(kind)
    try:
        sizes = realistic_sizes(16000, 1)  # about 40 MiB of objects
        hs = fill(pool, sizes, 2)
        filled = pool.statistics()
        assert filled.bytes_stored > 30 * MiB
        rss_full = pool.arena_rss_bytes()
        assert abs(rss_full - filled.pages_used * PAGE_SIZE) <= 0.02 * rss_full
        rng = random.Random(3)
        for h in rng.sample(hs, int(len(hs) * 0.75)):
            pool.free(h)
        pool.compact()
        pool.check()
        s = pool.statistics()
        rss = pool.arena_rss_bytes()
        assert abs(rss - s.pages_used * PAGE_SIZE) <= 0.02 * s.pages_used * PAGE_SIZE
        assert rss < 0.5 * rss_full  # the freed frames really left the process
        assert arena_rss_bytes(pool) == rss
        assert arena_rss_bytes() >= rss  # all live arenas together
        if kind != "zbud":
            assert s.pages_compacted > 0 and s.freeable_pages == 0
    finally:
        pool.close()
    assert pool.arena_rss_bytes() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_at_most_32_bytes_per_object_realistic_fill(kind: str) -> None:
    pool = make_kind(kind)
    try:
        fill(pool, realistic_sizes(20000, 4), 5)
        s = pool.statistics()
        assert s.metadata_bytes == pool.metadata_bytes()
        assert s.metadata_bytes / s.objects <= 32
    finally:
        pool.close()


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_at_most_32_bytes_per_object_all_huge(kind: str) -> None:
    pool = make_kind(kind)
    try:
        fill(pool, [PAGE_SIZE] * 20000, 6)
        s = pool.statistics()
        assert s.huge_objects == s.objects == s.pages_used == 20000
        assert s.metadata_bytes / s.objects <= 32
    finally:
        pool.close()


@pytest.mark.parametrize("engine", ["python", "native"])
def test_fill_ratio_is_dense(engine: str) -> None:
    pool = make(engine)
    try:
        fill(pool, realistic_sizes(20000, 7), 8)
        s = pool.statistics()
        # Slot rounding (objects are not class-sized here) plus the one partly filled zspage
        # per class, about 1 MiB in all: 3.6% of this 46 MiB pool, 2% of the kernel's 250 MiB.
        assert s.pool_bytes / s.bytes_stored <= 1.045
    finally:
        pool.close()


@pytest.mark.parametrize("kind", KINDS)
def test_an_emptied_pool_drops_its_tables_and_still_works(kind: str) -> None:
    """Handles and zspage numbers cannot be renumbered while objects live, so the tables keep
    their peak length; but once everything is freed (an rm of everything) they start afresh,
    instead of keeping ~12 bytes per object ever held."""
    pool = make_kind(kind)
    try:
        fresh = pool.metadata_bytes()
        sizes = realistic_sizes(20000, 9)
        handles = fill(pool, sizes, 10)
        peak = pool.metadata_bytes()
        assert peak - fresh >= 8 * len(handles)  # the handle table, at least
        peak_table = sys.getsizeof(pool.hloc) if isinstance(pool, ZbudPool) else 0
        for handle in handles:
            pool.free(handle)
        pool.check()
        after = pool.metadata_bytes()
        if isinstance(pool, ZbudPool):
            assert len(pool.hloc) == 1 and pool.objects == 0
            assert sys.getsizeof(pool.hloc) < peak_table // 100  # the handle table went
        else:  # and the per-zspage arrays: what stays is the frame stack
            assert len(layout(pool).hloc) == 1 and pool.objects == 0
            assert after - fresh <= (peak - fresh) // 4, (fresh, peak, after)
        # The fresh tables work: objects stored again read back, in every class.
        again = {
            pool.store(bytes([i % 251]) * size): (i, size) for i, size in enumerate(sizes[:3000])
        }
        for handle, (i, size) in again.items():
            assert pool.read(handle) == bytes([i % 251]) * size
        pool.check()
    finally:
        pool.close()


@pytest.mark.parametrize("engine", ["python", "native"])
def test_a_mass_delete_with_survivors_gives_the_tables_back(engine: str) -> None:
    """Handles cannot be renumbered, but zspages can: once compaction has settled the pool
    after a delete of 90 % (the survivors among the older half), the zspage arrays hold only
    live zspages, the handle table ends at its highest live handle, and low handles are
    reissued first, so that the table stays as short as the survivors allow."""
    pool = make(engine)
    try:
        fresh = pool.metadata_bytes()
        sizes = realistic_sizes(20000, 11)
        handles = fill(pool, sizes, 12)
        peak = pool.metadata_bytes()
        rng = random.Random(13)
        survivors = sorted(rng.sample(handles[:10000], 2000))  # of the older files
        for handle in set(handles) - set(survivors):
            pool.free(handle)
        assert pool.metadata_bytes() >= peak - 64 * 1024  # freeing alone keeps the tables
        pool.compact()
        pool.check()
        lay = layout(pool)
        assert len(lay.hloc) == survivors[-1] + 1  # cut after the highest live handle
        assert all(len(c.free_zs) == 0 for c in lay._classes)  # zspages renumbered low
        assert sum(len(c.inuse) for c in lay._classes) == lay._zspages
        after = pool.metadata_bytes()
        assert after - fresh <= (peak - fresh) // 2, (fresh, peak, after)
        # Low handles first: the next stores fill the lowest free numbers, in order.
        live = set(survivors)
        free_low = [h for h in range(1, survivors[-1]) if h not in live][:100]
        assert [pool.store(b"x" * 300) for _ in range(100)] == free_low
        assert all(pool.read(h) == b"x" * 300 for h in free_low)
        pool.check()
    finally:
        pool.close()


@pytest.mark.parametrize("engine", ["python", "native"])
def test_rss_is_frames_in_use_plus_warm_after_batches_and_compaction(engine: str) -> None:
    """The batch calls and compaction may give freed frames back in one go at their end, but
    by the time they return, every frame not in use or warm has left the process."""
    pool = make(engine)
    try:
        sizes = realistic_sizes(6000, 11)
        rng = random.Random(12)
        block = rng.randbytes(PAGE_SIZE)
        handles = list(pool.store_many(b"".join(block[:n] for n in sizes), sizes))

        def resident_as_counted() -> None:
            s = pool.statistics()
            assert pool.arena_rss_bytes() == (s.pages_used + s.warm_frames) * PAGE_SIZE

        resident_as_counted()
        pool.free_many(rng.sample(handles, len(handles) // 2))
        resident_as_counted()
        while pool.compact_step(100):
            resident_as_counted()
        pool.compact()
        resident_as_counted()
        assert pool.statistics().warm_frames == 0
        pool.check()
    finally:
        pool.close()


def test_a_mass_delete_with_survivors_gives_the_free_runs_pages_back() -> None:
    """After whole files are deleted (a file's pages took consecutive handles), the settled
    pool chains its free handles in runs whose zero words' pages go back to the OS, and keeps
    its free frames as runs, its stack's pages past the top given back too. Before, both
    tables stayed resident at their peak (1 GiB written, 90 % deleted: 2.0 + 0.55 MiB)."""
    if not native_pool.BUILT:
        pytest.skip("the compiled engine is not built")
    pool = make("native")
    assert isinstance(pool, NativeZsmallocPool)
    try:
        rng = random.Random(21)
        files: list[list[int]] = []
        block = rng.randbytes(PAGE_SIZE)
        while sum(len(f) for f in files) < 64000:
            files.append([pool.store(block[: rng.randint(600, 1500)]) for _ in range(1152)])
        doomed = rng.sample(range(len(files)), len(files) * 9 // 10)
        for i in doomed:
            for h in files[i]:
                pool.free(h)
        live = {h for i in set(range(len(files))) - set(doomed) for h in files[i]}
        before = pool._table_resident()
        pool.compact()
        # Before check(): its export reads every word, and mincore counts the zero page that
        # reading a released page maps (no RSS) as resident.
        tables = pool._table_resident()
        free_stack = pool.free_frame_count * 4
        pool.check()
        assert before["handles_resident"] >= 0.9 * before["handles"]  # freeing alone kept it
        assert before["free_frames_resident"] >= free_stack  # and the free stack
        assert tables["handles_resident"] <= 0.4 * tables["handles"], tables
        assert tables["free_frames_resident"] <= 0.4 * free_stack, (tables, free_stack)
        # The runs are reissued as the chain was: the lowest free handles first, in order.
        free_low = [h for h in range(1, max(live)) if h not in live][:3000]
        assert [pool.store(block[:700]) for _ in range(3000)] == free_low
        pool.check()
    finally:
        pool.close()


def test_the_codec_helper_thread_keeps_nothing_of_a_batch() -> None:
    """A large batch is encoded half on the codec's helper thread; the task it ran (and the
    caller's pages in its closure, a write's whole buffer) must not outlive the batch: it
    kept up to 1 MiB alive until the next batch (seen in the daemon after a 1 GiB write)."""
    codec = Codec("lz4")
    if codec.compiled is None:
        pytest.skip("the helper thread serves the compiled codec only")
    pages = bytearray(random.Random(31).randbytes(PAGE_SIZE // 2) * 2 * PARALLEL_MIN_PAGES * 2)
    blob, sizes, _ = codec.encode(pages, PAGE_SIZE)
    assert len(sizes) == 2 * PARALLEL_MIN_PAGES and len(blob) < len(pages)
    pages.extend(b"x")  # BufferError while anything still holds a view of the pages
