"""The control directory MOUNTPOINT/.zfs_ram: statistics and commands for shell scripts.

It plays the part of zram's sysfs directory: `cat` reads a statistic, `echo` writes a command.
The directory is not listed by readdir (like ZFS's .zfs), cannot be removed or renamed, and
nothing can be created in it. Its files are generated when opened and served with direct I/O,
so `cat` always sees fresh numbers although every file reports size 0.

Files:
    mm_stat       zram's mm_stat line: orig_data_size compr_data_size mem_used_total mem_limit
                  mem_used_max same_pages pages_compacted huge_pages huge_pages_since
    classes       the per-class table of the kernel's zsmalloc debugfs `classes`
    stats.json    everything above and more, as one JSON object
    compact       write 1: compact now; returns when done
    mem_limit     read or write the physical limit (bytes, k/m/g suffixes; 0 = none)
    mem_used_max  write 0: reset the high-water mark to the current use
    pid           the daemon's process id
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3

from zfs_ram.codec import PAGE_SIZE
from zfs_ram.pool import ClassStats

# zram's mm_stat columns, in its order (Documentation/admin-guide/blockdev/zram.rst).
MM_STAT_FIELDS = (
    "orig_data_size",
    "compr_data_size",
    "mem_used_total",
    "mem_limit",
    "mem_used_max",
    "same_pages",
    "pages_compacted",
    "huge_pages",
    "huge_pages_since",
)
CONTROL_NAME = b".zfs_ram"
CONTROL_DIR_INO = 2  # pyfuse3.ROOT_INODE is 1; 2..15 are the control directory and its files
FIRST_CONTROL_FILE_INO = 3
FIRST_REGULAR_INO = 16


@dataclass(frozen=True)
class ControlFile:
    name: bytes
    ino: int
    mode: int  # permission bits; the owner is the mounting user
    render: Callable[[], bytes] | None  # what a read returns
    apply: Callable[[bytes], Awaitable[None]] | None  # what a write does


_SIZE = re.compile(rb"\s*(\d+)\s*([kmgtKMGT]?)\s*")
_UNITS = {b"": 1, b"k": 1 << 10, b"m": 1 << 20, b"g": 1 << 30, b"t": 1 << 40}


MAX_SIZE = (1 << 63) - 1  # what a 64-bit kernel could be asked for at all


def parse_size(text: bytes) -> int:
    """Bytes from '4096', '64k', '1G' (zram's memparse); raises FUSEError(EINVAL) otherwise,
    also for sizes no machine has."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise pyfuse3.FUSEError(errno.EINVAL)
    size = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if size > MAX_SIZE:
        raise pyfuse3.FUSEError(errno.EINVAL)
    return size


def mm_stat_line(mm: dict[str, int]) -> bytes:
    """zram's mm_stat format: nine right-aligned columns."""
    fields = MM_STAT_FIELDS
    return (" ".join(f"{mm[name]:8d}" for name in fields) + "\n").encode()


def classes_table(rows: list[ClassStats]) -> bytes:
    """The kernel's zsmalloc `classes` debugfs table, with a Total row."""
    buckets = ["10%", "20%", "30%", "40%", "50%", "60%", "70%", "80%", "90%", "99%", "100%"]
    header = f"{'class':>5} {'size':>5} " + " ".join(f"{b:>6}" for b in buckets)
    header += (
        f" {'obj_allocated':>13} {'obj_used':>10} {'pages_used':>10}"
        f" {'pages_per_zspage':>16} {'freeable':>8}"
    )
    lines = [header]
    totals = [0] * (len(buckets) + 4)
    for row in rows:
        values = list(row.inuse_histogram) + [
            row.obj_allocated,
            row.obj_used,
            row.pages_used,
            row.freeable,
        ]
        for i, value in enumerate(values):
            totals[i] += value
        line = f"{row.index:5d} {row.size:5d} " + " ".join(f"{v:6d}" for v in row.inuse_histogram)
        line += (
            f" {row.obj_allocated:13d} {row.obj_used:10d} {row.pages_used:10d}"
            f" {row.pages_per_zspage:16d} {row.freeable:8d}"
        )
        lines.append(line)
    total = f"{'Total':>5} {'':>5} " + " ".join(f"{v:6d}" for v in totals[: len(buckets)])
    total += f" {totals[-4]:13d} {totals[-3]:10d} {totals[-2]:10d} {'':>16} {totals[-1]:8d}"
    lines.append(total)
    return ("\n".join(lines) + "\n").encode()


def as_json(value: Any) -> bytes:
    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        raise TypeError(f"not serialisable: {type(obj).__name__}")

    return (json.dumps(value, default=default, indent=1, sort_keys=True) + "\n").encode()


def control_attributes(ino: int, mode: int, entry_timeout: float) -> pyfuse3.EntryAttributes:
    """Attributes of the control directory or one of its files (owned by the daemon's user)."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = ino
    attrs.st_mode = mode
    attrs.st_nlink = 2 if stat.S_ISDIR(mode) else 1
    attrs.st_uid = os.geteuid()
    attrs.st_gid = os.getegid()
    attrs.st_size = 0
    attrs.st_blksize = PAGE_SIZE
    attrs.st_blocks = 0
    attrs.entry_timeout = entry_timeout
    attrs.attr_timeout = entry_timeout
    return attrs
