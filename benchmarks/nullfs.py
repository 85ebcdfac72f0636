"""A do-nothing pyfuse3 filesystem: the ceiling any pyfuse3 filesystem can reach here.

It keeps a namespace (names, modes, sizes) and nothing else: write answers len(buf) at once,
read answers a fixed buffer of the asked size, cut at the recorded file size. Whatever time a
workload takes on it is the cost of the kernel's FUSE round trip, libfuse, pyfuse3 and trio;
fs_bench.py divides zfs_ram's figures by this to show what zfs_ram's own code costs.

With --lz4 it is instead a bound for pure-Python compression: every whole page a write covers
is encoded with zfs_ram's own codec (the same-filled check, then lz4, on two threads for large
writes, exactly as zfs_ram calls it) before the write is answered, and kept as one Python
object per page in a list per file; a read decodes the pages it covers. No allocator, no
compaction, no limits, no accounting: what is left is what the codec costs, called once per
4 KiB page from Python, on top of the FUSE round trip. It stores whole pages only: a page that
a write covers in part is forgotten and reads as the fixed buffer (no read-modify-write, which
makes the bound generous for small files), as do holes; and files are assumed dense (a write
far past the end grows the file's list to it, 8 bytes per page).

To be a fair ceiling it asks the kernel for exactly what zfs_ram asks for
(zfs_ram/fs/operations.py and zfs_ram/daemon/options.py): no writeback cache,
default_permissions unless root mounts it, keep_cache on open, 300 s entry and attribute
timeouts, readdirplus entries with attributes, and pyfuse3's main loop on trio in one thread.

Run: ``python benchmarks/nullfs.py MOUNTPOINT [--xattrs] [--lz4]`` serves in the foreground
until unmounted (fusermount3 -u MOUNTPOINT) or SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field

import pyfuse3
import trio

from zfs_ram.vocabulary import PAGE_SIZE

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# zfs_ram's CACHE_TIMEOUT: the kernel may cache names and attributes this long.
CACHE_TIMEOUT = 300.0
# zfs_ram's ALWAYS_FUSE_OPTIONS, and default_permissions as zfs_ram decides it (a mount without
# allow_other: only when not root's); fsname/subtype only name the mount in /proc/mounts.
FUSE_OPTIONS = ("fsname=nullfs", "subtype=nullfs") + (
    ("default_permissions",) if os.geteuid() != 0 else ()
)
BLOCK_SIZE = PAGE_SIZE  # st_blksize, as zfs_ram reports (one page)


class CodecStore:
    """--lz4: every file's whole pages as zfs_ram's codec encodes them, one object per page:
    lz4 or raw bytes, or the word of a same-filled page (int); None where nothing is kept."""

    def __init__(self) -> None:
        # Imported here, so that the plain ceiling loads none of zfs_ram but its vocabulary
        # (its RSS is the pyfuse3+trio baseline fs_bench reports).
        sys.path.insert(0, REPO)
        from zfs_ram import codec
        from zfs_ram.pool.classes import build_classes

        self.codec = codec
        _distinct, _by_index, self.huge_size = build_classes()  # as zfs_ram's pool
        self.files: dict[int, list[bytes | int | None]] = {}

    def write(self, ino: int, off: int, buf: bytes) -> None:
        table = self.files.setdefault(ino, [])
        if len(buf) == PAGE_SIZE and not off % PAGE_SIZE:  # zfs_ram's single-page path too
            first = off // PAGE_SIZE
            encoded = [self.codec.encode_page(buf, self.huge_size)]
        else:
            skip = -off % PAGE_SIZE
            first = (off + skip) // PAGE_SIZE
            view = memoryview(buf)
            pages = [
                view[i : i + PAGE_SIZE] for i in range(skip, len(buf) - PAGE_SIZE + 1, PAGE_SIZE)
            ]
            encoded = self.codec.encode_pages(pages, self.huge_size)
            # Pages covered in part are forgotten, so that they never read back stale.
            if skip:
                self._forget(table, off // PAGE_SIZE)
            if (off + len(buf)) % PAGE_SIZE:
                self._forget(table, (off + len(buf)) // PAGE_SIZE)
        if len(table) < first + len(encoded):
            table.extend([None] * (first + len(encoded) - len(table)))
        for page, obj in enumerate(encoded, first):
            # A raw page is still a view of the request's buffer: it is kept as a copy.
            table[page] = obj if isinstance(obj, int) else bytes(obj)

    @staticmethod
    def _forget(table: list[bytes | int | None], page: int) -> None:
        if page < len(table):
            table[page] = None

    def read(self, ino: int, off: int, size: int, filler: bytes) -> bytes | None:
        """The bytes at off (size > 0, within the file), or None if the file has no pages."""
        table = self.files.get(ino)
        if not table:
            return None
        first, start = divmod(off, PAGE_SIZE)
        count = (start + size + PAGE_SIZE - 1) // PAGE_SIZE
        objects = table[first : first + count]
        objects += [None] * (count - len(objects))
        pages: list[bytes]
        if count == 1 and isinstance(objects[0], bytes):  # zfs_ram's single-page path too
            pages = [self.codec.decode(objects[0])]
        elif all(obj.__class__ is bytes for obj in objects):  # the common case: one batch
            pages = self.codec.decode_many(objects)  # type: ignore[arg-type]
        else:
            pages = [
                self.codec.decode(obj)
                if isinstance(obj, bytes)
                else self.codec.fill_page(obj)
                if isinstance(obj, int)
                else filler[:PAGE_SIZE]
                for obj in objects
            ]
        return b"".join(pages)[start : start + size]

    def cut(self, ino: int, size: int) -> None:
        """Forget the pages past a new size (a page the new end cuts is forgotten whole)."""
        table = self.files.get(ino)
        if table is not None:
            del table[size // PAGE_SIZE :]

    def drop(self, ino: int) -> None:
        self.files.pop(ino, None)


def negative_entry() -> pyfuse3.EntryAttributes:
    """A lookup answer of st_ino 0: "no such name", cached for the entry timeout."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = 0
    attrs.entry_timeout = CACHE_TIMEOUT
    return attrs


@dataclass(slots=True)
class Node:
    """One inode: what getattr must answer, plus a directory's entries."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    size: int = 0
    rdev: int = 0
    mtime_ns: int = field(default_factory=time.time_ns)
    entries: dict[bytes, int] | None = None  # name -> ino, for directories
    target: bytes | None = None  # for symlinks


class NullOperations(pyfuse3.Operations):
    """A namespace without data: the cheapest answers a pyfuse3 filesystem can give."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # as zfs_ram: every write reaches the daemon
    enable_acl = False

    def __init__(self, xattrs: bool = False, lz4: bool = False) -> None:
        super().__init__()
        self.store = CodecStore() if lz4 else None
        # With xattrs, getxattr answers ENODATA as a filesystem with xattr support (zfs_ram,
        # tmpfs) does, and the kernel keeps sending GETXATTR security.capability on writes.
        self.xattrs = xattrs
        root = Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o1777, os.getuid(), os.getgid(), nlink=2)
        root.entries = {}
        self.nodes: dict[int, Node] = {root.ino: root}
        self.parents: dict[int, int] = {root.ino: root.ino}  # directory -> its parent
        self.handles: dict[int, int] = {}  # fh -> ino
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.next_fh = 1
        # read() answers slices of one buffer; bytes() of the slice is the only copy made.
        self.filler = b"\x5a" * (1 << 20)

    # -- helpers -------------------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> dict[bytes, int]:
        entries = self._node(ino).entries
        if entries is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return entries

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.generation = 0
        attrs.entry_timeout = CACHE_TIMEOUT
        attrs.attr_timeout = CACHE_TIMEOUT
        attrs.st_mode = node.mode
        attrs.st_nlink = node.nlink
        attrs.st_uid = node.uid
        attrs.st_gid = node.gid
        attrs.st_rdev = node.rdev
        attrs.st_size = node.size
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = (node.size + 511) // 512
        attrs.st_atime_ns = node.mtime_ns
        attrs.st_mtime_ns = node.mtime_ns
        attrs.st_ctime_ns = node.mtime_ns
        return attrs

    def _new(
        self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext, rdev: int = 0
    ) -> Node:
        entries = self._dir(parent)
        if name in entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = Node(self.next_ino, mode, ctx.uid, ctx.gid, rdev=rdev)
        self.next_ino += 1
        if stat.S_ISDIR(mode):
            node.entries = {}
            node.nlink = 2
            self.parents[node.ino] = parent
            self.nodes[parent].nlink += 1
        self.nodes[node.ino] = node
        entries[name] = node.ino
        return node

    def _fh(self, ino: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = ino
        return fh

    def _drop_name(self, parent: int, name: bytes) -> Node:
        entries = self._dir(parent)
        ino = entries.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.nodes[ino]
        node.nlink -= 1
        if node.nlink <= 0 or node.entries is not None:
            # Without data nothing needs to outlive the name; a late getattr may see ENOENT.
            self.nodes.pop(ino, None)
            self.parents.pop(ino, None)
            if self.store is not None:
                self.store.drop(ino)
        return node

    # -- names ---------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attrs(self._node(parent_inode))
        if name == b"..":
            return self._attrs(self._node(self.parents.get(parent_inode, parent_inode)))
        ino = self._dir(parent_inode).get(name)
        if ino is None:
            return negative_entry()  # cached by the kernel, as zfs_ram's
        return self._attrs(self.nodes[ino])

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size:
            node.size = attr.st_size
            if self.store is not None:
                self.store.cut(inode, attr.st_size)
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        return self._attrs(node)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx))

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._new(parent_inode, name, mode, ctx, rdev))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._new(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        node.target = target
        node.size = len(target)
        return self._attrs(node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = self._node(inode).target
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return target

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        entries = self._dir(new_parent_inode)
        if new_name in entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        entries[new_name] = inode
        node.nlink += 1
        return self._attrs(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._drop_name(parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        ino = self._dir(parent_inode).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self._dir(ino):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        self._drop_name(parent_inode, name)
        self.nodes[parent_inode].nlink -= 1

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = self._dir(parent_inode_old)
        ino = old.get(name_old)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        new = self._dir(parent_inode_new)
        if name_new in new:
            self._drop_name(parent_inode_new, name_new)
        del old[name_old]
        new[name_new] = ino
        if ino in self.parents:
            self.parents[ino] = parent_inode_new

    # -- files ---------------------------------------------------------------------------------

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx)
        return pyfuse3.FileInfo(fh=self._fh(node.ino), keep_cache=True), self._attrs(node)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            node.size = 0
            if self.store is not None:
                self.store.cut(inode, 0)
        return pyfuse3.FileInfo(fh=self._fh(inode), keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self.nodes.get(self.handles[fh])
        file_size = node.size if node is not None else 0
        size = max(0, min(size, file_size - off, len(self.filler)))
        if self.store is not None and node is not None and size > 0:
            data = self.store.read(node.ino, off, size, self.filler)
            if data is not None:
                return data
        return self.filler[:size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.nodes.get(self.handles[fh])
        if node is not None and off + len(buf) > node.size:
            node.size = off + len(buf)
        if self.store is not None and node is not None:
            self.store.write(node.ino, off, buf)
        return len(buf)

    # flush, fsync and fsyncdir: pyfuse3's ENOSYS defaults, as zfs_ram (the kernel stops asking).

    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    # -- directories ---------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._dir(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Cookies are positions in the (insertion-ordered) dict: enough for listings that do
        # not change while being read, which is all the benchmark's workloads do.
        entries = list(self._dir(fh).items())
        for index in range(start_id, len(entries)):
            name, ino = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attrs(self.nodes[ino]), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops asking: no xattr requests
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = BLOCK_SIZE
        data.f_namemax = 255
        return data


async def _serve() -> None:
    """pyfuse3's main loop, ended early by SIGINT/SIGTERM as zfs_ram's daemon does."""
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mountpoint")
    parser.add_argument(
        "--xattrs",
        action="store_true",
        help="answer getxattr with ENODATA (xattr support) instead of ENOSYS",
    )
    parser.add_argument(
        "--lz4",
        action="store_true",
        help="encode written pages and decode read ones with zfs_ram's codec",
    )
    args = parser.parse_args(argv)
    pyfuse3.init(NullOperations(args.xattrs, args.lz4), args.mountpoint, set(FUSE_OPTIONS))
    try:
        trio.run(_serve)
    finally:
        # Unmount unless fusermount3 -u already did (then the mountpoint is a plain dir again).
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
