"""Property-based tests: random operation sequences against a dict model, for both pools.

After every step, check() must pass and every live object must read back as the model says.
"""

from __future__ import annotations

import random

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)
from pool_engines import make_kind

from zfs_ram.pool import PAGE_SIZE, InvalidSizeError, PoolFullError

#: Sizes that hit the edges (class bounds, straddling, the huge watermark) plus anything else.
SIZES = st.one_of(
    st.sampled_from([1, 31, 32, 33, 48, 1568, 2048, 2049, 3632, 3633, 4095, 4096]),
    st.integers(1, 300),
    st.integers(1, PAGE_SIZE),
)


def make_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


_settings = settings(max_examples=50, stateful_step_count=30, deadline=None)


@_settings
class PoolMachine(RuleBasedStateMachine):
    kind = "zsmalloc-python"
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.pool = make_kind(self.kind)
        self.model: dict[int, bytes] = {}

    def teardown(self) -> None:
        self.pool.close()

    @rule(target=handles, size=SIZES, seed=st.integers(0, 2**16))
    def store(self, size: int, seed: int) -> int:
        data = make_bytes(size, seed)
        try:
            h = self.pool.store(data)
        except PoolFullError:
            assert self.pool.mem_limit_pages > 0
            return 0
        assert h >= 1 and h not in self.model
        self.model[h] = data
        return h

    @rule(target=handles, size=SIZES, seed=st.integers(0, 2**16), partial=st.integers(0, 4096))
    def malloc_and_write(self, size: int, seed: int, partial: int) -> int:
        try:
            h = self.pool.malloc(size)
        except PoolFullError:
            return 0
        data = make_bytes(size, seed)
        self.pool.write(h, data)
        k = min(partial, size)
        head = make_bytes(k, seed + 1)
        self.pool.write(h, head)  # a partial overwrite of the start
        self.model[h] = head + data[k:]
        return h

    @rule(h=handles, seed=st.integers(0, 2**16))
    def overwrite(self, h: int, seed: int) -> None:
        if h not in self.model:
            return
        size = len(self.model[h])
        data = make_bytes(size, seed)
        self.pool.write(h, data)
        self.model[h] = data
        try:
            self.pool.write(h, data + b"!")
        except InvalidSizeError:
            pass
        else:
            raise AssertionError("an overlong write was accepted")

    @rule(h=consumes(handles))
    def free(self, h: int) -> None:
        if h in self.model:
            assert self.pool.free(h) == len(self.model[h])  # free() returns the object's size
            del self.model[h]

    @rule(
        size=st.sampled_from([40, 300, 1568, 2049, 3632]),
        count=st.integers(5, 60),
        seed=st.integers(0, 2**16),
    )
    def store_burst(self, size: int, count: int, seed: int) -> None:
        """Many objects of one class: several zspages, so compaction has work to do."""
        for i in range(count):
            data = make_bytes(size, seed + i)
            try:
                h = self.pool.store(data)
            except PoolFullError:
                return
            self.model[h] = data

    @precondition(lambda self: len(self.model) > 0)
    @rule(share=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
    def free_random_share(self, share: float, seed: int) -> None:
        victims = random.Random(seed).sample(sorted(self.model), int(len(self.model) * share))
        for h in victims:
            self.pool.free(h)
            del self.model[h]

    @rule(n=st.integers(1, 40))
    def compact_step(self, n: int) -> None:
        before = self.pool.statistics()
        moved = self.pool.compact_step(n)
        assert 0 <= moved <= n
        after = self.pool.statistics()
        assert after.objects_moved == before.objects_moved + moved
        if moved == 0:
            assert after.freeable_pages == 0

    @rule()
    def compact(self) -> None:
        before = self.pool.statistics()
        # The kernel's own count (per class, whole zspages of free slots) is a promise; the
        # residue pouring adds to freeable_pages is an estimate that may find no place.
        whole = sum(row.freeable for row in self.pool.class_statistics())
        freed = self.pool.compact()
        after = self.pool.statistics()
        if whole:
            assert after.objects_moved > before.objects_moved
            assert freed > 0
        assert after.pages_used == before.pages_used - freed
        assert after.freeable_pages == 0
        assert after.pages_used <= before.pages_used

    @precondition(lambda self: len(self.model) > 0)
    @rule(extra=st.integers(-2, 3))
    def set_mem_limit_pages(self, extra: int) -> None:
        self.pool.mem_limit_pages = max(self.pool.statistics().pages_used + extra, 0)

    @rule()
    def unlimit(self) -> None:
        self.pool.mem_limit_pages = 0

    @invariant()
    def consistent(self) -> None:
        self.pool.check()
        for h, data in self.model.items():
            assert self.pool.object_size(h) == len(data)
            assert self.pool.read(h) == data
        handles = list(self.model)  # the batch read a FUSE read uses: same bytes, same order
        assert self.pool.read_many(handles) == [self.model[h] for h in handles]
        s = self.pool.statistics()
        assert s.objects == len(self.model)
        assert s.bytes_stored == sum(len(d) for d in self.model.values())
        assert s.pages_used <= s.max_pages_used


class NativeMachine(PoolMachine):
    kind = "zsmalloc-native"


class ZbudMachine(PoolMachine):
    kind = "zbud"


TestZsmallocStateMachine = PoolMachine.TestCase
TestNativeZsmallocStateMachine = NativeMachine.TestCase
TestZbudStateMachine = ZbudMachine.TestCase
# @settings sets them on the decorated class's TestCase only (and refuses a second decorator
# on a subclass): without this, the subclasses' machines ran with hypothesis's defaults.
TestNativeZsmallocStateMachine.settings = _settings
TestZbudStateMachine.settings = _settings
