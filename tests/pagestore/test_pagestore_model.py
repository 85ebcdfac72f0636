"""The page store against a model: random writes, truncates, reads and releases at both limits.

A few files live in one store over a small pool. Both limits are small enough that many steps
are refused: the logical one (tmpfs size=, the store's page limit) and the physical one (zram
mem_limit=, the pool's frame limit, also lowered and raised while files live). After every
step, refused steps included, every file's size and bytes must equal the model's, and the
store's counters must equal what a walk of the page tables recomputes. A refused step must
change nothing; a shrinking truncate must never be refused. Files are detached (unlinked, not
yet forgotten) and reattached at random, and written, truncated and released while detached;
every public call that freed a pool object must have called on_free() exactly once.

Both engines run every sequence: the store under test uses the engine chosen at import (the
compiled one unless ZFS_RAM_ENGINE=python), and a twin store over a twin pool, on the other
engine, takes the same steps; after every step their outcomes, counters, page tables (entry
kinds and object sizes) and pools' statistics must be equal.

ZFS_RAM_SOAK=1 runs many more and longer sequences.
"""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import hypothesis.strategies as st
import pytest
from hypothesis import event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from page_kinds import KINDS, page_of_kind

from zfs_ram import native
from zfs_ram.codec import DEFAULT_CODEC, Codec
from zfs_ram.pagestore import NoSpaceError, PageStore
from zfs_ram.pagetable import SAME_ENTRY, TRIED_BIT, FileData, handle_of, priority_of, stamp_of
from zfs_ram.pool import PAGE_SIZE, Pool, create_pool

SOAK = os.environ.get("ZFS_RAM_SOAK") == "1"
T = TypeVar("T")
#: The twin's engine: whichever the store under test does not run.
TWIN_ENGINE = native.PYTHON if DEFAULT_CODEC.engine == native.NATIVE else native.NATIVE
FILES = 3
#: Files reach past one page-table chunk (512 pages) only through holes: a write far out.
FAR_PAGE = 600


def make_buffer(kind: str, seed: int, offset: int, length: int) -> bytes:
    """`length` bytes for a write at `offset`, cut from whole pages of `kind` aligned to the
    file's pages (so that a partial write of a same-filled page can leave it same-filled)."""
    rng = random.Random(seed)
    first = offset // PAGE_SIZE
    last = (offset + length - 1) // PAGE_SIZE
    pages = b"".join(page_of_kind(kind, rng, n) for n in range(first, last + 1))
    start = offset - first * PAGE_SIZE
    return pages[start : start + length]


OFFSETS_IN_PAGE = st.sampled_from([0, 0, 1, 100, PAGE_SIZE // 2, PAGE_SIZE - 1])
LENGTHS = st.one_of(
    st.sampled_from([1, 100, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 3 * PAGE_SIZE]),
    st.integers(1, 9 * PAGE_SIZE),
)

_settings = settings(
    max_examples=400 if SOAK else 40,
    stateful_step_count=80 if SOAK else 40,
    deadline=None,
)


@_settings
class PageStoreMachine(RuleBasedStateMachine):
    kind = "zsmalloc"

    def __init__(self) -> None:
        super().__init__()
        self.pool: Pool = create_pool(self.kind)
        # Every object the pool frees is counted here, to hold on_free() calls against.
        self.objects_freed = 0
        free = self.pool.free

        def counting_free(handle: int) -> int:
            self.objects_freed += 1
            return free(handle)

        free_many = self.pool.free_many

        def counting_free_many(handles: Sequence[int]) -> array[int]:
            before = self.objects_freed  # free_many may call free(): count its objects once
            sizes = free_many(handles)
            self.objects_freed = before + len(sizes)
            return sizes

        self.pool.free = counting_free  # type: ignore[method-assign]  # an instance's own
        self.pool.free_many = counting_free_many  # type: ignore[method-assign]  # the same
        self.on_free_calls = 0
        # Access stamps count this clock's seconds, the same for both stores. The second
        # algorithm is lz4hc: zstd's bytes may differ between the engines (see codec).
        self.now = 0.0
        self.store = PageStore(
            self.pool,
            on_free=self._on_free,
            recomp_codec=Codec("lz4hc", engine=DEFAULT_CODEC.engine),
            clock=self._clock,
        )
        self.twin_pool: Pool = create_pool(self.kind)
        self.twin = PageStore(
            self.twin_pool,
            codec=Codec(engine=TWIN_ENGINE),
            recomp_codec=Codec("lz4hc", engine=TWIN_ENGINE),
            clock=self._clock,
        )
        self.twin_files = [FileData() for _ in range(FILES)]
        self.files = [FileData() for _ in range(FILES)]
        self.models = [bytearray() for _ in range(FILES)]
        self.detached = [False] * FILES
        self.refused = 0

    def _on_free(self) -> None:
        self.on_free_calls += 1

    def _clock(self) -> float:
        return self.now

    def _call(self, operation: Callable[[PageStore, list[FileData]], T]) -> T:
        """Run one public call of the store: on_free() once if it freed objects, else never;
        then the same call on the twin, which must end the same way."""
        freed, calls = self.objects_freed, self.on_free_calls
        try:
            result = operation(self.store, self.files)
        except NoSpaceError as error:
            assert self.on_free_calls - calls == (1 if self.objects_freed > freed else 0)
            with pytest.raises(NoSpaceError) as twin_error:
                operation(self.twin, self.twin_files)
            assert (twin_error.value.written, twin_error.value.physical) == (
                error.written,
                error.physical,
            )
            raise
        assert self.on_free_calls - calls == (1 if self.objects_freed > freed else 0)
        assert operation(self.twin, self.twin_files) == result
        return result

    def teardown(self) -> None:
        self.pool.close()
        self.twin_pool.close()

    @initialize(
        size_pages=st.integers(6, 40), mem_pages=st.integers(3, 24), pending=st.integers(0, 3)
    )
    def limits(self, size_pages: int, mem_pages: int, pending: int) -> None:
        self.store.size_limit_pages = self.twin.size_limit_pages = size_pages
        self.pool.mem_limit_pages = self.twin_pool.mem_limit_pages = mem_pages
        # Fewer pending pages than files (some of the time): the oldest is stored for another.
        self.store.pending_limit_pages = self.twin.pending_limit_pages = pending

    # -- the operations ------------------------------------------------------------------------

    def _write(self, i: int, offset: int, buf: bytes) -> None:
        data, model = self.files[i], self.models[i]
        used = self.store.used_pages
        try:
            assert self._call(lambda store, files: store.write(files[i], offset, buf)) == len(buf)
            written = len(buf)
        except NoSpaceError as error:
            self._refused(error)
            written = error.written
            assert 0 <= written < len(buf)
        limit = self.store.size_limit_pages
        if not data.detached and used <= limit:
            assert self.store.used_pages <= limit  # a write never goes past size=
        if written:
            end = offset + written
            if end > len(model):
                model += bytes(end - len(model))
            model[offset:end] = buf[:written]

    @rule(
        i=st.integers(0, FILES - 1),
        page=st.integers(0, 12),
        inner=OFFSETS_IN_PAGE,
        length=LENGTHS,
        kind=st.sampled_from(KINDS),
        seed=st.integers(0, 2**16),
    )
    def write(self, i: int, page: int, inner: int, length: int, kind: str, seed: int) -> None:
        offset = page * PAGE_SIZE + inner
        self._write(i, offset, make_buffer(kind, seed, offset, length))

    @rule(i=st.integers(0, FILES - 1), length=LENGTHS, seed=st.integers(0, 2**16))
    def append(self, i: int, length: int, seed: int) -> None:
        offset = len(self.models[i])
        self._write(i, offset, make_buffer("mixed", seed, offset, length))

    @rule(i=st.integers(0, FILES - 1), gap=st.integers(1, 3 * PAGE_SIZE), seed=st.integers(0, 99))
    def write_past_a_hole(self, i: int, gap: int, seed: int) -> None:
        """A write past the end of file: the gap reads as zeros (and a stale tail must not
        show through it)."""
        offset = len(self.models[i]) + gap
        self._write(i, offset, make_buffer("text", seed, offset, 200))

    @rule(i=st.integers(0, FILES - 1), seed=st.integers(0, 99))
    def write_far(self, i: int, seed: int) -> None:
        offset = FAR_PAGE * PAGE_SIZE + seed
        self._write(i, offset, make_buffer("text", seed, offset, PAGE_SIZE))

    def _truncate(self, i: int, size: int) -> None:
        data, model = self.files[i], self.models[i]
        try:
            self._call(lambda store, files: store.truncate(files[i], size))
        except NoSpaceError as error:
            self._refused(error)
            self.files_match()  # nothing changed: checked before the next assertion
            assert size > len(model), "a shrinking truncate was refused"
            return
        if size < len(model):
            del model[size:]
            if data.stale_tail:
                event("a shrinking truncate left a stale tail")
        else:
            model += bytes(size - len(model))

    @rule(i=st.integers(0, FILES - 1), where=st.floats(0, 1), inner=st.integers(1, PAGE_SIZE - 1))
    def truncate_into_a_page(self, i: int, where: float, inner: int) -> None:
        pages = len(self.models[i]) // PAGE_SIZE
        self._truncate(i, min(int(pages * where) * PAGE_SIZE + inner, len(self.models[i])))

    @rule(i=st.integers(0, FILES - 1), page=st.integers(0, 14))
    def truncate_to_a_page_boundary(self, i: int, page: int) -> None:
        self._truncate(i, page * PAGE_SIZE)

    @rule(i=st.integers(0, FILES - 1), grow=st.integers(1, 5 * PAGE_SIZE))
    def truncate_up(self, i: int, grow: int) -> None:
        self._truncate(i, len(self.models[i]) + grow)

    @rule(i=st.integers(0, FILES - 1), offset=st.integers(0, 16 * PAGE_SIZE), length=LENGTHS)
    def read(self, i: int, offset: int, length: int) -> None:
        model = self.models[i]
        assert self.store.read(self.files[i], offset, length) == model[offset : offset + length]
        assert self.twin.read(self.twin_files[i], offset, length) == model[offset : offset + length]

    @rule(i=st.integers(0, FILES - 1))
    def release(self, i: int) -> None:
        """The file is gone (detached or not): its pages are freed, and its slot holds a new,
        empty file."""
        data = self.files[i]
        self._call(lambda store, files: store.release(files[i]))
        assert data.stored_pages == 0 and data.size == 0 and not data.detached
        self.files[i] = FileData()
        self.twin_files[i] = FileData()
        self.models[i] = bytearray()
        self.detached[i] = False

    @rule(i=st.integers(0, FILES - 1))
    def flush(self, i: int) -> None:
        """close, fsync or flush: the pending page is stored (refused only at mem_limit)."""
        try:
            self._call(lambda store, files: store.flush(files[i]))
        except NoSpaceError as error:
            self._refused(error)
            assert error.physical and self.files[i].pending is not None
            return
        assert self.files[i].pending is None

    @rule(i=st.integers(0, FILES - 1))
    def detach(self, i: int) -> None:
        """Unlinked and not open (twice in a row does nothing the second time)."""
        self.store.detach(self.files[i])
        self.twin.detach(self.twin_files[i])
        self.detached[i] = True

    @rule(i=st.integers(0, FILES - 1))
    def reattach(self, i: int) -> None:
        """Opened through a path walk that ended before the unlink (idempotent too)."""
        self.store.reattach(self.files[i])
        self.twin.reattach(self.twin_files[i])
        self.detached[i] = False

    @rule(n=st.integers(1, 40))
    def compact_step(self, n: int) -> None:
        assert self.pool.compact_step(n) == self.twin_pool.compact_step(n)

    @rule()
    def compact(self) -> None:
        assert self.pool.compact() == self.twin_pool.compact()

    @rule(extra=st.integers(-3, 6))
    def set_mem_limit(self, extra: int) -> None:
        """zram lets mem_limit be lowered below what is used: only new allocations fail."""
        self.pool.mem_limit_pages = max(self.pool.statistics().pages_used + extra, 1)
        self.twin_pool.mem_limit_pages = self.pool.mem_limit_pages

    @rule(seconds=st.sampled_from([0.5, 1, 3, 10]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(
        older_than=st.one_of(st.none(), st.sampled_from([0, 1, 2, 5])),
        kind=st.sampled_from(["idle", "huge", "huge_idle"]),
        touched=st.lists(st.tuples(st.integers(0, FILES - 1), st.integers(0, 12)), max_size=4),
    )
    def recompress(self, older_than: int | None, kind: str, touched: list[tuple[int, int]]) -> None:
        """zram's `echo all|SECONDS > idle`, a few pages read (which makes them busy again),
        then `echo type=KIND > recompress`: the idle (and/or huge) pages encoded by lz4 that
        lz4hc shrinks are recompressed, the others marked tried; reads give the same bytes."""
        store, twin = self.store, self.twin
        cutoff = store.idle_cutoff(older_than)
        assert twin.idle_cutoff(older_than) == cutoff
        for data, twin_data in zip(self.files, self.twin_files, strict=True):
            assert store.mark_idle(data, cutoff) == twin.mark_idle(twin_data, cutoff)
        for i, page in touched:
            offset = page * PAGE_SIZE
            assert store.read(self.files[i], offset, 1) == self.models[i][offset : offset + 1]
            assert twin.read(self.twin_files[i], offset, 1) == self.models[i][offset : offset + 1]
            entry = self.files[i].entry(page)
            assert not entry & 1 or stamp_of(entry) != 0, "a read left its page idle"
        idle, huge = kind != "huge", kind != "idle"
        before = [self._flags(data) for data in self.files]
        total = 0
        for i, data in enumerate(self.files):
            for key in sorted(data.chunks):
                done = self._call(
                    lambda s, files, i=i, key=key: s.recompress_chunk(files[i], key, idle, huge)
                )
                total += done
        if total:
            event("pages recompressed")
        for data, flags in zip(self.files, before, strict=True):
            for page, (priority, tried, was_idle, was_huge) in flags.items():
                entry = data.entry(page)
                chosen = (was_idle or not idle) and (was_huge or not huge)
                if priority or tried or not chosen:
                    assert (priority_of(entry), bool(entry & TRIED_BIT)) == (priority, tried)
                elif self.pool.mem_limit_pages == 0:  # else the pool may refuse some
                    assert priority_of(entry) == 1 or entry & TRIED_BIT

    @staticmethod
    def _flags(data: FileData) -> dict[int, tuple[int, bool, bool, bool]]:
        """page -> (priority, tried, idle, huge) of every object entry."""
        return {
            page: (
                priority_of(entry),
                bool(entry & TRIED_BIT),
                stamp_of(entry) == 0,
                bool(entry >> 63),
            )
            for page, entry in data.pages()
            if entry & 1
        }

    def _refused(self, error: NoSpaceError) -> None:
        self.refused += 1
        event("refused at mem_limit" if error.physical else "refused at size")
        if error.physical:
            assert self.pool.mem_limit_pages > 0
        else:
            assert self.store.used_pages >= self.store.size_limit_pages > 0

    # -- the checks ----------------------------------------------------------------------------

    @invariant()
    def files_match(self) -> None:
        # The twin's files too: a read touches its pages, whose stamps must stay the same.
        for data, twin, model in zip(self.files, self.twin_files, self.models, strict=True):
            assert data.size == len(model)
            assert self.store.read(data, 0, len(model) + PAGE_SIZE) == model
            assert self.twin.read(twin, 0, len(model) + PAGE_SIZE) == model

    @invariant()
    def counters_match(self) -> None:
        pool, store = self.pool, self.store
        pool.check()
        stored = same = objects = compr = huge = detached = pending = 0
        second_pages = second_bytes = 0
        for data, model, is_detached in zip(self.files, self.models, self.detached, strict=True):
            assert data.detached == is_detached
            end_page = -(-len(model) // PAGE_SIZE)
            pages = footprint = 0
            for page, entry in data.pages():
                assert page < end_page, "a page past the end of file was kept"
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
                else:
                    assert entry == SAME_ENTRY
                    same += 1
            if data.pending is not None:  # the last page, uncompressed; a hole in the table
                event("a pending page")
                pending += 1
                pages += 1
                same += bytes(data.pending) == data.pending[:8] * (PAGE_SIZE // 8)
                assert data.pending_page == (len(model) - 1) // PAGE_SIZE
                assert not data.entry(data.pending_page) and len(data.pending) == PAGE_SIZE
                tail = len(model) - data.pending_page * PAGE_SIZE
                assert data.pending[tail:] == bytes(PAGE_SIZE - tail)
            assert (data.stored_pages, data.footprint) == (pages, footprint)
            stored += pages
            compr += footprint
            detached += pages if is_detached else 0
        stats = store.statistics()
        assert stats.stored_pages == store.stored_pages == stored
        assert stats.orig_data_size == stored * PAGE_SIZE
        assert stats.compr_data_size == compr == pool.bytes_stored
        assert stats.same_pages == same
        assert stats.huge_pages == huge <= stats.huge_pages_since
        assert pool.objects == objects
        assert stats.detached_pages == store.detached_pages == detached
        assert store.used_pages == stored - detached
        assert stats.size_limit_pages == store.size_limit_pages
        assert stats.pending_pages == pending <= store.pending_limit_pages
        assert (store.recompressed_pages, store.recompressed_bytes) == (second_pages, second_bytes)
        per_algorithm = store.algorithm_statistics()
        assert sum(a.pages for a in per_algorithm.values()) == objects - huge
        assert sum(a.compr_data_size for a in per_algorithm.values()) == compr - huge * PAGE_SIZE
        assert per_algorithm["lz4hc"].pages == second_pages

    @invariant()
    def twins_match(self) -> None:
        """The other engine, after the same steps, holds the same pages the same way."""
        assert self.twin.statistics() == self.store.statistics()
        # Not metadata_bytes: the pool under test has counting free calls in its __dict__.
        assert replace(self.twin_pool.statistics(), metadata_bytes=0) == replace(
            self.pool.statistics(), metadata_bytes=0
        )
        for data, twin in zip(self.files, self.twin_files, strict=True):
            assert (twin.size, twin.stale_tail, twin.stored_pages, twin.footprint) == (
                data.size,
                data.stale_tail,
                data.stored_pages,
                data.footprint,
            )
            assert self._layout(twin, self.twin_pool) == self._layout(data, self.pool)
            assert self._flags(twin) == self._flags(data)
            assert twin.same_words == data.same_words
            assert (twin.pending, twin.pending_page) == (data.pending, data.pending_page)

    @staticmethod
    def _layout(data: FileData, pool: Pool) -> list[tuple[int, int]]:
        """(page, object size or -entry) for every page that is not a hole, in page order."""
        return sorted(
            (page, pool.object_size(handle_of(entry)) if entry & 1 else -entry)
            for page, entry in data.pages()
        )


class ZbudPageStoreMachine(PageStoreMachine):
    kind = "zbud"


TestPageStoreZsmalloc = PageStoreMachine.TestCase
TestPageStoreZbud = ZbudPageStoreMachine.TestCase
# @settings sets them on the decorated class's TestCase only (and refuses a second decorator
# on a subclass): a subclass's TestCase would run with hypothesis's defaults.
TestPageStoreZbud.settings = _settings
