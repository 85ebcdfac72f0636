"""zram's writeback command, walked over every file from the event loop.

The page store writes back one page-table chunk at a time (PageStore.writeback_chunk:
synchronous, at most CHUNK_PAGES pages); this walk checkpoints after every chunk, so a FUSE
request waits for at most one chunk's pwrite. A file truncated or released between two steps
simply has fewer chunks left (each is looked up afresh). writeback=auto needs no walk: the page
store writes back by itself when mem_limit refuses an object (zfs_ram.backing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from zfs_ram.backing import NoBackingFileError
from zfs_ram.pagestore import PageStore
from zfs_ram.pagetable import FileData


@dataclass(frozen=True)
class WritebackRun:
    """What one `echo ... > writeback` did."""

    pages: int


class Writeback:
    """Writes idle, huge or incompressible pages of every file to the backing file."""

    def __init__(self, store: PageStore, files: Callable[[], Iterable[FileData]]) -> None:
        self.store = store
        self.files = files  # every regular file's data, detached ones included
        self.runs = 0

    async def writeback(self, idle: bool, huge: bool, incompressible: bool) -> WritebackRun:
        """zram's writeback over every file. NoBackingFileError (nothing changed) without a
        backing file; BackingWriteError when the file refuses a write (the pages written
        before it stay written back, the rest in memory)."""
        if self.store.backing is None:
            raise NoBackingFileError("no backing_file (mount with -o backing_file=PATH)")
        self.runs += 1
        done = 0
        for data in list(self.files()):
            for key in sorted(data.chunks):
                done += self.store.writeback_chunk(data, key, idle, huge, incompressible)
                await trio.lowlevel.checkpoint()
        return WritebackRun(done)
