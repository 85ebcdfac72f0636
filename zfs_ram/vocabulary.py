"""The names and units every layer of zfs_ram shares, each defined once.

Pure: no imports beyond the standard library, so the pool, the codec and the page store can use
it without pulling in trio or pyfuse3. Whatever two layers (or the daemon and a script that
reads its control directory) must agree on lives here: the page size, zram's mm_stat columns,
the control directory and its files, the filesystem type, and the byte-size syntax that mount
options and the control files accept.
"""

from __future__ import annotations

import re

# The unit everything counts in: a file page, a pool frame, a zsmalloc zspage's building block.
# x86-64's and arm64's base page size: the kernel's zram and zsmalloc use the same unit.
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# zram's mm_stat columns, in its order (Documentation/admin-guide/blockdev/zram.rst).
MM_STAT_FIELDS: tuple[str, ...] = (
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

# How the kernel names a zfs_ram mount: /proc/mounts shows "fuse.zfs_ram" as its type.
SUBTYPE = "zfs_ram"
FSTYPE = f"fuse.{SUBTYPE}"
DEFAULT_FSNAME = "zfs_ram"  # first field of /proc/mounts and df, unless fsname= says otherwise

# MOUNTPOINT/.zfs_ram: zram's sysfs directory for shell scripts, and its files.
CONTROL_DIR = ".zfs_ram"


class ControlFile:
    """The names of the control directory's files (see zfs_ram.fs.control for what each does)."""

    MM_STAT = "mm_stat"
    CLASSES = "classes"
    STATS_JSON = "stats.json"
    COMPACT = "compact"
    MEM_LIMIT = "mem_limit"
    MEM_USED_MAX = "mem_used_max"
    PID = "pid"
    COMP_ALGORITHM = "comp_algorithm"
    RECOMP_ALGORITHM = "recomp_algorithm"
    IDLE = "idle"
    RECOMPRESS = "recompress"
    WRITEBACK = "writeback"
    BD_STAT = "bd_stat"


# zram's bd_stat columns, in its order: pages on the backing file now, read from it, written.
BD_STAT_FIELDS: tuple[str, ...] = ("bd_count", "bd_reads", "bd_writes")


# The largest size a 64-bit kernel could be asked for at all: anything above is a typo.
MAX_SIZE_BYTES = (1 << 63) - 1

# memparse()-style binary suffixes, as tmpfs and zram accept them (case-insensitive).
_SUFFIX_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
_BYTES = re.compile(r"\s*(\d+)\s*([kmgt]?)\s*", re.IGNORECASE)
_PERCENT = re.compile(r"\s*(\d+)%\s*")
SIZE_SYNTAX = "expected bytes with k/m/g/t suffix or N%"


def parse_mm_stat(line: str, *, exact: bool = True) -> dict[str, int]:
    """mm_stat's columns by name. ``exact``: all of MM_STAT_FIELDS must be there, as zfs_ram
    writes them; otherwise a kernel's line may have fewer (older kernels) and at least three.
    Raises ValueError on anything else."""
    fields = line.split()
    if not all(field.isdigit() for field in fields):
        raise ValueError(f"mm_stat has a column that is not a count: {line!r}")
    fits = len(fields) == len(MM_STAT_FIELDS) if exact else len(fields) >= 3
    if not fits:
        raise ValueError(f"mm_stat has {len(fields)} columns: {line!r}")
    return dict(zip(MM_STAT_FIELDS, map(int, fields), strict=False))


def round_up_pages(n: int) -> int:
    """Limits count whole pages, as tmpfs's DIV_ROUND_UP(size, PAGE_SIZE) and zram's PAGE_ALIGN:
    "1k" must not mean "no limit"."""
    return -(-n // PAGE_SIZE) * PAGE_SIZE


def parse_size(text: str, ram_bytes: int) -> int:
    """``4096``, ``64k``, ``1G``, ``25%`` (of ``ram_bytes``) -> bytes, rounded up to whole pages.

    The one syntax of ``-o size=``, ``-o mem_limit=`` and ``echo ... > .zfs_ram/mem_limit``.
    Raises ValueError, whose text says what was expected."""
    match = _PERCENT.fullmatch(text)
    if match:
        size = ram_bytes * int(match.group(1)) // 100
    else:
        match = _BYTES.fullmatch(text)
        if match is None:
            raise ValueError(SIZE_SYNTAX)
        size = int(match.group(1)) << _SUFFIX_SHIFT[match.group(2).lower()]
    if size > MAX_SIZE_BYTES:
        raise ValueError(f"{text.strip()} is more than any machine has")
    return round_up_pages(size)


def mem_total_bytes(meminfo_path: str = "/proc/meminfo") -> int:
    """Physical RAM as the kernel reports it: what tmpfs's ``%`` and defaults are relative to."""
    with open(meminfo_path, encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no MemTotal line in {meminfo_path}")
