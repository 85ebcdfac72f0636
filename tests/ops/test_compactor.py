"""The background compactor's policy, on a real pool and trio's virtual clock (no mount).

While requests keep arriving, a pass waits until a larger share of the pool is reclaimable
(random overwrites refill most holes); once requests pause, the usual 1% threshold applies.
"""

from __future__ import annotations

import random

import trio
import trio.testing

from zfs_ram.daemon import compactor as compactor_module
from zfs_ram.daemon.compactor import (
    BUSY_SHARE_DIVISOR,
    HEAP_RELEASE_BYTES,
    REST_SECONDS,
    SETTLE_SECONDS,
    Compactor,
)
from zfs_ram.pool import Pool, ZsmallocPool, create_pool
from zfs_ram.pool.native import NativeZsmallocPool
from zfs_ram.pool.zsmalloc import obj_to_location

OBJECTS = 4000  # of 1000 bytes: a pool of 1000 pages, so 1% = 10 pages
BUSY_PAGES = 1000 // BUSY_SHARE_DIVISOR


def fragmented_pool(freed_share: float, sizes: tuple[int, ...] = (1000,)):  # type: ignore[no-untyped-def]
    pool = create_pool("zsmalloc")
    rng = random.Random(1)
    handles = [pool.store(bytes([i % 251]) * sizes[i % len(sizes)]) for i in range(OBJECTS)]
    for handle in rng.sample(handles, int(OBJECTS * freed_share)):
        pool.free(handle)
    return pool


def poured(pool: Pool) -> int:
    """Objects that live in a larger class than their own (compaction poured them up)."""
    lay = pool.mirror() if isinstance(pool, NativeZsmallocPool) else pool
    assert isinstance(lay, ZsmallocPool)
    locations = [obj_to_location(w) for w in lay.hloc if w & 1]
    return sum(1 for cid, _, _, size in locations if cid not in (0, lay._cid_of_size[size]))


def run_with_traffic(
    freed_share: float, busy_seconds: float, sizes: tuple[int, ...] = (1000,)
) -> dict[str, int]:
    """Requests every REST_SECONDS for busy_seconds, then quiet: reclaimable pages when the
    traffic stops (the kernel's count, and with the residue pouring may take), passes run by
    then, and reclaimable pages at the end."""
    pool = fragmented_pool(freed_share, sizes)
    requests = 0
    compactor = Compactor(pool, auto=True, min_pages=1, batch=4, activity=lambda: requests)
    seen: dict[str, int] = {}

    async def main() -> None:
        nonlocal requests
        async with trio.open_nursery() as nursery:
            nursery.start_soon(compactor.run)
            compactor.notify_freed()
            deadline = trio.current_time() + busy_seconds
            while trio.current_time() < deadline:
                requests += 1
                await trio.sleep(REST_SECONDS)
            seen["reclaimable"] = pool.can_compact(pour=False)
            seen["poured"] = poured(pool)
            seen["runs"] = compactor.statistics().runs
            await trio.sleep(10 * SETTLE_SECONDS)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    pool.check()
    seen["after"] = pool.can_compact()
    seen["poured_after"] = poured(pool)
    return seen


def test_traffic_defers_a_small_pass_until_quiet() -> None:
    seen = run_with_traffic(0.03, busy_seconds=1.0)
    assert seen["runs"] == 0 and 25 <= seen["reclaimable"] < BUSY_PAGES  # > 1%, < busy share
    assert seen["after"] == 0  # the pass came once the requests stopped


def test_a_large_share_is_compacted_under_traffic() -> None:
    seen = run_with_traffic(2 / BUSY_SHARE_DIVISOR, busy_seconds=1.0)
    assert seen["runs"] >= 1 and seen["reclaimable"] < BUSY_PAGES  # brought under it
    assert seen["after"] == 0


def test_passes_under_traffic_pour_nothing_the_quiet_one_pours() -> None:
    """The passes while requests come do the kernel's part only; the residue (each class's
    last partly used zspages) is poured into the larger class once requests pause."""
    seen = run_with_traffic(0.3, busy_seconds=1.0, sizes=(900, 1500))
    assert seen["runs"] >= 1 and seen["poured"] == 0
    assert seen["poured_after"] > 0 and seen["after"] == 0


def test_quiet_pool_compacts_a_small_share() -> None:
    seen = run_with_traffic(0.03, busy_seconds=0.0)
    assert seen["after"] == 0


def test_warm_frames_go_back_after_a_burst_of_frees() -> None:
    pool = create_pool("zsmalloc")
    handles = [pool.store(bytes([i % 251]) * 4096) for i in range(20)]  # a frame each
    for handle in handles:
        pool.free(handle)  # whole frames free: nothing to compact, all kept warm
    assert pool.statistics().warm_frames == 20 and pool.can_compact() == 0
    compactor = Compactor(pool, auto=True, min_pages=1, batch=4)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(compactor.run)
            compactor.notify_freed()
            await trio.sleep(3 * SETTLE_SECONDS)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert pool.statistics().warm_frames == 0 and pool.arena_rss_bytes() == 0
    assert compactor.statistics().runs == 0


def test_an_emptied_pool_gets_the_c_heap_trimmed_once_things_are_quiet() -> None:
    """The pool drops its tables when it empties; the compactor then has the C heap trimmed
    (malloc_trim on a mount), and only then: a pool with objects left is not trimmed."""
    pool = create_pool("zsmalloc")
    kept = pool.store(b"k" * 1000)
    handles = [pool.store(bytes([i % 251]) * 1000) for i in range(OBJECTS)]
    trims: list[int] = []
    compactor = Compactor(
        pool, auto=True, min_pages=1, batch=4, release_heap=lambda: trims.append(pool.objects)
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(compactor.run)
            for handle in handles:
                pool.free(handle)
            compactor.notify_freed()
            await trio.sleep(3 * SETTLE_SECONDS)
            assert trims == []  # one object left: the tables are still in use
            pool.free(kept)
            compactor.notify_freed()
            await trio.sleep(3 * SETTLE_SECONDS)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert trims == [0]
    pool.check()


def test_a_pass_that_packs_the_tables_has_the_c_heap_trimmed() -> None:
    """A delete of most objects, the survivors among the oldest: the settled pass packs the
    handle table (40k entries to 1k) and the zspage arrays, and the C heap is trimmed after
    it, while objects live."""
    pool = create_pool("zsmalloc")
    handles = [pool.store(bytes([i % 251]) * 300) for i in range(40000)]
    trims: list[int] = []
    compactor = Compactor(
        pool, auto=True, min_pages=1, batch=64, release_heap=lambda: trims.append(pool.objects)
    )
    peak = pool.metadata_bytes()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(compactor.run)
            for handle in handles[1000:]:
                pool.free(handle)
            compactor.notify_freed()
            await trio.sleep(20 * SETTLE_SECONDS)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    pool.check()
    assert trims == [1000]
    assert peak - pool.metadata_bytes() >= HEAP_RELEASE_BYTES


def test_a_quiet_look_far_below_the_peak_settles_the_pool_and_trims_the_c_heap(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """A mass delete that leaves too little reclaimable for a pass of its own (here whole
    zspages emptied, and min_pages high) still left the tables sized for the peak and their
    holes in the C heap: the first quiet look that finds the pool HEAP_RELEASE_PAGES below
    its peak runs one pass, which settles the pool and packs the tables, then has the heap
    trimmed; once, not again on the next look."""
    monkeypatch.setattr(compactor_module, "HEAP_RELEASE_PAGES", 300, raising=False)
    pool = ZsmallocPool()
    handles = [pool.store(bytes([i % 251]) * 3000) for i in range(1000)]
    trims: list[int] = []
    compactor = Compactor(
        pool, auto=True, min_pages=10**6, batch=64, release_heap=lambda: trims.append(pool.objects)
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(compactor.run)
            for handle in handles[:950]:  # the oldest go: whole zspages, nothing to move
                pool.free(handle)
            compactor.notify_freed()
            await trio.sleep(5 * SETTLE_SECONDS)
            compactor.notify_freed()  # nothing new freed: no second pass, no second trim
            await trio.sleep(5 * SETTLE_SECONDS)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    pool.check()
    assert pool.statistics().max_pages_used - pool.pages_used >= 300
    assert compactor.statistics().runs == 1 and pool._settled
    assert trims == [50]
