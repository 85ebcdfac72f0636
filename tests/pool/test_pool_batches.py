"""The batch calls (store_many, read_joined, free_many): the same results as one call per object,
and a batch stopped by mem_limit stores a prefix and nothing after it."""

from __future__ import annotations

import random

import pytest
from pool_engines import KINDS, make_kind

from zfs_ram.pool import InvalidHandleError, InvalidSizeError


def _objects(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([1, 40, 700, 2000, 3000, 3700, 4096])) for _ in range(count)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_is_one_call_per_object(kind: str) -> None:
    objects = _objects(1, 300)
    with make_kind(kind) as pool:
        handles = pool.store_many(b"".join(objects), [len(o) for o in objects])
        assert len(handles) == len(objects)
        assert [pool.read(h) for h in handles] == objects
        blob, sizes = pool.read_joined(list(reversed(handles)))
        assert blob == b"".join(reversed(objects))
        assert list(sizes) == [len(o) for o in reversed(objects)]
        assert pool.bytes_stored == sum(map(len, objects))
        pool.check()
        assert list(pool.free_many(handles[::2])) == [len(o) for o in objects[::2]]
        assert [pool.read(h) for h in handles[1::2]] == objects[1::2]
        pool.check()


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_stopped_by_mem_limit_stores_a_prefix(kind: str) -> None:
    objects = _objects(2, 400)
    with make_kind(kind, mem_limit_pages=40) as pool:
        handles = pool.store_many(b"".join(objects), [len(o) for o in objects])
        assert 0 < len(handles) < len(objects)
        assert pool.objects == len(handles)
        assert pool.pages_used <= 40
        assert [pool.read(h) for h in handles] == objects[: len(handles)]
        pool.check()


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_batch_changes_nothing(kind: str) -> None:
    objects = _objects(3, 50)
    with make_kind(kind) as pool:
        handles = pool.store_many(b"".join(objects), [len(o) for o in objects])
        before = pool.statistics()
        blob = b"".join(objects)
        for sizes in ([10, 0, 10], [10, 4097], [len(blob), 1]):
            with pytest.raises(InvalidSizeError):
                pool.store_many(blob, sizes)
        free = pool.free_many(handles[:2])
        for bad in ([handles[5], handles[0]], [handles[6], handles[6]], [handles[7], 0]):
            with pytest.raises(InvalidHandleError):
                pool.free_many(bad)  # a freed handle, one twice, no handle: nothing is freed
        assert list(free) == [len(o) for o in objects[:2]]
        assert pool.objects == before.objects - 2
        assert pool.read_joined(handles[2:])[0] == b"".join(objects[2:])
        with pytest.raises(InvalidHandleError):
            pool.read_joined([handles[3], handles[1]])
        pool.check()
