"""zram's idle marking and recompression, walked over every file from the event loop.

The page store does the work one page-table chunk at a time (PageStore.mark_idle,
PageStore.recompress_chunk: synchronous, at most CHUNK_PAGES pages each); this module walks the
files and checkpoints after every chunk, so a FUSE request waits for at most one chunk's
recompression (512 pages, a few ms with zstd). Correctness does not depend on where it yields:
a chunk's step is one synchronous call, and a file truncated or released between two steps
simply has fewer chunks left (the walk looks each one up afresh).

The control directory (zfs_ram.fs.control) parses zram's syntax for the `idle` and
`recompress` files and calls mark_idle() and recompress() here; recompress() is refused
(NoRecompAlgorithmError, nothing changed) when the mount has no recomp_algorithm.

With idle_recompress=SECONDS the background task does both on its own, every SECONDS/2 (at
least MIN_INTERVAL_SECONDS): pages not read or written for SECONDS are recompressed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from zfs_ram.pagestore import PageStore
from zfs_ram.pagetable import FileData

# The background task looks no more often than this, whatever idle_recompress says.
MIN_INTERVAL_SECONDS = 1.0


class NoRecompAlgorithmError(ValueError):
    """recompress on a mount without recomp_algorithm (the control file answers EINVAL)."""


@dataclass(frozen=True)
class RecompressorStats:
    recomp_algorithm: str | None
    idle_recompress_seconds: int  # 0: only on command
    runs: int  # recompress passes (commands and background)
    pages_marked_idle: int
    pages_recompressed: int
    seconds: float  # time spent inside the page store's steps


class Recompressor:
    """Marks pages idle and recompresses them, on command or every so often."""

    def __init__(
        self,
        store: PageStore,
        files: Callable[[], Iterable[FileData]],
        *,
        idle_recompress_seconds: int = 0,
    ) -> None:
        self.store = store
        self.files = files  # every regular file's data, detached ones included
        self.idle_recompress_seconds = idle_recompress_seconds
        self._runs = 0
        self._marked = 0
        self._recompressed = 0
        self._seconds = 0.0

    def statistics(self) -> RecompressorStats:
        codec = self.store.recomp_codec
        return RecompressorStats(
            recomp_algorithm=codec.algorithm.name if codec is not None else None,
            idle_recompress_seconds=self.idle_recompress_seconds,
            runs=self._runs,
            pages_marked_idle=self._marked,
            pages_recompressed=self._recompressed,
            seconds=self._seconds,
        )

    async def mark_idle(self, older_than: float | None) -> int:
        """Pages not accessed for `older_than` seconds (None: all) become idle; how many."""
        cutoff = self.store.idle_cutoff(older_than)
        marked = 0
        for data in list(self.files()):
            started = time.perf_counter()
            marked += self.store.mark_idle(data, cutoff)
            self._seconds += time.perf_counter() - started
            await trio.lowlevel.checkpoint()
        self._marked += marked
        return marked

    async def recompress(self, idle: bool, huge: bool) -> int:
        """zram's recompress over every file; the pages recompressed.
        NoRecompAlgorithmError (and nothing changed) without a recomp_algorithm."""
        if self.store.recomp_codec is None:
            raise NoRecompAlgorithmError("no recomp_algorithm (mount with -o recomp_algorithm=)")
        self._runs += 1
        done = 0
        for data in list(self.files()):
            for key in sorted(data.chunks):
                started = time.perf_counter()
                done += self.store.recompress_chunk(data, key, idle, huge)
                self._seconds += time.perf_counter() - started
                await trio.lowlevel.checkpoint()
        self._recompressed += done
        return done

    async def run(self) -> None:
        """idle_recompress: every half period, recompress what was not touched for a period.
        Returns at once when it is off. Runs until cancelled."""
        period = self.idle_recompress_seconds
        if not period or self.store.recomp_codec is None:
            return
        while True:
            await trio.sleep(max(period / 2, MIN_INTERVAL_SECONDS))
            await self.mark_idle(period)
            await self.recompress(idle=True, huge=False)
