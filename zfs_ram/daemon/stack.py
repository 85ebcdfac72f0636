"""Wiring one mount: the parts are built here, bottom up, and handed to each other.

As s3ql's mount.py builds its caches and hands them to its Operations, this is the one place
that knows every layer: the pool (zsmalloc or zbud), the page store over it, the compactor that
the page store wakes when it frees objects, the namespace, the control directory, and the
pyfuse3 Operations that translate requests for them. No layer builds the one below it.

A byte's way through the result: Operations.write -> PageStore.write cuts the buffer into
pages -> codec.encode_pages compresses each (or finds it same-filled or incompressible) ->
Pool.store allocates an object and returns a handle -> the file's page table keeps it. An
unlink or truncate frees handles; the page store calls on_free, which wakes the compactor; the
compactor moves objects out of sparse zspages and the arena hands emptied frames back to the OS
(madvise). Reads walk the same way back.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from zfs_ram.backing import BackingFile
from zfs_ram.codec import Codec
from zfs_ram.daemon.compactor import Compactor
from zfs_ram.daemon.heap import release_c_heap
from zfs_ram.daemon.recompressor import Recompressor
from zfs_ram.daemon.writeback import Writeback
from zfs_ram.fs.config import FsConfig
from zfs_ram.fs.control import (
    CONTROL_DIR_INO,
    CONTROL_NAME,
    FIRST_REGULAR_INO,
    ControlDirectory,
    MountStatistics,
)
from zfs_ram.fs.namespace import Namespace, Reserved
from zfs_ram.fs.operations import CACHE_TIMEOUT, ZfsRamOperations
from zfs_ram.fs.requests import RequestMeter
from zfs_ram.pagestore import PageStore
from zfs_ram.pagetable import FileData
from zfs_ram.pool import Pool, create_pool
from zfs_ram.vocabulary import PAGE_SIZE


@dataclass
class Filesystem:
    """One mount's parts, wired; what the lifecycle serves."""

    config: FsConfig
    pool: Pool
    store: PageStore
    compactor: Compactor
    recompressor: Recompressor
    writeback: Writeback
    namespace: Namespace
    control: ControlDirectory
    operations: ZfsRamOperations

    async def run_background(self) -> None:
        """The mount's background work: the compactor, (idle_recompress) the recompressor
        and (writeback=auto) the watch on memory pressure. Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.recompressor.run)
            nursery.start_soon(self.writeback.run)
            await self.compactor.run()

    def shutdown(self) -> None:
        """After unmount: drop every inode, free the pool, empty the backing file."""
        self.namespace.release_all()
        self.pool.close()
        if self.store.backing is not None:
            self.store.backing.close()


def build(config: FsConfig) -> Filesystem:
    """A fresh, empty filesystem for `config`. Raises BackingFileError (one line) if the
    backing file cannot be used: it is opened first, before anything else is built."""
    backing = BackingFile(config.backing_file) if config.backing_file else None
    meter = RequestMeter()
    pool = create_pool(config.pool, mem_limit_pages=config.mem_limit_pages)
    compactor = Compactor(
        pool,
        auto=config.compact == "auto",
        min_pages=config.compact_min_pages,
        batch=config.compact_batch,
        activity=lambda: meter.total,
        release_heap=release_c_heap,
    )
    store = PageStore(
        pool,
        size_limit_pages=config.size_bytes // PAGE_SIZE,
        on_free=compactor.notify_freed,
        codec=Codec(config.comp_algorithm),
        recomp_codec=Codec(config.recomp_algorithm) if config.recomp_algorithm else None,
    )
    namespace = Namespace(
        store,
        config,
        reserved=Reserved(CONTROL_NAME, CONTROL_DIR_INO),
        first_ino=FIRST_REGULAR_INO,
        on_shrink=release_c_heap,
    )

    def files() -> list[FileData]:
        return [inode.data for inode in namespace.inodes.values() if inode.data is not None]

    recompressor = Recompressor(store, files, idle_recompress_seconds=config.idle_recompress)
    if backing is not None:
        store.attach_backing(backing, files, auto=config.writeback == "auto")
    writeback = Writeback(store, files, auto=config.writeback == "auto")
    statistics = MountStatistics(
        config, pool, store, compactor, namespace, meter, recompressor, writeback
    )
    control = ControlDirectory(statistics, cache_timeout=CACHE_TIMEOUT)
    operations = ZfsRamOperations(
        namespace=namespace,
        store=store,
        compaction=compactor,
        control=control,
        meter=meter,
        xattrs=config.xattrs,
    )
    return Filesystem(
        config, pool, store, compactor, recompressor, writeback, namespace, control, operations
    )
