"""Unit tests of the zbud pool: buddy placement, first fit, frees, limits, check()."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from zfs_ram.pool import (
    PAGE_SIZE,
    InvalidHandleError,
    InvalidSizeError,
    PoolCorruptionError,
    PoolFullError,
    ZbudPool,
    create_pool,
)
from zfs_ram.pool.zbud import CHUNK_SIZE, NCHUNKS


@pytest.fixture
def pool() -> Iterator[ZbudPool]:
    p = create_pool("zbud")
    assert isinstance(p, ZbudPool)
    yield p
    p.close()


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def frame_of(pool: ZbudPool, h: int) -> int:
    return pool.hloc[h] >> 14


def test_interface_basics(pool: ZbudPool) -> None:
    assert pool.kind == "zbud" and pool.huge_class_size == 3633
    assert pool.class_statistics() == []
    assert pool.can_compact() == 0 and pool.compact_step(100) == 0 and pool.compact() == 0
    assert (NCHUNKS, CHUNK_SIZE) == (64, 64)


def test_two_buddies_share_a_frame_left_and_right(pool: ZbudPool) -> None:
    a = pool.store(payload(1000, 1))  # 16 chunks, first buddy at offset 0
    b = pool.store(payload(2000, 2))  # 32 chunks, last buddy ends at the frame's end
    assert frame_of(pool, a) == frame_of(pool, b)
    assert pool.statistics().pages_used == 1
    f = frame_of(pool, a)
    seg = pool.arena.segments[0]
    base = f * PAGE_SIZE
    assert seg[base : base + 1000] == payload(1000, 1)
    assert seg[base + PAGE_SIZE - 2048 : base + PAGE_SIZE - 48] == payload(2000, 2)
    c = pool.store(payload(500, 3))  # the frame is buddied: a new frame
    assert frame_of(pool, c) != f
    pool.check()
    assert pool.read(a) == payload(1000, 1) and pool.read(b) == payload(2000, 2)


def test_first_fit_takes_the_smallest_sufficient_free_space(pool: ZbudPool) -> None:
    big = pool.store(payload(3000, 0))  # frame X: 47 chunks used, 17 free
    mid = pool.store(payload(2000, 1))  # 32 chunks: does not fit X, frame Y with 32 free
    assert frame_of(pool, big) != frame_of(pool, mid)
    small = pool.store(payload(700, 2))  # 11 chunks: X (17 free) is the first fit, not Y (32)
    assert frame_of(pool, small) == frame_of(pool, big)
    pool.check()


def test_a_page_sized_object_takes_a_frame_alone(pool: ZbudPool) -> None:
    h = pool.store(payload(PAGE_SIZE, 0))
    t = pool.store(payload(40, 1))
    assert frame_of(pool, h) != frame_of(pool, t)
    assert pool.statistics().huge_objects == 1
    pool.check()


def test_frame_freed_when_both_buddies_go(pool: ZbudPool) -> None:
    a = pool.store(payload(1000, 1))
    b = pool.store(payload(1000, 2))
    pool.free(a)
    assert pool.statistics().pages_used == 1
    pool.check()
    rss = pool.arena_rss_bytes()
    pool.free(b)
    assert pool.statistics().pages_used == 0
    assert pool.arena_rss_bytes() == rss  # kept warm for the next page ...
    assert pool.trim() == 1
    assert pool.arena_rss_bytes() == rss - PAGE_SIZE  # ... until trimmed
    pool.check()
    c = pool.store(payload(1000, 3))  # the freed frame is reused, and reads back fine
    assert pool.read(c) == payload(1000, 3) and pool.statistics().free_frames == 0


def test_bad_input(pool: ZbudPool) -> None:
    for size in (0, PAGE_SIZE + 1):
        with pytest.raises(InvalidSizeError):
            pool.malloc(size)
    h = pool.store(b"abc")
    with pytest.raises(InvalidSizeError):
        pool.write(h, b"abcd")
    pool.free(h)
    for bad in (0, -5, h, 999):
        with pytest.raises(InvalidHandleError):
            pool.read(bad)
        with pytest.raises(InvalidHandleError):
            pool.free(bad)
    pool.check()


def test_write_to_last_buddy_lands_in_place(pool: ZbudPool) -> None:
    a = pool.store(b"A" * 100)
    b = pool.malloc(100)
    pool.write(b, b"B" * 100)
    pool.write(b, b"xy")
    assert pool.read(b) == b"xy" + b"B" * 98 and pool.read(a) == b"A" * 100


def test_mem_limit_pages(pool: ZbudPool) -> None:
    pool.mem_limit_pages = 3
    stored = {}
    with pytest.raises(PoolFullError):
        for i in range(100):
            d = payload(1500, i)
            stored[pool.store(d)] = d
    assert len(stored) == 6 and pool.statistics().pages_used == 3
    pool.check()
    assert all(pool.read(h) == d for h, d in stored.items())


def test_random_workload_keeps_data(pool: ZbudPool) -> None:
    rng = random.Random(5)
    keep: dict[int, bytes] = {}
    for i in range(3000):
        if keep and rng.random() < 0.4:
            h = rng.choice(list(keep))
            pool.free(h)
            del keep[h]
        else:
            d = payload(rng.randint(1, PAGE_SIZE), i)
            keep[pool.store(d)] = d
    pool.check()
    assert all(pool.read(h) == d for h, d in keep.items())
    s = pool.statistics()
    assert s.objects == len(keep) and s.bytes_stored == sum(map(len, keep.values()))
    assert s.pages_used <= s.objects  # never worse than one object per frame


def _corrupt_chunks(p: ZbudPool) -> None:
    f = next(f for f in range(len(p._first)) if p._first[f])
    p._first[f] += 1


def _corrupt_list(p: ZbudPool) -> None:
    k = (p._mask & -p._mask).bit_length() - 1
    p._next[p._heads[k]] = p._heads[k]


def _corrupt_handle(p: ZbudPool) -> None:
    h = next(h for h in range(1, len(p.hloc)) if p.hloc[h] & 1)
    p.hloc[h] ^= 1 << 13  # first <-> last buddy


def _corrupt_mask(p: ZbudPool) -> None:
    p._mask ^= 1 << 1


def _corrupt_free_frame(p: ZbudPool) -> None:
    live = next(h for h in range(1, len(p.hloc)) if p.hloc[h] & 1)
    p.arena.free_frames.append(p.hloc[live] >> 14)


@pytest.mark.parametrize(
    "corrupt", [_corrupt_chunks, _corrupt_list, _corrupt_handle, _corrupt_mask, _corrupt_free_frame]
)
def test_check_catches_corruption(corrupt) -> None:
    p = ZbudPool()
    try:
        rng = random.Random(1)
        hs = [p.store(payload(rng.randint(100, 3000), i)) for i in range(100)]
        for h in hs[::4]:
            p.free(h)
        p.check()
        corrupt(p)
        with pytest.raises(PoolCorruptionError):
            p.check()
    finally:
        p.close()
