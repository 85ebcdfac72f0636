"""The control directory MOUNTPOINT/.zfs_ram: statistics and commands for shell scripts.

It plays the part of zram's sysfs directory: `cat` reads a statistic, `echo` writes a command.
It is one object, ControlDirectory, that the FUSE layer asks once per request whether an inode
(or an open handle) is its own, and then hands the request to. The directory is not listed by
readdir (like ZFS's .zfs), cannot be removed or renamed, and nothing can be created in it (the
namespace keeps its name reserved). Its files are rendered when opened and served with direct
I/O, so `cat` always sees fresh numbers although every file reports size 0.

Files (names in zfs_ram.vocabulary.ControlFile):
    mm_stat       zram's mm_stat line (vocabulary.MM_STAT_FIELDS)
    classes       the per-class table of the kernel's zsmalloc debugfs `classes`
    stats.json    everything above and more, as one JSON object
    compact       write 1: compact now; returns when done
    mem_limit     read or write the physical limit (bytes, k/m/g/t suffixes or N% of RAM;
                  0 = none)
    mem_used_max  write 0: reset the high-water mark to the current use
    pid           the daemon's process id
    comp_algorithm  the compressors, the one in use in brackets (zram's format); write a name
                  to change it while nothing is stored (EBUSY after, EINVAL if unknown)
    recomp_algorithm  zram's format (`#1: lz4 lz4hc [zstd]`), the mount option's choice
    idle          write `all` or SECONDS: mark pages idle (every one, or not accessed that long)
    recompress    write `type=idle|huge|huge_idle`: recompress them with recomp_algorithm
                  (EINVAL without one)
    writeback     write `idle|huge|huge_idle|incompressible` (or `type=...`): move those pages
                  to the backing file (ENODEV without one, as zram; the file's errno, e.g.
                  ENOSPC, if it refuses a write; either way a line in the daemon's log)
    bd_stat       zram's bd_stat line (vocabulary.BD_STAT_FIELDS, in pages); zeros without
                  a backing file
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pyfuse3

from zfs_ram import native
from zfs_ram.backing import BackingWriteError, NoBackingFileError
from zfs_ram.codec import ALGORITHMS, Codec
from zfs_ram.fs.config import FsConfig
from zfs_ram.fs.errors import FsError
from zfs_ram.fs.namespace import Namespace
from zfs_ram.fs.requests import RequestMeter
from zfs_ram.pagestore import PageStore, StoreBusyError
from zfs_ram.pool import ClassStats, Pool
from zfs_ram.vocabulary import (
    BD_STAT_FIELDS,
    CONTROL_DIR,
    MM_STAT_FIELDS,
    PAGE_SIZE,
    ControlFile,
    mem_total_bytes,
    parse_size,
)

log = logging.getLogger(__name__)

CONTROL_NAME = CONTROL_DIR.encode()
CONTROL_DIR_INO = 2  # pyfuse3.ROOT_INODE is 1; 2..15 are the control directory and its files
FIRST_CONTROL_FILE_INO = 3
FIRST_REGULAR_INO = 16


class Compaction(Protocol):
    """What the filesystem needs of the compactor, which the daemon runs beside it."""

    async def compact_now(self) -> int: ...

    def statistics(self) -> Any: ...


class Recompression(Protocol):
    """What the control files need of the recompressor (zfs_ram.daemon.recompressor)."""

    async def mark_idle(self, older_than: float | None) -> int: ...

    async def recompress(self, idle: bool, huge: bool) -> int:
        """Raises ValueError, having changed nothing, without a recomp_algorithm."""

    def statistics(self) -> Any: ...


class WritebackWalk(Protocol):
    """What the writeback file needs (zfs_ram.daemon.writeback.Writeback)."""

    async def writeback(self, idle: bool, huge: bool, incompressible: bool) -> Any:
        """Raises NoBackingFileError without a backing file, BackingWriteError if it refuses
        a write."""

    def statistics(self) -> Any: ...


#: recompress's types, as zram names them -> (only idle pages, only huge pages).
RECOMPRESS_TYPES = {"idle": (True, False), "huge": (False, True), "huge_idle": (True, True)}
#: writeback's, as zram names them -> (only idle pages, only huge ones, only incompressible).
WRITEBACK_TYPES = {
    "idle": (True, False, False),
    "huge": (False, True, False),
    "huge_idle": (True, True, False),
    "incompressible": (False, False, True),
}


def parse_idle(text: str) -> float | None:
    """`echo all > idle` -> None (every page), `echo 3600 > idle` -> 3600.0; ValueError else."""
    value = text.strip()
    if value == "all":
        return None
    if not value.isdigit():
        raise ValueError(f"idle: expected 'all' or seconds, not {value!r}")
    return float(value)


def parse_recompress(text: str) -> tuple[bool, bool]:
    """`type=idle` -> (only idle pages, only huge pages); nothing: every page. zram's other
    keys (max_pages, threshold, algo, priority) are not supported: ValueError."""
    idle = huge = False
    for token in text.split():
        key, _, value = token.partition("=")
        if key != "type" or value not in RECOMPRESS_TYPES:
            raise ValueError(f"recompress: expected type={'|'.join(RECOMPRESS_TYPES)}")
        idle, huge = RECOMPRESS_TYPES[value]
    return idle, huge


def parse_writeback(text: str) -> tuple[bool, bool, bool]:
    """`idle` or `type=idle` (zram's older and 6.16 forms) -> (idle, huge, incompressible).
    zram's page_index= and page_indexes= are not supported: ValueError."""
    tokens = text.split()
    value = tokens[0].removeprefix("type=") if len(tokens) == 1 else ""
    if value not in WRITEBACK_TYPES:
        raise ValueError(f"writeback: expected {'|'.join(WRITEBACK_TYPES)}")
    return WRITEBACK_TYPES[value]


def bd_stat(store: PageStore) -> dict[str, int]:
    """zram's bd_stat fields, by name, in pages; zeros without a backing file."""
    backing = store.backing
    if backing is None:
        return dict.fromkeys(BD_STAT_FIELDS, 0)
    values = {"bd_count": backing.count, "bd_reads": backing.reads, "bd_writes": backing.writes}
    return {name: values[name] for name in BD_STAT_FIELDS}


class MountStatistics:
    """What the control files report, gathered from the parts of one mount."""

    def __init__(
        self,
        config: FsConfig,
        pool: Pool,
        store: PageStore,
        compactor: Compaction,
        namespace: Namespace,
        meter: RequestMeter,
        recompressor: Recompression,
        writeback: WritebackWalk,
    ) -> None:
        self.config = config
        self.pool = pool
        self.store = store
        self.compactor = compactor
        self.namespace = namespace
        self.meter = meter
        self.recompressor = recompressor
        self.writeback = writeback

    def mm_stat(self) -> dict[str, int]:
        """zram's mm_stat fields, by name. O(1): counters only."""
        store, pool = self.store, self.pool
        values = {
            "orig_data_size": store.stored_pages * PAGE_SIZE,
            "compr_data_size": store.compr_bytes,
            "mem_used_total": pool.pages_used * PAGE_SIZE,
            "mem_limit": pool.mem_limit_pages * PAGE_SIZE,
            "mem_used_max": pool.max_pages_used * PAGE_SIZE,
            "same_pages": store.same_pages,
            "pages_compacted": pool.pages_compacted,
            "huge_pages": store.huge_pages,
            "huge_pages_since": store.huge_pages_since,
        }
        return {name: values[name] for name in MM_STAT_FIELDS}

    def stats(self) -> dict[str, Any]:
        """Everything a monitoring script may want, for stats.json and `zfs-ram stat`: the
        short sections first, the per-class table (hundreds of rows) last."""
        config, store, namespace = self.config, self.store, self.namespace
        return {
            "mm_stat": self.mm_stat(),
            "fs": {
                "size_bytes": store.size_limit_pages * PAGE_SIZE,
                "used_bytes": store.used_pages * PAGE_SIZE,
                "nr_inodes": config.nr_inodes,
                "inodes_used": namespace.inodes_used,
                "pool": config.pool,
                "comp_algorithm": store.codec.algorithm.name,
                "compact": config.compact,
                "read_only_reason": namespace.read_only_reason,
                "requests": self.meter.total,
            },
            # Which engine runs the per-page work: "native" (the C modules) or "python".
            "engines": native.engines(),
            "requests": self.meter.statistics(),
            "pool": self.pool.statistics(),
            "store": store.statistics(),
            # Per compressor: the pages it encoded that are kept, and their bytes.
            "algorithms": store.algorithm_statistics(),
            "compactor": self.compactor.statistics(),
            "recompress": self.recompressor.statistics(),
            # zram's bd_stat and the backing file's cost on its disk; null without one.
            "backing": store.backing_statistics(),
            "writeback": self.writeback.statistics(),
            "pid": os.getpid(),
            "classes": self.pool.class_statistics(),
        }


def algorithm_choices(current: str) -> bytes:
    """zram's comp_algorithm format: every compressor, the one in use in brackets."""
    names = (f"[{name}]" if name == current else name for name in ALGORITHMS)
    return (" ".join(names) + "\n").encode()


def recomp_algorithm_choices(store: PageStore) -> bytes:
    """zram's recomp_algorithm format: the priority, then the names; empty without one."""
    codec = store.recomp_codec
    if codec is None:
        return b""
    return b"#1: " + algorithm_choices(codec.algorithm.name)


def bd_stat_line(bd: dict[str, int]) -> bytes:
    """zram's bd_stat format: three right-aligned columns."""
    return (" ".join(f"{bd[name]:8d}" for name in BD_STAT_FIELDS) + "\n").encode()


def mm_stat_line(mm: dict[str, int]) -> bytes:
    """zram's mm_stat format: nine right-aligned columns."""
    return (" ".join(f"{mm[name]:8d}" for name in MM_STAT_FIELDS) + "\n").encode()


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
        values = [
            *row.inuse_histogram,
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
    """Frozen statistics records as objects; keys in the order the sections were built."""

    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        raise TypeError(f"not serialisable: {type(obj).__name__}")

    return (json.dumps(value, default=default, indent=2) + "\n").encode()


@dataclass(frozen=True)
class _File:
    name: bytes
    ino: int
    mode: int  # permission bits; the owner is the mounting user
    render: Callable[[], bytes] | None  # what a read returns
    apply: Callable[[bytes], Awaitable[None]] | None  # what a write does


class ControlDirectory:
    """The control directory and its files, as the FUSE layer serves them."""

    def __init__(
        self,
        statistics: MountStatistics,
        *,
        cache_timeout: float,
        ram_bytes: Callable[[], int] = mem_total_bytes,
    ) -> None:
        self.statistics = statistics
        self.cache_timeout = cache_timeout
        self.ram_bytes = ram_bytes  # what `echo 50% > mem_limit` is a share of
        # open handle -> what renders its file (None: write-only or a command file), and
        # the text of its latest read from offset 0 (see read)
        self._renderers: dict[int, Callable[[], bytes] | None] = {}
        self._buffers: dict[int, bytes] = {}
        pool = statistics.pool
        specs: list[tuple[str, int, Callable[[], bytes] | None, Any]] = [
            (ControlFile.MM_STAT, 0o444, lambda: mm_stat_line(statistics.mm_stat()), None),
            (ControlFile.CLASSES, 0o444, lambda: classes_table(pool.class_statistics()), None),
            (ControlFile.STATS_JSON, 0o444, lambda: as_json(statistics.stats()), None),
            (ControlFile.COMPACT, 0o200, None, self._apply_compact),
            (
                ControlFile.MEM_LIMIT,
                0o644,
                lambda: f"{pool.mem_limit_pages * PAGE_SIZE}\n".encode(),
                self._apply_mem_limit,
            ),
            (ControlFile.MEM_USED_MAX, 0o200, None, self._apply_mem_used_max),
            (ControlFile.PID, 0o444, lambda: f"{os.getpid()}\n".encode(), None),
            (
                ControlFile.COMP_ALGORITHM,
                0o644,
                lambda: algorithm_choices(statistics.store.codec.algorithm.name),
                self._apply_comp_algorithm,
            ),
            (
                ControlFile.RECOMP_ALGORITHM,
                0o444,
                lambda: recomp_algorithm_choices(statistics.store),
                None,
            ),
            (ControlFile.IDLE, 0o200, None, self._apply_idle),
            (ControlFile.RECOMPRESS, 0o200, None, self._apply_recompress),
            (ControlFile.WRITEBACK, 0o200, None, self._apply_writeback),
            (
                ControlFile.BD_STAT,
                0o444,
                lambda: bd_stat_line(bd_stat(statistics.store)),
                None,
            ),
        ]
        self.files = [
            _File(name.encode(), FIRST_CONTROL_FILE_INO + i, mode, render, apply)
            for i, (name, mode, render, apply) in enumerate(specs)
        ]
        assert FIRST_CONTROL_FILE_INO + len(self.files) <= FIRST_REGULAR_INO
        self._by_name = {f.name: f for f in self.files}
        self._by_ino = {f.ino: f for f in self.files}

    # -- the one check ------------------------------------------------------------------------

    @staticmethod
    def owns(ino: int) -> bool:
        """Whether an inode number is the control directory's or one of its files'."""
        return CONTROL_DIR_INO <= ino < FIRST_REGULAR_INO

    def holds(self, fh: int) -> bool:
        """Whether an open file handle is of a control file."""
        return fh in self._renderers

    # -- attributes and names -------------------------------------------------------------------

    def attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        is_dir = ino == CONTROL_DIR_INO
        mode = stat.S_IFDIR | 0o555 if is_dir else stat.S_IFREG | self._file(ino).mode
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.st_mode = mode
        attrs.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        attrs.st_uid = os.geteuid()  # owned by the daemon's user
        attrs.st_gid = os.getegid()
        attrs.st_size = 0
        attrs.st_blksize = PAGE_SIZE
        attrs.st_blocks = 0
        attrs.entry_timeout = self.cache_timeout
        attrs.attr_timeout = self.cache_timeout
        return attrs

    def _file(self, ino: int) -> _File:
        cfile = self._by_ino.get(ino)
        if cfile is None:
            raise FsError(errno.ENOENT)
        return cfile

    def lookup(self, name: bytes) -> int:
        """The inode of a name inside the control directory ('..' is the caller's)."""
        if name == b".":
            return CONTROL_DIR_INO
        cfile = self._by_name.get(name)
        if cfile is None:
            raise FsError(errno.ENOENT)
        return cfile.ino

    def setattr(self, ino: int, size_only: bool) -> None:
        """`echo 1 > .zfs_ram/compact` may truncate first: there is nothing to cut, and
        nothing else about these files can be changed."""
        if ino == CONTROL_DIR_INO or not size_only:
            raise FsError(errno.EPERM)
        self._file(ino)

    def listing(self) -> list[tuple[bytes, int]]:
        """(name, inode) of the directory's entries after '.' and '..'."""
        return [(f.name, f.ino) for f in self.files]

    # -- open files -----------------------------------------------------------------------------

    def open(self, fh: int, ino: int, write_only: bool) -> None:
        if ino == CONTROL_DIR_INO:
            raise FsError(errno.EISDIR)
        render = self._file(ino).render
        self._renderers[fh] = None if write_only else render

    def read(self, fh: int, offset: int, size: int) -> bytes:
        """A read from offset 0 renders the file afresh, as in procfs and sysfs, so that a
        monitor may keep it open and pread it again; a read further on continues that same
        text, so that a reader in several pieces sees one consistent file."""
        buffer = self._buffers.get(fh)
        if offset == 0 or buffer is None:
            render = self._renderers[fh]
            buffer = self._buffers[fh] = render() if render is not None else b""
        return buffer[offset : offset + size]

    async def write(self, ino: int, data: bytes) -> None:
        apply = self._file(ino).apply
        if apply is None:
            raise FsError(errno.EACCES)
        await apply(data)

    def release(self, fh: int) -> None:
        self._renderers.pop(fh, None)
        self._buffers.pop(fh, None)

    # -- commands -------------------------------------------------------------------------------

    async def _apply_compact(self, value: bytes) -> None:
        if value.strip() != b"1":
            raise FsError(errno.EINVAL)
        await self.statistics.compactor.compact_now()

    async def _apply_mem_limit(self, value: bytes) -> None:
        try:
            limit = parse_size(value.decode("ascii", "replace"), self.ram_bytes())
        except ValueError:
            raise FsError(errno.EINVAL) from None
        self.statistics.pool.mem_limit_pages = limit // PAGE_SIZE

    async def _apply_comp_algorithm(self, value: bytes) -> None:
        name = value.decode("ascii", "replace").strip()
        store = self.statistics.store
        if name not in ALGORITHMS:
            raise FsError(errno.EINVAL)
        if name == store.codec.algorithm.name:
            return
        try:
            store.change_codec(Codec(name, engine=store.codec.engine))
        except StoreBusyError:
            raise FsError(errno.EBUSY) from None
        except ValueError:  # the recomp_algorithm's: the two must differ
            raise FsError(errno.EINVAL) from None

    async def _apply_idle(self, value: bytes) -> None:
        try:
            older_than = parse_idle(value.decode("ascii", "replace"))
        except ValueError:
            raise FsError(errno.EINVAL) from None
        await self.statistics.recompressor.mark_idle(older_than)

    async def _apply_recompress(self, value: bytes) -> None:
        try:
            idle, huge = parse_recompress(value.decode("ascii", "replace"))
            # Refused before it changes anything without a recomp_algorithm (zram: -EINVAL).
            await self.statistics.recompressor.recompress(idle, huge)
        except ValueError:
            raise FsError(errno.EINVAL) from None

    async def _apply_writeback(self, value: bytes) -> None:
        try:
            idle, huge, incompressible = parse_writeback(value.decode("ascii", "replace"))
        except ValueError:
            raise FsError(errno.EINVAL) from None
        try:
            await self.statistics.writeback.writeback(idle, huge, incompressible)
        except NoBackingFileError as error:
            log.warning("writeback refused: %s", error)
            raise FsError(errno.ENODEV) from None  # zram's answer without a backing_dev
        except BackingWriteError as error:
            log.warning("%s", error)
            raise FsError(error.errno) from None

    async def _apply_mem_used_max(self, value: bytes) -> None:
        if value.strip() != b"0":
            raise FsError(errno.EINVAL)
        self.statistics.pool.reset_max_pages()
