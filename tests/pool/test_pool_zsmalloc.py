"""Unit tests of the zsmalloc pool: class table, layout, fullness, limits, compaction, check()."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from pool_engines import ENGINES, layout, make, poke

from zfs_ram.pool import (
    PAGE_SIZE,
    InvalidHandleError,
    InvalidSizeError,
    Pool,
    PoolCorruptionError,
    PoolError,
    PoolFullError,
    build_classes,
    create_pool,
)
from zfs_ram.pool.classes import NUM_CLASSES, chain_size, class_index
from zfs_ram.pool.frames import WARM_FRAMES
from zfs_ram.pool.zsmalloc import NOFRAME, POUR_SLACK_PERCENT, fullness_group


@pytest.fixture(params=ENGINES)
def pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    p = make(request.param)
    yield p
    p.close()


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def class_row(pool: Pool, size: int):
    """The class_statistics() row of the class that a request of `size` bytes lands in."""
    rows = [r for r in pool.class_statistics() if r.size >= size]
    return min(rows, key=lambda r: r.size)


# -- the class table ---------------------------------------------------------------------------


def test_class_table_matches_the_kernel_with_chain_8() -> None:
    distinct, table, huge = build_classes()
    assert NUM_CLASSES == 255 and len(table) == 255
    assert len(distinct) == 119
    assert huge == 3633  # kernel: 3625, plus the 8-byte in-object header we do not keep
    pages = sorted({c.pages_per_zspage for c in distinct})
    assert pages == list(range(1, 9))


@pytest.mark.parametrize(("chain", "count"), [(4, 69), (8, 119), (16, 192)])
def test_class_count_for_other_chain_sizes(chain: int, count: int) -> None:
    assert len(build_classes(chain)[0]) == count


@pytest.mark.parametrize(
    ("size", "pages", "objs"),
    [(1568, 5, 13), (4096, 1, 1), (2048, 1, 2), (32, 1, 128), (48, 3, 256), (3632, 8, 9)],
)
def test_class_spot_checks(size: int, pages: int, objs: int) -> None:
    _, table, _ = build_classes()
    c = table[class_index(size)]
    assert (c.size, c.pages_per_zspage, c.objs_per_zspage) == (size, pages, objs)


def test_small_requests_round_up_to_32_and_merged_classes_round_up() -> None:
    _, table, _ = build_classes()
    assert table[class_index(1)].size == 32
    # Everything from the watermark up is one merged 4096-byte huge class.
    assert {table[class_index(s)].size for s in range(3633, 4097)} == {4096}
    assert chain_size(1568) == 5 and chain_size(1024) == 1


def test_fullness_groups_follow_the_kernel() -> None:
    assert fullness_group(0, 13) == 0
    assert fullness_group(13, 13) == 11
    assert fullness_group(1, 127) == 1  # 0.8% is in the first 10% bucket, not "empty"
    assert fullness_group(12, 13) == 10  # 92%
    assert fullness_group(5, 10) == 6  # exactly 50% -> 50..60% bucket


def test_huge_class_size_and_huge_objects(pool: Pool) -> None:
    assert pool.huge_class_size == 3633
    a = pool.store(payload(3632, 1))
    assert pool.statistics().huge_objects == 0
    b = pool.store(payload(3633, 2))
    c = pool.store(payload(4096, 3))
    s = pool.statistics()
    assert s.huge_objects == 2
    assert class_row(pool, 4096).obj_used == 2 and class_row(pool, 4096).pages_used == 2
    assert pool.read(b) == payload(3633, 2) and pool.read(c) == payload(4096, 3)
    pool.free(b)
    pool.free(c)
    # The 3632-byte class has 8-frame zspages, but frames are made only as slots need them.
    assert pool.statistics().pages_used == 1
    pool.free(a)
    assert pool.statistics().pages_used == 0
    pool.check()


def test_class_statistics_has_one_row_per_distinct_class(pool: Pool) -> None:
    rows = pool.class_statistics()
    assert len(rows) == 119
    assert [r.index for r in rows] == sorted(r.index for r in rows)
    assert all(len(r.inuse_histogram) == 11 for r in rows)  # 10%..90%, 99%, 100%


# -- storage and layout ------------------------------------------------------------------------


def test_store_read_round_trip_all_sizes(pool: Pool) -> None:
    sizes = range(1, PAGE_SIZE + 1, 7)  # 1, 8, ..., 4096: every class, huge included
    assert sizes[-1] == PAGE_SIZE
    handles = {pool.store(payload(n, n)): n for n in sizes}
    pool.check()
    for h, n in handles.items():
        assert pool.object_size(h) == n
        assert pool.read(h) == payload(n, n)
    assert min(handles) >= 1


def test_malloc_then_partial_and_full_writes(pool: Pool) -> None:
    h = pool.malloc(100)
    pool.write(h, b"x" * 100)
    pool.write(h, b"abc")
    assert pool.read(h) == b"abc" + b"x" * 97
    pool.write(h, bytearray(b"z" * 100))
    pool.write(h, memoryview(b"q" * 10))
    assert pool.read(h) == b"q" * 10 + b"z" * 90


def test_objects_straddle_non_adjacent_frames(pool: Pool) -> None:
    # Scatter the free-frame list: huge objects in frames 0..19, free every other one, so the
    # next 5-frame zspage is built from frames that are not neighbours in the arena.
    huge = [pool.store(bytes([i]) * PAGE_SIZE) for i in range(20)]
    for h in huge[::2]:
        pool.free(h)
    objs = {pool.store(payload(1568, i)): i for i in range(13)}  # one full 5-page zspage
    lay = layout(pool)
    c = lay._classes[lay._cid_of_size[1568]]
    frames = list(c.frames[0:5])
    assert all(abs(a - b) > 1 for a, b in zip(frames, frames[1:], strict=False))
    # Slot 2 spans bytes 3136..4704 of the zspage: it straddles frames 0 and 1.
    assert (2 * 1568) // PAGE_SIZE != (3 * 1568 - 1) // PAGE_SIZE
    pool.check()
    for h, i in objs.items():
        assert pool.read(h) == payload(1568, i)
    for h in huge[1::2]:
        assert pool.read(h)[0] == huge.index(h)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -1, PAGE_SIZE + 1, 1 << 20])
def test_bad_sizes_are_refused(pool: Pool, size: int) -> None:
    with pytest.raises(InvalidSizeError):
        pool.malloc(size)
    with pytest.raises(ValueError):
        pool.malloc(size)
    pool.check()


def test_empty_and_oversized_store_refused(pool: Pool) -> None:
    with pytest.raises(InvalidSizeError):
        pool.store(b"")
    with pytest.raises(InvalidSizeError):
        pool.store(bytes(PAGE_SIZE + 1))
    assert pool.statistics().objects == 0


def test_bad_handles_are_refused(pool: Pool) -> None:
    h = pool.store(b"hello")
    for bad in (0, -1, h + 1, 1 << 40):
        for op in (pool.read, pool.free, pool.object_size):
            with pytest.raises(InvalidHandleError):
                op(bad)
    pool.free(h)
    with pytest.raises(InvalidHandleError):
        pool.free(h)
    with pytest.raises(InvalidHandleError):
        pool.read(h)
    with pytest.raises(InvalidHandleError):
        pool.write(h, b"x")
    assert issubclass(InvalidHandleError, PoolError)
    pool.check()


def test_write_longer_than_object_refused(pool: Pool) -> None:
    h = pool.store(b"0123456789")
    with pytest.raises(InvalidSizeError):
        pool.write(h, b"x" * 11)
    with pytest.raises(ValueError):
        pool.write(h, b"x" * 11)
    assert pool.read(h) == b"0123456789"


def test_unknown_kind_refused() -> None:
    with pytest.raises(ValueError, match="unknown pool kind"):
        create_pool("z3fold")
    for engine in ENGINES:
        with pytest.raises(ValueError):
            make(engine, mem_limit_pages=-1)


# -- mem_limit ---------------------------------------------------------------------------------


def test_mem_limit_pages_refuses_without_damage(pool: Pool) -> None:
    pool.mem_limit_pages = 20
    stored: dict[int, bytes] = {}
    with pytest.raises(PoolFullError):
        for i in range(10_000):
            d = payload(1568, i)
            stored[pool.store(d)] = d
    s = pool.statistics()
    assert s.pages_used == 20 == s.max_pages_used  # four whole 5-page zspages, nothing half made
    assert s.objects == len(stored) == 4 * 13
    pool.check()
    # A 3632-byte object needs a fresh 8-page zspage: refused; a 1-page class cannot fit either.
    with pytest.raises(PoolFullError):
        pool.malloc(3632)
    with pytest.raises(PoolFullError):
        pool.store(bytes(PAGE_SIZE))
    pool.check()
    assert all(pool.read(h) == d for h, d in stored.items())
    pool.mem_limit_pages = 0  # unlimited again, at runtime
    pool.store(bytes(PAGE_SIZE))
    assert pool.statistics().pages_used == 21


def test_mem_limit_pages_counts_frames_as_slots_reach_them(pool: Pool) -> None:
    first = pool.store(payload(1568, 0))
    assert pool.statistics().pages_used == 1  # a fresh 5-frame zspage holds one frame
    pool.mem_limit_pages = 1
    pool.store(payload(1568, 1))  # slot 1 (1568..3135) lies in frame 0
    with pytest.raises(PoolFullError):
        pool.store(payload(1568, 2))  # slot 2 straddles into frame 1
    pool.mem_limit_pages = 5
    more = [pool.store(payload(1568, i)) for i in range(2, 13)]  # the zspage's other slots
    with pytest.raises(PoolFullError):
        pool.store(payload(1568, 13))  # a second zspage would need a sixth frame
    assert len(more) == 11 and pool.read(first) == payload(1568, 0)
    assert pool.statistics().pages_used == 5
    pool.check()


def test_max_pages_and_reset(pool: Pool) -> None:
    hs = [pool.store(bytes(PAGE_SIZE)) for _ in range(10)]
    for h in hs[:7]:
        pool.free(h)
    s = pool.statistics()
    assert (s.pages_used, s.max_pages_used) == (3, 10)
    pool.reset_max_pages()
    assert pool.statistics().max_pages_used == 3


# -- fullness and allocation policy ------------------------------------------------------------


def test_allocation_goes_to_the_fullest_non_full_zspage(pool: Pool) -> None:
    hs = [pool.store(payload(1568, i)) for i in range(39)]  # three full 13-object zspages
    a, b, c = hs[0:13], hs[13:26], hs[26:39]
    for h in a[:10]:
        pool.free(h)  # zspage A: 3/13 = 23% -> group 3 (20-30%)
    for h in b[:3]:
        pool.free(h)  # zspage B: 10/13 = 76% -> group 8 (70-80%)
    for h in c[:6]:
        pool.free(h)  # zspage C: 7/13 = 53% -> group 6
    row = class_row(pool, 1568)
    assert row.inuse_histogram == (0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0)
    pool.store(payload(1568, 99))  # must land in B: 11/13 = 84% -> group 9
    row = class_row(pool, 1568)
    assert row.inuse_histogram == (0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0)
    assert row.obj_used == 3 + 11 + 7 and row.obj_allocated == 39
    pool.check()


def test_zspage_is_freed_with_its_last_object(pool: Pool) -> None:
    hs = [pool.store(payload(1568, i)) for i in range(14)]  # 1 full zspage + 1 object
    assert pool.statistics().pages_used == 6  # the second zspage has made one frame so far
    pool.free(hs[13])
    assert pool.statistics().pages_used == 5
    for h in hs[:12]:
        pool.free(h)
        assert pool.statistics().pages_used == 5
    rss_before = pool.arena_rss_bytes()
    pool.free(hs[12])
    s = pool.statistics()
    # Freed frames stay warm (resident) for the next zspage, up to WARM_FRAMES; trim() or the
    # compactor gives them back.
    assert s.pages_used == 0 and (s.free_frames, s.warm_frames) == (0, 6)
    assert pool.arena_rss_bytes() == rss_before
    pool.check()
    assert pool.trim() == 6
    s = pool.statistics()
    assert (s.free_frames, s.warm_frames) == (6, 0)
    assert pool.arena_rss_bytes() == rss_before - 6 * PAGE_SIZE
    pool.check()


def test_frames_beyond_the_warm_reserve_leave_at_once(pool: Pool) -> None:
    hs = [pool.store(payload(PAGE_SIZE, i)) for i in range(WARM_FRAMES + 50)]  # a frame each
    rss_full = pool.arena_rss_bytes()
    assert rss_full == len(hs) * PAGE_SIZE
    for h in hs:
        pool.free(h)
    assert pool.arena_rss_bytes() == WARM_FRAMES * PAGE_SIZE  # only the warm ones stay
    again = [pool.store(payload(PAGE_SIZE, -i)) for i in range(WARM_FRAMES)]
    assert pool.arena_rss_bytes() == WARM_FRAMES * PAGE_SIZE  # reused, no new memory
    assert all(pool.read(h) == payload(PAGE_SIZE, -i) for i, h in enumerate(again))
    pool.check()
    for h in again:
        pool.free(h)
    pool.trim()
    assert pool.arena_rss_bytes() == 0
    pool.check()


# -- compaction --------------------------------------------------------------------------------


def test_compaction_frees_the_emptiest_zspages(pool: Pool) -> None:
    hs = [pool.store(payload(1568, i)) for i in range(39)]
    keep = {h: payload(1568, i) for i, h in enumerate(hs)}
    lay = layout(pool)
    c = lay._classes[lay._cid_of_size[1568]]
    frames_of = [set(c.frames[z * 5 : z * 5 + 5]) for z in range(3)]
    for h in hs[0:11] + hs[13:18] + hs[26:30]:  # A: 2 left, B: 8 left, C: 9 left
        pool.free(h)
        del keep[h]
    assert class_row(pool, 1568).freeable == 5  # 20 free slots: one whole zspage's worth
    # Until compaction settles the pool, its count is the larger of that and the frames held
    # beyond a dense packing: 19 objects need 19 * 5 / 13 = 7.3 frames and hold 15.
    assert pool.can_compact() == 7
    freed = pool.compact()
    # The kernel's pass frees A (5 frames); then B, whose slots 0-4 are free, gives back its
    # first frame, which no live slot reaches into (slot 2 starts in it and is free too).
    assert freed == 6
    s = pool.statistics()
    assert s.pages_compacted == 6 and s.objects_moved == 2 and s.pages_used == 9
    # Settled, the class's arrays are packed: C moved into A's number 0, B kept 1.
    b = layout(pool)._classes[c.cid]
    assert len(b.inuse) == 2 and list(b.inuse) == [11, 8]
    assert [b.frames[5 * z] == NOFRAME for z in (1, 0)] == [True, False]
    assert s.bytes_moved == 2 * 1568 and s.freeable_pages == 0
    assert frames_of[0] <= set(layout(pool).arena.free_frames)  # A, the emptiest, is gone
    assert pool.compact() == 0
    pool.check()
    assert all(pool.read(h) == d for h, d in keep.items())


def test_compact_step_is_bounded_and_ends_with_zero(pool: Pool) -> None:
    rng = random.Random(7)
    keep: dict[int, bytes] = {}
    for i in range(3000):
        d = payload(rng.randint(40, 3600), i)
        keep[pool.store(d)] = d
    for h in rng.sample(sorted(keep), 2200):
        pool.free(h)
        del keep[h]
    before = pool.statistics()
    assert before.freeable_pages > 0
    total = 0
    while True:
        n = pool.compact_step(17)
        assert 0 <= n <= 17
        pool.check()
        if n == 0:
            break
        total += n
    after = pool.statistics()
    assert after.objects_moved == total and after.freeable_pages == 0
    assert after.pages_used == before.pages_used - after.pages_compacted
    assert after.pages_compacted > 0
    assert pool.compact_step() == 0 and pool.compact_step(0) == 0
    assert all(pool.read(h) == d for h, d in keep.items())


def test_compaction_pours_a_sparse_class_into_free_slots_of_a_larger_one(pool: Pool) -> None:
    """The kernel keeps the last partly used zspage of every class. Here the one 1568-byte
    object, alone in its zspage's frame, moves into slot 3 of the 1712 class's zspage, whose
    frame is already made: one frame comes back, none is made, the handle stays valid and
    names the larger class, and the object keeps its size."""
    big = [pool.store(payload(1700, i)) for i in range(3)]  # slots 0-2: two frames, 3 is free
    h = pool.store(payload(1568, 9))
    assert pool.statistics().pages_used == 3
    assert class_row(pool, 1568).freeable == 0  # nothing for the kernel's pass
    assert pool.can_compact() == 1  # the estimate: 1 frame beyond a dense packing
    assert pool.compact() == 1
    s = pool.statistics()
    assert (s.pages_used, s.objects_moved, s.bytes_moved, s.freeable_pages) == (2, 1, 1568, 0)
    assert pool.object_size(h) == 1568 and pool.read(h) == payload(1568, 9)
    lay = layout(pool)
    assert lay.hloc[h] >> 13 & 0xFF == lay._cid_of_size[1700]  # the class field of the word
    assert class_row(pool, 1712).obj_used == 4 and class_row(pool, 1568).obj_used == 0
    assert [pool.read(b) for b in big] == [payload(1700, i) for i in range(3)]
    pool.check()
    pool.free(big[0])  # a free unsettles the pool: the next pass looks again
    assert pool.compact_step() == 0 and pool.can_compact() == 0
    pool.check()


def test_pouring_stops_at_twice_the_objects_size(pool: Pool) -> None:
    """A 700-byte object may not take a 1712-byte slot (more than POUR_SLACK_PERCENT = 100
    larger): it stays in its own class, and the settled pool counts nothing reclaimable."""
    assert POUR_SLACK_PERCENT == 100
    for i in range(3):
        pool.store(payload(1700, i))
    h = pool.store(payload(700, 9))
    assert pool.compact() == 0
    assert pool.statistics().objects_moved == 0 and pool.can_compact() == 0
    assert class_row(pool, 704).obj_used == 1 and pool.read(h) == payload(700, 9)
    pool.check()


@pytest.mark.parametrize("engine", ENGINES)
def test_check_refuses_an_object_in_a_class_beyond_the_slack_bound(engine: str) -> None:
    """check() knows the rule: an object's class is its own or at most twice its size."""
    p = make(engine)
    try:
        h = p.store(payload(100, 1))
        w = layout(p).hloc[h]
        poke(p, "hloc", 0, h, w & ~(0xFFF << 1) | (40 - 1) << 1)  # says 40 bytes, in class 112
        with pytest.raises(PoolCorruptionError, match="not in class"):
            p.check()
    finally:
        p.close()


def test_compaction_skips_the_huge_class(pool: Pool) -> None:
    hs = [pool.store(bytes(PAGE_SIZE)) for _ in range(50)]
    for h in hs[::2]:
        pool.free(h)
    assert pool.can_compact() == 0
    assert pool.compact() == 0
    assert pool.statistics().objects_moved == 0


# -- the invariant checker ---------------------------------------------------------------------


def filled(engine: str, seed: int = 3) -> Pool:
    p = make(engine)
    rng = random.Random(seed)
    hs = [p.store(payload(rng.choice([100, 1568, 3000, 4096]), i)) for i in range(200)]
    for h in hs[::3]:
        p.free(h)
    p.check()
    return p


def _class(p: Pool, size: int):
    lay = layout(p)
    return lay._classes[lay._cid_of_size[size]]


def _corrupt_slot_word(p: Pool) -> None:
    c = _class(p, 1568)
    z = c.heads[c.mask.bit_length() - 1]
    s = next(s for s in range(c.objs) if c.slots[z * c.objs + s] & 1)
    poke(p, "slots", c.cid, z * c.objs + s, c.slots[z * c.objs + s] ^ 2)  # names another handle


def _corrupt_handle(p: Pool) -> None:
    hloc = layout(p).hloc
    h = next(h for h in range(1, len(hloc)) if hloc[h] & 1 and hloc[h] >> 13 & 0xFF)
    poke(p, "hloc", 0, h, hloc[h] ^ 1 << 21)  # the handle now points at the neighbouring slot


def _corrupt_inuse(p: Pool) -> None:
    c = _class(p, 100)
    z = c.heads[c.mask.bit_length() - 1]
    poke(p, "inuse", c.cid, z, c.inuse[z] - 1)


def _corrupt_frames(p: Pool) -> None:
    c = _class(p, 3000)
    live = [z for z in range(len(c.group)) if c.group[z] != 0xFF]
    poke(p, "frames", c.cid, live[0] * c.pages, c.frames[live[1] * c.pages])  # owned twice


def _corrupt_list(p: Pool) -> None:
    c = _class(p, 100)
    g = c.mask.bit_length() - 1
    poke(p, "next", c.cid, c.heads[g], c.heads[g])  # a cycle


def _corrupt_free_handles(p: Pool) -> None:
    hfree = layout(p).hfree
    poke(p, "hloc", 0, hfree, hfree << 1)  # the free-handle list loops on itself


def _corrupt_counter(p: Pool) -> None:
    poke(p, "pages_used", 0, 0, p.pages_used + 1)


def _corrupt_bytes(p: Pool) -> None:
    poke(p, "bytes_stored", 0, 0, p.bytes_stored - 1)


def _corrupt_free_frame(p: Pool) -> None:
    c = _class(p, 100)
    z = c.heads[c.mask.bit_length() - 1]
    poke(p, "push_free_frame", 0, 0, c.frames[z * c.pages])


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_slot_word,
        _corrupt_handle,
        _corrupt_inuse,
        _corrupt_frames,
        _corrupt_list,
        _corrupt_free_handles,
        _corrupt_counter,
        _corrupt_bytes,
        _corrupt_free_frame,
    ],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_check_catches_corruption(corrupt, engine: str) -> None:
    p = filled(engine)
    try:
        corrupt(p)
        with pytest.raises(PoolCorruptionError):
            p.check()
    finally:
        p.close()


def test_pages_compacted_is_net_of_frames_made_for_the_destination(pool: Pool) -> None:
    """Frames are made lazily, so a move may need a new frame in the destination zspage;
    pages_compacted must count what compaction gave back, not what it freed gross."""
    hs = [pool.store(payload(1568, i)) for i in range(15)]  # A: 13 of 13 (5 frames), B: 2 (1)
    for h in hs[:12]:
        pool.free(h)  # A keeps one object, slot 12
    before = pool.statistics()
    assert before.pages_used == 6
    freed = pool.compact()  # A's object moves to B's slot 2, which spills into B's 2nd frame
    after = pool.statistics()
    assert (freed, after.pages_used, after.pages_compacted) == (4, 2, 4)
    assert [pool.read(h) for h in hs[12:]] == [payload(1568, i) for i in range(12, 15)]
    pool.check()


def test_free_refuses_a_handle_its_slot_does_not_name(pool: Pool) -> None:
    """free() checks in O(1) that the slot the handle locates names the handle back (the
    kernel's in-object header): freeing through a stale or corrupt word would free a slot that
    another live object owns."""
    hs = [pool.store(payload(1568, i)) for i in range(3)]
    poke(pool, "slots", _class(pool, 1568).cid, 1, hs[2] << 1 | 1)  # slot 1 claims hs[2]
    before = pool.statistics()
    with pytest.raises(PoolCorruptionError):
        pool.free(hs[1])
    assert pool.statistics() == before  # refused before any change
    assert pool.read(hs[0]) == payload(1568, 0)
