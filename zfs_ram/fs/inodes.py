"""Inodes and directories in memory, with the counts that decide when an inode may go.

An inode carries three counts: its directory entries (nlink), the kernel's lookups, and its
open handles; fs/namespace.py decides from them when it goes.

Directories keep their entries in insertion order with a per-directory cookie that only grows,
so readdir can resume at any cookie and neither loses nor repeats an entry while the directory
changes (entries added during a listing may or may not appear, as POSIX allows).
"""

from __future__ import annotations

import bisect
import stat
import time

from zfs_ram.pagetable import FileData


def now_ns() -> int:
    return time.time_ns()


class Directory:
    """A directory's entries: name -> inode number, listed in cookie order."""

    __slots__ = ("entries", "cookies", "order", "next_cookie", "parent")

    def __init__(self, parent: int) -> None:
        self.entries: dict[bytes, int] = {}
        self.cookies: dict[bytes, int] = {}
        # (cookie, name) in cookie order; removed names stay until the next rebuild.
        self.order: list[tuple[int, bytes]] = []
        self.next_cookie = 3  # 1 and 2 are kept for "." and ".."
        self.parent = parent

    def add(self, name: bytes, ino: int) -> None:
        cookie = self.next_cookie
        self.next_cookie += 1
        self.entries[name] = ino
        self.cookies[name] = cookie
        self.order.append((cookie, name))

    def remove(self, name: bytes) -> int:
        ino = self.entries.pop(name)
        del self.cookies[name]
        if len(self.order) > 64 and len(self.order) > 2 * len(self.entries):
            self.order = [(c, n) for c, n in self.order if self.cookies.get(n) == c]
            # CPython's dicts keep the capacity they once needed after deletes; copies are
            # sized to what is left, so a directory that emptied gives its memory back too.
            # Done at the same moments as the rebuild above: O(1) per remove, amortized.
            self.entries = dict(self.entries)
            self.cookies = dict(self.cookies)
        return ino

    def replace(self, name: bytes, ino: int) -> None:
        """Point an existing name at another inode; its place in listings stays."""
        self.entries[name] = ino

    def listing_after(self, cookie: int) -> list[tuple[int, bytes]]:
        """Live (cookie, name) pairs with a cookie above `cookie`, in order."""
        start = bisect.bisect_right(self.order, (cookie, b"\xff" * 256))
        cookies = self.cookies
        return [(c, n) for c, n in self.order[start:] if cookies.get(n) == c]


class Inode:
    """One file, directory, symlink or special file."""

    __slots__ = (
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "rdev",
        "atime_ns",
        "mtime_ns",
        "ctime_ns",
        "lookups",
        "opens",
        "data",
        "dir",
        "target",
        "xattrs",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, rdev: int = 0) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 0
        self.rdev = rdev
        stamp = now_ns()
        self.atime_ns = stamp
        self.mtime_ns = stamp
        self.ctime_ns = stamp
        self.lookups = 0
        self.opens = 0
        self.data: FileData | None = FileData() if stat.S_ISREG(mode) else None
        self.dir: Directory | None = None
        self.target: bytes | None = None  # symlinks
        self.xattrs: dict[bytes, bytes] | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def size(self) -> int:
        if self.data is not None:
            return self.data.size
        if self.target is not None:
            return len(self.target)
        if self.dir is not None:
            # Like tmpfs: a directory's size grows with its entries (BOGO_DIRENT_SIZE = 20).
            return 40 + 20 * len(self.dir.entries)
        return 0

    def touch_change(self, stamp: int | None = None) -> None:
        self.ctime_ns = now_ns() if stamp is None else stamp

    def touch_modify(self) -> None:
        stamp = now_ns()
        self.mtime_ns = stamp
        self.ctime_ns = stamp
