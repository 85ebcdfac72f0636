"""The compiled engine gives freed frames back in batches (process_madvise), or run by run
(madvise) where the kernel refuses that: either way, once a batch call or a compaction pass
returns, every frame not in use or warm has left the process."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from pool_engines import make

from zfs_ram.pool import PAGE_SIZE


@pytest.fixture(params=[True, False], ids=["process_madvise", "madvise"])
def batching(request: pytest.FixtureRequest) -> Iterator[bool]:
    _zsmalloc = pytest.importorskip("zfs_ram.pool._zsmalloc")
    before = _zsmalloc.batch_madvise()
    _zsmalloc.batch_madvise(request.param)
    try:
        yield request.param
    finally:
        _zsmalloc.batch_madvise(before)


def test_freed_frames_leave_the_process_by_either_path(batching: bool) -> None:
    pool = make("native")
    try:
        rng = random.Random(5)
        block = rng.randbytes(PAGE_SIZE)
        # Scattered frees of mixed sizes: the frames a pass empties are mostly not adjacent,
        # so a flush has thousands of separate ranges (more than one batch of 1024).
        sizes = [
            rng.choice((rng.randint(200, 1500), rng.randint(1500, 3600))) for _ in range(30000)
        ]
        handles = list(pool.store_many(b"".join(block[:n] for n in sizes), sizes))
        full = pool.arena_rss_bytes()
        pool.free_many(rng.sample(handles, len(handles) * 3 // 4))
        pool.compact()
        s = pool.statistics()
        assert pool.arena_rss_bytes() == (s.pages_used + s.warm_frames) * PAGE_SIZE
        assert pool.arena_rss_bytes() < 0.4 * full
        pool.check()
    finally:
        pool.close()
