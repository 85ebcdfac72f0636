"""The background compactor: gives freed memory back while the filesystem keeps serving.

The pool compacts in bounded steps (pool.compact_step moves at most `batch` objects); this task
runs those steps from the event loop in slices of about SLICE_SECONDS and checkpoints between
slices, so a FUSE request waits for at most one slice. Correctness does not depend on where
the task yields: each step is one synchronous call, and the pool is consistent between calls.

It wakes when the filesystem says space was freed (unlink, truncate, overwrite); if the pool
could give back at least `min_pages` pages, it compacts until nothing whole is left to reclaim
(compact_step finds nothing to move), as one zs_compact() pass would, and then pours what
the kernel's pass leaves (each class's last partly used zspages) into larger classes; a pass
that starts while requests keep coming does only the kernel's part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from zfs_ram.pool import Pool

# Longest stretch of compaction between two chances for FUSE requests to run: a request that
# arrives meanwhile waits at most this long (plus one step of a few tens of microseconds).
SLICE_SECONDS = 50e-6
# While requests are arriving, the compactor rests this long after each slice, so that the
# event loop sits idle in epoll and answers them as fast as when nothing compacts. A request
# takes several trips through the scheduler; with only a checkpoint between slices, a slice
# would run between every two of them (benchmarks/compaction_latency.py measured 5-10x the
# idle p99). With no requests in flight it does not rest, and compacts at full speed.
REST_SECONDS = 1e-3
# After a wake-up, the background task waits this long before it looks at the pool.
SETTLE_SECONDS = 20e-3
# A pass that shrank the pool's tables by at least this much (they are packed once a pass
# settles the pool) has the C heap trimmed after it: the shrunk arrays leave holes that glibc
# gives back only to malloc_trim. Smaller gains are not worth the trim's walk of the heap.
HEAP_RELEASE_BYTES = 256 * 1024
# A quiet look that finds the pool this many pages (64 MiB) below its peak since the heap was
# last trimmed settles the pool with one pass even if too little is reclaimable for a pass
# of its own (the pass ends by packing the tables), then has the heap trimmed: a mass delete
# freed page tables, inodes and table entries in it. 1 GiB written, 50 % deleted: the busy
# passes during the unlinks never packed, the quiet look found under 1 % reclaimable, and
# the heap kept 4.1 MiB of free pages resident. At most once per 64 MiB deleted.
HEAP_RELEASE_PAGES = 16384
# The background compactor leaves up to 1/POOL_SHARE_DIVISOR of the pool reclaimable.
POOL_SHARE_DIVISOR = 100
# While requests keep coming (no quiet SETTLE_SECONDS), it waits for 1/BUSY_SHARE_DIVISOR:
# random overwrites free one object at a time and the next writes refill most of those holes,
# so compacting in the middle of them moves objects for pages that would fill up again, and
# takes CPU from the writes (10-15% of the daemon's time in fs_bench randwrite, by py-spy).
BUSY_SHARE_DIVISOR = 10


@dataclass(frozen=True)
class CompactorStats:
    auto: bool
    runs: int  # passes started (background and on demand)
    objects_moved: int
    pages_freed: int
    seconds: float  # time spent inside compaction steps
    running: bool


class Compactor:
    def __init__(
        self,
        pool: Pool,
        *,
        auto: bool,
        min_pages: int,
        batch: int,
        activity: Callable[[], int] = lambda: 0,
        release_heap: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.activity = activity  # a counter of foreground requests: has anyone come by?
        # Gives the C heap's free pages back to the OS (malloc_trim): called when a look finds
        # the pool empty, since an empty pool has dropped its tables (Pool._release_handle),
        # and after a pass that packed the tables by HEAP_RELEASE_BYTES or more.
        self.release_heap = release_heap
        self.auto = auto
        self.min_pages = max(1, min_pages)
        self.batch = max(1, batch)
        self._wakeup = trio.Event()
        self._lock = trio.Lock()
        self._runs = 0
        self._moved = 0
        self._freed = 0
        self._seconds = 0.0
        self._seen_activity = 0
        # The pool's pages_used at its peak since the heap was last trimmed, as far as the
        # looks see it (max_pages_used catches the growth between two looks).
        self._heap_mark = 0
        self._seen_max_pages = 0

    def statistics(self) -> CompactorStats:
        return CompactorStats(
            auto=self.auto,
            runs=self._runs,
            objects_moved=self._moved,
            pages_freed=self._freed,
            seconds=self._seconds,
            running=self._lock.locked(),
        )

    def notify_freed(self) -> None:
        """Called (synchronously) after objects were freed. O(1): the task decides if it pays."""
        if self.auto:
            self._wakeup.set()

    async def run(self) -> None:
        """The background task: sleeps until woken, compacts if it pays, sleeps again.

        Many frees (an rm -rf) wake it once: it runs only when the event loop gets to it, and
        looks at the pool's reclaimable pages then, not once per free."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            # A pass while requests keep coming does only the kernel's part: what pouring
            # would move up into larger classes then, the next frees would mostly empty again,
            # and each pour leaves its objects in slots larger than they are (measured in
            # process, 150 MiB, 75 % deleted: 1.021 mem/compr with pouring in every pass, 1.018
            # with pouring only once the requests pause).
            pour = not await self._settle()
            shrunk = pour and self._heap_peak() - self.pool.pages_used >= HEAP_RELEASE_PAGES
            if shrunk or self.pool.can_compact(pour) >= self.threshold():
                await self._compact(pour)
            if not pour:
                self._wakeup.set()  # look again once the requests pause, to pour
            else:
                self.pool.trim()  # no pass needed, but the frames kept warm go back
            if self.pool.objects == 0:
                # Everything was deleted: the pool's handle and zspage tables started afresh,
                # and the old ones (about 12 bytes per object ever held) are holes in the C
                # heap until it is trimmed. Once per look at most, after a quiet SETTLE_SECONDS,
                # so a loop that empties and refills the pool pays it at most ~50 times a second.
                self._release_heap()
            elif shrunk and self._heap_peak() - self.pool.pages_used >= HEAP_RELEASE_PAGES:
                self._release_heap()  # the pass did not trim it (its tables shrank less)

    def _heap_peak(self) -> int:
        """The pool's peak pages_used since the heap was last trimmed (see _heap_mark)."""
        high = self.pool.max_pages_used
        if high != self._seen_max_pages:  # a new peak since the last look (or a reset)
            self._seen_max_pages = high
            self._heap_mark = max(self._heap_mark, high)
        self._heap_mark = max(self._heap_mark, self.pool.pages_used)
        return self._heap_mark

    def _release_heap(self) -> None:
        self.release_heap()
        self._heap_peak()
        self._heap_mark = self.pool.pages_used

    async def _settle(self) -> bool:
        """Wait until requests pause for SETTLE_SECONDS (False), or until a busy pass is due
        (True).

        A burst of frees (an rm -rf, random overwrites) is better looked at once, after it:
        the look sums over every size class, and later frees empty the same zspages further.
        Under endless traffic a pass still starts once BUSY_SHARE_DIVISOR of the pool is
        reclaimable (an rm -rf of half the pool gets there within its first few percent)."""
        while True:
            seen = self.activity()
            await trio.sleep(SETTLE_SECONDS)
            if self.activity() == seen:
                return False
            if self.pool.can_compact(pour=False) >= self.threshold(busy=True):
                return True

    def threshold(self, busy: bool = False) -> int:
        """Reclaimable pages that make a background pass worth it: min_pages, or 1% of the
        pool if that is more (10% while requests keep coming). Waiting for a little more to
        reclaim lets further frees empty the same zspages, so each pass moves fewer objects
        per page it frees; 1% keeps the pool within 1.01x of dense."""
        divisor = BUSY_SHARE_DIVISOR if busy else POOL_SHARE_DIVISOR
        return max(self.min_pages, self.pool.pages_used // divisor)

    async def compact_now(self) -> int:
        """Compact until nothing whole is left to reclaim; returns pages freed by this call."""
        return await self._compact()

    async def _give_way(self) -> None:
        """Let requests in; rest if any came by since the last look. Resting once per slice
        at most means steady traffic slows compaction (to about a tenth) but never stops it."""
        await trio.lowlevel.checkpoint()
        if self.activity() != self._seen_activity:
            await trio.sleep(REST_SECONDS)
        self._seen_activity = self.activity()

    async def _compact(self, pour: bool = True) -> int:
        async with self._lock:
            self._runs += 1
            pool = self.pool
            before = pool.pages_compacted  # a counter: statistics() would walk everything
            tables = pool.metadata_bytes()
            moved = 1
            while moved:
                # One slice: small steps until SLICE_SECONDS are used, then let requests in.
                started = time.perf_counter()
                slice_end = started + SLICE_SECONDS
                while True:
                    moved = pool.compact_step(self.batch, pour)
                    self._moved += moved
                    now = time.perf_counter()
                    if moved == 0 or now >= slice_end:
                        break
                self._seconds += now - started
                if moved:
                    await self._give_way()
            freed = pool.pages_compacted - before
            pool.trim()  # the frames kept warm for reuse go back to the OS too
            if tables - pool.metadata_bytes() >= HEAP_RELEASE_BYTES:
                self._release_heap()
            self._freed += freed
            return freed
