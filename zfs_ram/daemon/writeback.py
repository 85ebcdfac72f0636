"""zram's writeback command, and writeback=auto's watch on memory pressure, over every file.

The page store writes back one page-table chunk at a time (PageStore.writeback_chunk:
synchronous, at most CHUNK_PAGES pages); this walk checkpoints after every chunk, so a FUSE
request waits for at most one chunk's pwrite. A file truncated or released between two steps
simply has fewer chunks left (each is looked up afresh).

writeback=auto has two triggers. At mem_limit the page store writes back by itself, inside the
refused write (zfs_ram.backing). Under memory pressure, the background task here does: every
PRESSURE_INTERVAL_SECONDS it reads the kernel's pressure stall information for memory
(/proc/pressure/memory), and while `some avg10` (the share of the last 10 s in which some task
waited for memory) is at least PRESSURE_SOME_PERCENT, it writes back the pages not read or
written for PRESSURE_IDLE_SECONDS (marking them idle, as `echo SECONDS > idle` would). A kernel
without PSI leaves only the mem_limit trigger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from zfs_ram.backing import BackingWriteError, NoBackingFileError
from zfs_ram.pagestore import PageStore
from zfs_ram.pagetable import FileData

log = logging.getLogger(__name__)

PRESSURE_PATH = "/proc/pressure/memory"
# avg10 is a 10 s average, updated every 2 s by the kernel: looking more often sees the same.
PRESSURE_INTERVAL_SECONDS = 2.0
# Tasks stalled on memory a tenth of the time: reclaim is hurting, well before the OOM killer.
PRESSURE_SOME_PERCENT = 10.0
# Under pressure, pages untouched this long go to the backing file (busy ones stay in RAM).
PRESSURE_IDLE_SECONDS = 60


def memory_pressure(path: str = PRESSURE_PATH) -> float | None:
    """`some avg10` of a PSI file, in percent; None if there is no such file or line."""
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                kind, *fields = line.split()
                if kind == "some":
                    values = dict(field.split("=", 1) for field in fields)
                    return float(values["avg10"])
    except (OSError, ValueError, KeyError):
        return None
    return None


@dataclass(frozen=True)
class WritebackStats:
    runs: int  # `echo ... > writeback` commands
    pages: int  # pages they wrote back
    pressure_runs: int  # passes writeback=auto made under memory pressure
    pressure_pages: int  # pages those wrote back
    seconds: float  # time spent inside the page store's steps


class Writeback:
    """Writes idle, huge or incompressible pages of every file to the backing file."""

    def __init__(
        self,
        store: PageStore,
        files: Callable[[], Iterable[FileData]],
        *,
        auto: bool = False,
        pressure_path: str = PRESSURE_PATH,
    ) -> None:
        self.store = store
        self.files = files  # every regular file's data, detached ones included
        self.auto = auto  # writeback=auto: watch memory pressure too
        self.pressure_path = pressure_path
        self._runs = self._pages = self._pressure_runs = self._pressure_pages = 0
        self._seconds = 0.0

    def statistics(self) -> WritebackStats:
        return WritebackStats(
            self._runs, self._pages, self._pressure_runs, self._pressure_pages, self._seconds
        )

    async def writeback(self, idle: bool, huge: bool, incompressible: bool) -> int:
        """zram's writeback over every file; the pages written back. NoBackingFileError
        (nothing changed) without a backing file; BackingWriteError when the file refuses a
        write (the pages written before it stay written back, the rest in memory)."""
        if self.store.backing is None:
            raise NoBackingFileError("no backing_file (mount with -o backing_file=PATH)")
        self._runs += 1
        done = await self._walk(idle, huge, incompressible)
        self._pages += done
        return done

    async def _walk(self, idle: bool, huge: bool, incompressible: bool) -> int:
        done = 0
        for data in list(self.files()):
            for key in sorted(data.chunks):
                started = time.perf_counter()
                try:
                    done += self.store.writeback_chunk(data, key, idle, huge, incompressible)
                except BackingWriteError as error:
                    error.written += done  # the whole walk's
                    raise
                finally:
                    self._seconds += time.perf_counter() - started
                await trio.lowlevel.checkpoint()
        return done

    async def run(self) -> None:
        """writeback=auto's watch on memory pressure. Returns at once when it is off, or
        when the kernel has no PSI; runs until cancelled."""
        if not self.auto or self.store.backing is None:
            return
        if memory_pressure(self.pressure_path) is None:
            log.info("no %s: writeback=auto acts at mem_limit only", self.pressure_path)
            return
        refused: int | None = None  # the errno the backing file last refused a pass with
        while True:
            await trio.sleep(PRESSURE_INTERVAL_SECONDS)
            pressure = memory_pressure(self.pressure_path)
            if pressure is None or pressure < PRESSURE_SOME_PERCENT:
                continue
            cutoff = self.store.idle_cutoff(PRESSURE_IDLE_SECONDS)
            for data in list(self.files()):
                self.store.mark_idle(data, cutoff)
                await trio.lowlevel.checkpoint()
            self._pressure_runs += 1
            try:
                self._pressure_pages += await self._walk(
                    idle=True, huge=False, incompressible=False
                )
                refused = None
            except BackingWriteError as error:
                self._pressure_pages += error.written
                if error.errno != refused:  # said once, not every interval while it lasts
                    log.warning("writeback=auto under memory pressure: %s", error)
                refused = error.errno
