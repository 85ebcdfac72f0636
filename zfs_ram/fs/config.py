"""What a mounted filesystem is told at mount time: limits, ownership, allocator, compaction.

The daemon's option parser produces one FsConfig; the filesystem only reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from zfs_ram.vocabulary import PAGE_SIZE


@dataclass(frozen=True)
class FsConfig:
    """Settings of one mount. Zero means "no limit" for every limit, as on tmpfs and zram."""

    size_bytes: int = 0  # tmpfs size=: cap on logical pages stored (holes excluded)
    nr_inodes: int = 0  # tmpfs nr_inodes=
    mode: int = 0o1777  # tmpfs mode=: permissions of the root directory
    uid: int = os.getuid()  # tmpfs uid=: owner of the root directory
    gid: int = os.getgid()  # tmpfs gid=
    mem_limit_bytes: int = 0  # zram mem_limit: cap on the pool's physical frames
    pool: str = "zsmalloc"  # "zsmalloc" or "zbud"
    compact: str = "auto"  # "auto": background compactor runs; "off": only the manual trigger
    # The compactor runs when this many pages (or 1% of the pool, if more) are reclaimable ...
    compact_min_pages: int = 16
    # ... and moves at most this many objects per pool call; calls run in slices of ~50 us
    # between yields to the event loop (benchmarks/compaction_latency.py measures the effect).
    compact_batch: int = 4
    fsname: str = "zfs_ram"
    noatime: bool = False  # mount -o noatime: reads never update atime (else relatime rules)
    # Extended attributes are off unless -o xattr: getxattr answers ENOSYS, which the kernel
    # remembers, and it then stops asking for security.capability before every write(2), one
    # round trip in two for small writes (issue 13; README "Extended attributes").
    xattrs: bool = False
    comp_algorithm: str = "lz4"  # zram's comp_algorithm: lz4, lz4hc or zstd (codec.ALGORITHMS)
    recomp_algorithm: str = ""  # zram's recomp_algorithm (one secondary, priority 1); "": none
    # Pages not accessed for this many seconds are recompressed in the background; 0: only
    # on `echo type=idle > .zfs_ram/recompress`.
    idle_recompress: int = 0
    # zram's backing_dev: a file (absolute path) that written-back pages go to; "": none.
    backing_file: str = ""
    # "auto": when mem_limit refuses a page, write pages back (idle, huge, any) before ENOSPC,
    # and under memory pressure (PSI) write back the pages idle for a minute.
    writeback: str = "off"

    @property
    def mem_limit_pages(self) -> int:
        return self.mem_limit_bytes // PAGE_SIZE
