"""The pyfuse3 Operations of zfs_ram: POSIX tmpfs semantics over the page store.

Every handler is total: it returns or raises FUSEError. Any other exception is a bug in one
request; it is logged with its traceback and answered EIO, and the filesystem keeps serving
(pyfuse3 would otherwise end main() and leave a dead mount). forget() never raises.

Permission checks are the kernel's (default_permissions is always on); this layer does what the
kernel leaves to the filesystem: setgid inheritance, sticky-free rename/unlink bookkeeping,
link counts, the POSIX time rules, limits (size=, nr_inodes=, mem_limit=) and lookup counts.

Concurrency: trio runs one handler at a time between awaits. Handlers do not await while a
change is half made; the only awaits are compaction before ENOSPC and control-file commands.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from zfs_ram.codec import PAGE_SIZE
from zfs_ram.compactor import Compactor
from zfs_ram.fs import control
from zfs_ram.fs.config import FsConfig
from zfs_ram.fs.control import (
    CONTROL_DIR_INO,
    CONTROL_NAME,
    FIRST_CONTROL_FILE_INO,
    FIRST_REGULAR_INO,
    ControlFile,
)
from zfs_ram.fs.inodes import Directory, Inode, now_ns
from zfs_ram.pagestore import MAX_FILE_SIZE, NoSpaceError, PageStore
from zfs_ram.pool import PoolCorruptionError, create_pool

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# All changes go through this mount, so the kernel may cache names and attributes for long.
CACHE_TIMEOUT = 300.0
# How long a write at mem_limit waits for the kernel to forget deleted files: 50 x 10 ms.
FORGET_WAIT_STEPS = 50
FORGET_WAIT_SECONDS = 0.01
# relatime: atime moves on access only if it is older than mtime/ctime or than a day.
RELATIME_NS = 24 * 3600 * 10**9
# The inode table is copied (to shed the capacity CPython's dicts keep) once it has lost more
# than twice the inodes it still holds, plus this many: small tables are never copied.
INODE_TABLE_SLACK = 1024

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another libc): it hands the free pages inside the C heap
    back to the OS, which free() alone does only at the heap's top."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


MALLOC_TRIM = _find_malloc_trim()


def release_c_heap() -> None:
    """Give the C heap's free pages back to the OS, where the C library can (glibc)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def total(handler: F) -> F:
    """Turn any exception but FUSEError into EIO, logged with its traceback."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        args[0].requests += 1
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except PoolCorruptionError as error:
            # Serving on from a broken pool could hand out wrong bytes: stop all writes.
            args[0].enter_failsafe(f"{handler.__name__}: {error}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("request %s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class ZfsRamOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, config: FsConfig) -> None:
        super().__init__()
        self.config = config
        self.requests = 0  # requests handled: the compactor rests while this moves
        self.pool = create_pool(config.pool, page_limit=config.mem_limit_pages)
        self.store = PageStore(self.pool, page_limit=config.size_bytes // PAGE_SIZE)
        self.compactor = Compactor(
            self.pool,
            auto=config.compact == "auto",
            min_pages=config.compact_min_pages,
            batch=config.compact_batch,
            activity=lambda: self.requests,
            release_heap=release_c_heap,
        )
        self.ready = trio.Event()
        self.failsafe_reason: str | None = None  # set once corruption was seen: read-only
        self.inodes: dict[int, Inode] = {}
        self._inodes_freed = 0  # deletes from self.inodes since it was last copied
        self._next_ino = FIRST_REGULAR_INO
        self._handles: dict[int, int] = {}  # open file handle -> inode
        # Handles opened by someone outside the file's group: their writes clear setgid.
        self._outsiders: set[int] = set()
        self._control_buffers: dict[int, bytes] = {}  # handle -> rendered control file
        self._next_fh = 1
        root = Inode(ROOT_INODE, stat.S_IFDIR | (config.mode & 0o7777), config.uid, config.gid)
        root.nlink = 2
        root.dir = Directory(parent=ROOT_INODE)
        self.inodes[ROOT_INODE] = root
        self.control_files = self._control_files()
        self._control_by_name = {f.name: f for f in self.control_files}
        self._control_by_ino = {f.ino: f for f in self.control_files}

    # -- lifecycle ---------------------------------------------------------------------------

    def init(self) -> None:
        self.ready.set()

    async def serve_background(self) -> None:
        """Background work of a mount: the compactor. Runs until cancelled."""
        await self.compactor.run()

    def shutdown(self) -> None:
        """After unmount: drop every inode (the forgets the kernel never sent), free the pool."""
        for inode in self.inodes.values():
            if inode.data is not None:
                self.store.release(inode.data)
        self.inodes.clear()
        self.pool.close()

    # -- helpers -----------------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise fail(errno.ENOENT) from None

    def _dir(self, ino: int) -> tuple[Inode, Directory]:
        if ino == CONTROL_DIR_INO:
            raise fail(errno.EPERM)
        inode = self._inode(ino)
        if inode.dir is None:
            raise fail(errno.ENOTDIR)
        return inode, inode.dir

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode.ino
        attrs.generation = 0
        attrs.entry_timeout = CACHE_TIMEOUT
        attrs.attr_timeout = CACHE_TIMEOUT
        attrs.st_mode = inode.mode
        attrs.st_nlink = inode.nlink
        attrs.st_uid = inode.uid
        attrs.st_gid = inode.gid
        attrs.st_rdev = inode.rdev
        attrs.st_size = inode.size
        attrs.st_blksize = PAGE_SIZE
        # st_blocks from the compressed footprint, as ZFS reports it: du shows the real cost.
        attrs.st_blocks = (inode.data.footprint + 511) // 512 if inode.data is not None else 0
        attrs.st_atime_ns = inode.atime_ns
        attrs.st_mtime_ns = inode.mtime_ns
        attrs.st_ctime_ns = inode.ctime_ns
        return attrs

    @staticmethod
    def _negative_entry() -> pyfuse3.EntryAttributes:
        """ "No such name", which the kernel may cache as long as a name (CACHE_TIMEOUT): every
        create, link and rename goes through the kernel, which drops the negative entry then.
        Build tools stat the same missing paths again and again (include and module search
        paths); with a cached answer those cost no request."""
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = 0
        attrs.entry_timeout = CACHE_TIMEOUT
        return attrs

    def _check_name(self, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)

    def _new_inode(
        self, parent: Inode, mode: int, ctx: pyfuse3.RequestContext, rdev: int = 0
    ) -> Inode:
        if self.config.nr_inodes and len(self.inodes) >= self.config.nr_inodes:
            raise fail(errno.ENOSPC)
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            # BSD group semantics in a setgid directory; subdirectories inherit the bit.
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        inode = Inode(self._next_ino, mode, ctx.uid, gid, rdev)
        self._next_ino += 1
        self.inodes[inode.ino] = inode
        return inode

    def _link_new(
        self,
        parent_ino: int,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Inode:
        """Create an inode and its first directory entry in parent."""
        self._check_writable()
        self._check_name(name)
        parent, directory = self._dir(parent_ino)
        if parent.nlink == 0:
            raise fail(errno.ENOENT)
        if (
            name in directory.entries
            or name in (b".", b"..")
            or (parent_ino == ROOT_INODE and name == CONTROL_NAME)
        ):
            raise fail(errno.EEXIST)
        inode = self._new_inode(parent, mode, ctx, rdev)
        inode.nlink = 1
        if inode.is_dir:
            inode.dir = Directory(parent=parent_ino)
            inode.nlink = 2
            parent.nlink += 1
        if target is not None:
            inode.target = target
        directory.add(name, inode.ino)
        parent.touch_modify()
        inode.lookups += 1
        return inode

    def _maybe_free(self, inode: Inode) -> None:
        """Free what nobody can reach any more.

        An inode with no name and no open handle is gone for the user, and its pages stop
        counting against size= at once, as on tmpfs. They are freed when the kernel forgets
        the inode: until then a path walk that finished before the unlink may still open it
        (the kernel holds a reference), and must read the data that was there.
        """
        if inode.nlink or inode.opens or inode.ino == ROOT_INODE:
            return
        data = inode.data
        if inode.lookups == 0:
            del self.inodes[inode.ino]
            self._inodes_freed += 1
            if self._inodes_freed > 2 * len(self.inodes) + INODE_TABLE_SLACK:
                # CPython's dicts keep their capacity after deletes: a copy is sized to the
                # inodes left, so an rm -rf of many files gives the table's memory back too.
                self.inodes = dict(self.inodes)
                self._inodes_freed = 0
                # The old table and the freed inodes left holes in the C heap: measured on a
                # mount, 100k files created and deleted left RSS 19.4 MiB up without this,
                # 10.7 MiB with it (26.3 MiB before tables were copied at all).
                release_c_heap()
            if data is not None:
                if inode.detached:
                    self.store.reattach(data)
                self.store.release(data)
                self.compactor.notify_freed()
        elif data is not None and not inode.detached:
            inode.detached = True
            self.store.detach(data)

    def _check_writable(self) -> None:
        if self.failsafe_reason is not None:
            raise fail(errno.EROFS)

    def enter_failsafe(self, reason: str) -> None:
        """The pool's invariants are broken: refuse every change from now on (EROFS)."""
        if self.failsafe_reason is None:
            self.failsafe_reason = reason
            log.critical("pool corruption detected, filesystem is now read-only: %s", reason)

    def _touch_atime(self, inode: Inode) -> None:
        if self.config.noatime:
            return
        atime = inode.atime_ns
        if atime <= inode.mtime_ns or atime <= inode.ctime_ns:
            inode.atime_ns = now_ns()
            return
        stamp = now_ns()
        if stamp - atime >= RELATIME_NS:
            inode.atime_ns = stamp

    def _fh(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        return fh

    # -- names ---------------------------------------------------------------------------------

    @total
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == CONTROL_DIR_INO:
            if name == b"..":
                return self._attrs(self.inodes[ROOT_INODE])
            if name == b".":
                return self._control_dir_attrs()
            cfile = self._control_by_name.get(name)
            if cfile is None:
                raise fail(errno.ENOENT)
            return self._control_file_attrs(cfile)
        self._check_name(name)
        parent, directory = self._dir(parent_inode)
        if name == b".":
            ino = parent_inode
        elif name == b"..":
            ino = directory.parent
        elif parent_inode == ROOT_INODE and name == CONTROL_NAME:
            return self._control_dir_attrs()
        else:
            found = directory.entries.get(name)
            if found is None:
                return self._negative_entry()
            ino = found
        inode = self.inodes[ino]
        inode.lookups += 1
        return self._attrs(inode)

    # Synchronous on purpose: pyfuse3 awaits a handler's result only if it is not None, so a
    # plain forget runs to completion inside the request and can never interleave with others.
    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:  # type: ignore[override]
        for ino, count in inode_list:
            try:
                inode = self.inodes.get(ino)
                if inode is None:
                    continue
                inode.lookups = max(0, inode.lookups - count)
                self._maybe_free(inode)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, count)

    @total
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode == CONTROL_DIR_INO:
            return self._control_dir_attrs()
        cfile = self._control_by_ino.get(inode)
        if cfile is not None:
            return self._control_file_attrs(cfile)
        return self._attrs(self._inode(inode))

    @total
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == CONTROL_DIR_INO or inode in self._control_by_ino:
            if (
                inode in self._control_by_ino
                and fields.update_size
                and not (fields.update_mode or fields.update_uid or fields.update_gid)
            ):
                # `echo 1 > .zfs_ram/compact` may truncate first; there is nothing to cut.
                return await self.getattr(inode, ctx)
            raise fail(errno.EPERM)
        node = self._inode(inode)
        self._check_writable()
        stamp = now_ns()
        if fields.update_size:
            if node.data is None:
                raise fail(errno.EISDIR if node.is_dir else errno.EINVAL)
            if attr.st_size > MAX_FILE_SIZE:
                raise fail(errno.EFBIG)
            await self._truncate(node, attr.st_size)
            node.mtime_ns = stamp
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else stamp
        return self._attrs(node)

    async def _make_room(self) -> None:
        """At mem_limit, before ENOSPC: wait for the forgets of deleted files, then compact.

        Files deleted just before are still held for the kernel until it sends forget (see
        _maybe_free), which it does within milliseconds; their objects are what makes room."""
        for _ in range(FORGET_WAIT_STEPS):
            if not self.store.detached_pages:
                break
            await trio.sleep(FORGET_WAIT_SECONDS)
        await self.compactor.compact_now()

    async def _truncate(self, node: Inode, size: int) -> None:
        assert node.data is not None
        try:
            self.store.truncate(node.data, size)
        except NoSpaceError as error:
            if not error.physical:
                raise fail(errno.ENOSPC) from None
            await self._make_room()
            try:
                self.store.truncate(node.data, size)
            except NoSpaceError:
                raise fail(errno.ENOSPC) from None
        self.compactor.notify_freed()

    @total
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        if node.target is None:
            raise fail(errno.EINVAL)
        self._touch_atime(node)
        return node.target

    @total
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise fail(errno.EINVAL)
        return self._attrs(self._link_new(parent_inode, name, mode, ctx, rdev=rdev))

    @total
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFDIR | (mode & 0o7777)
        return self._attrs(self._link_new(parent_inode, name, mode, ctx))

    @total
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if len(target) >= PAGE_SIZE:
            raise fail(errno.ENAMETOOLONG)
        mode = stat.S_IFLNK | 0o777
        return self._attrs(self._link_new(parent_inode, name, mode, ctx, target=target))

    @total
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_writable()
        self._check_name(new_name)
        if inode == CONTROL_DIR_INO or inode in self._control_by_ino:
            raise fail(errno.EPERM)
        node = self._inode(inode)
        if node.is_dir:
            raise fail(errno.EPERM)
        parent, directory = self._dir(new_parent_inode)
        if parent.nlink == 0:
            raise fail(errno.ENOENT)
        if new_name in directory.entries or (
            new_parent_inode == ROOT_INODE and new_name == CONTROL_NAME
        ):
            raise fail(errno.EEXIST)
        if node.nlink == 0:
            raise fail(errno.ENOENT)
        directory.add(new_name, node.ino)
        node.nlink += 1
        node.touch_change()
        parent.touch_modify()
        node.lookups += 1
        return self._attrs(node)

    @total
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        self._check_name(name)
        if parent_inode == ROOT_INODE and name == CONTROL_NAME:
            raise fail(errno.EPERM)
        parent, directory = self._dir(parent_inode)
        ino = directory.entries.get(name)
        if ino is None:
            raise fail(errno.ENOENT)
        node = self.inodes[ino]
        if node.is_dir:
            raise fail(errno.EISDIR)
        directory.remove(name)
        node.nlink -= 1
        node.touch_change()
        parent.touch_modify()
        self._maybe_free(node)

    @total
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        self._check_name(name)
        if parent_inode == ROOT_INODE and name == CONTROL_NAME:
            raise fail(errno.EBUSY)
        if name == b".":
            raise fail(errno.EINVAL)
        if name == b"..":
            raise fail(errno.ENOTEMPTY)
        parent, directory = self._dir(parent_inode)
        ino = directory.entries.get(name)
        if ino is None:
            raise fail(errno.ENOENT)
        node = self.inodes[ino]
        if node.dir is None:
            raise fail(errno.ENOTDIR)
        if node.dir.entries:
            raise fail(errno.ENOTEMPTY)
        directory.remove(name)
        node.nlink = 0
        node.touch_change()
        parent.nlink -= 1
        parent.touch_modify()
        self._maybe_free(node)

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """True if directory `ancestor` is `ino` or contains it (walking '..')."""
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INODE:
                return False
            directory = self.inodes[ino].dir
            assert directory is not None
            ino = directory.parent

    @total
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._check_writable()
        self._check_name(name_old)
        self._check_name(name_new)
        for parent, name in ((parent_inode_old, name_old), (parent_inode_new, name_new)):
            if parent == ROOT_INODE and name == CONTROL_NAME:
                raise fail(errno.EBUSY)
            if name in (b".", b".."):
                raise fail(errno.EBUSY)
        old_parent, old_dir = self._dir(parent_inode_old)
        new_parent, new_dir = self._dir(parent_inode_new)
        ino = old_dir.entries.get(name_old)
        if ino is None:
            raise fail(errno.ENOENT)
        node = self.inodes[ino]
        target_ino = new_dir.entries.get(name_new)
        target = self.inodes[target_ino] if target_ino is not None else None
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        if flags & pyfuse3.RENAME_NOREPLACE and target is not None:
            raise fail(errno.EEXIST)
        if exchange and target is None:
            raise fail(errno.ENOENT)
        if new_parent.nlink == 0:
            raise fail(errno.ENOENT)
        if node.is_dir and self._is_ancestor(ino, parent_inode_new):
            raise fail(errno.EINVAL)
        if exchange:
            assert target is not None
            if target.is_dir and self._is_ancestor(target.ino, parent_inode_old):
                raise fail(errno.EINVAL)
            self._exchange(
                old_parent, old_dir, name_old, node, new_parent, new_dir, name_new, target
            )
            return
        if target is not None:
            if target is node:
                return  # two names of one inode: POSIX says do nothing
            if node.is_dir:
                if target.dir is None:
                    raise fail(errno.ENOTDIR)
                if target.dir.entries:
                    raise fail(errno.ENOTEMPTY)
            elif target.is_dir:
                raise fail(errno.EISDIR)
        # No failure from here on.
        stamp = now_ns()
        old_dir.remove(name_old)
        if target is not None:
            new_dir.replace(name_new, ino)
            if target.is_dir:
                target.nlink = 0
                new_parent.nlink -= 1
            else:
                target.nlink -= 1
            target.touch_change(stamp)
        else:
            new_dir.add(name_new, ino)
        if node.dir is not None and parent_inode_old != parent_inode_new:
            node.dir.parent = parent_inode_new
            old_parent.nlink -= 1
            new_parent.nlink += 1
        node.touch_change(stamp)
        for directory_inode in (old_parent, new_parent):
            directory_inode.mtime_ns = stamp
            directory_inode.ctime_ns = stamp
        if target is not None:
            self._maybe_free(target)

    def _exchange(
        self,
        old_parent: Inode,
        old_dir: Directory,
        name_old: bytes,
        node: Inode,
        new_parent: Inode,
        new_dir: Directory,
        name_new: bytes,
        target: Inode,
    ) -> None:
        stamp = now_ns()
        old_dir.replace(name_old, target.ino)
        new_dir.replace(name_new, node.ino)
        if old_parent is not new_parent:
            for moved, src, dst in (
                (node, old_parent, new_parent),
                (target, new_parent, old_parent),
            ):
                if moved.dir is not None:
                    moved.dir.parent = dst.ino
                    src.nlink -= 1
                    dst.nlink += 1
        for changed in (node, target):
            changed.ctime_ns = stamp
        for directory_inode in (old_parent, new_parent):
            directory_inode.mtime_ns = stamp
            directory_inode.ctime_ns = stamp

    # -- files -----------------------------------------------------------------------------------

    @total
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        mode = stat.S_IFREG | (mode & 0o7777)
        inode = self._link_new(parent_inode, name, mode, ctx)
        inode.opens += 1
        return pyfuse3.FileInfo(fh=self._fh(inode.ino), keep_cache=True), self._attrs(inode)

    @total
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        cfile = self._control_by_ino.get(inode)
        if cfile is not None:
            return self._open_control(cfile, flags)
        if inode == CONTROL_DIR_INO:
            raise fail(errno.EISDIR)
        node = self._inode(inode)
        if node.data is None:
            raise fail(errno.EISDIR if node.is_dir else errno.EINVAL)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self._check_writable()
            if node.data.size:
                await self._truncate(node, 0)
            node.touch_modify()
        if node.detached:  # opened through a path walk that ended before the unlink
            node.detached = False
            self.store.reattach(node.data)
        node.opens += 1
        fh = self._fh(inode)
        if node.mode & stat.S_ISGID and not self._in_group(node.gid, ctx):
            self._outsiders.add(fh)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @staticmethod
    def _in_group(gid: int, ctx: pyfuse3.RequestContext) -> bool:
        """Whether the caller may keep a file's setgid bit when it writes (in_group_or_capable)."""
        if ctx.uid == 0 or ctx.gid == gid:
            return True
        try:
            return gid in pyfuse3.get_sup_groups(ctx.pid)
        except (OSError, ValueError):
            return False

    @total
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self._control_buffers:
            return self._control_buffers[fh][off : off + size]
        node = self._inode(self._handles[fh])
        assert node.data is not None
        self._touch_atime(node)
        return self.store.read(node.data, off, size)

    @total
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        ino = self._handles[fh]
        cfile = self._control_by_ino.get(ino)
        if cfile is not None:
            if cfile.apply is None:
                raise fail(errno.EACCES)
            await cfile.apply(bytes(buf))
            return len(buf)
        self._check_writable()
        node = self._inode(ino)
        assert node.data is not None
        if off + len(buf) > MAX_FILE_SIZE:
            raise fail(errno.EFBIG)
        written = 0
        frees = self.store.frees
        try:
            written = self.store.write(node.data, off, buf)
        except NoSpaceError as error:
            written = error.written
            if error.physical:
                # At mem_limit: make room first, and fail only if it still does not fit.
                await self._make_room()
                try:
                    written += self.store.write(node.data, off + written, buf[written:])
                except NoSpaceError as again:
                    written += again.written
        if written:
            node.touch_modify()
            if fh in self._outsiders and node.mode & stat.S_ISGID:
                # The kernel clears setgid only on group-executable files; tmpfs clears it
                # whenever the writer is outside the group (setattr_should_drop_sgid).
                node.mode &= ~stat.S_ISGID
            if self.store.frees != frees:  # overwritten pages freed their old objects
                self.compactor.notify_freed()
        if written == 0 and len(buf):
            raise fail(errno.ENOSPC)
        return written

    # flush, fsync and fsyncdir are left to pyfuse3's defaults, which answer ENOSYS: the kernel
    # then stops sending them (fc->no_flush, no_fsync, no_fsyncdir) and close(2) and fsync(2)
    # return 0 without a round trip. There is nothing to do for them: every write is in the
    # pool when it returns, as on tmpfs, where fsync is a no-op too.

    @total
    async def release(self, fh: int) -> None:
        self._control_buffers.pop(fh, None)
        self._outsiders.discard(fh)
        ino = self._handles.pop(fh)
        node = self.inodes.get(ino)
        if node is not None:
            node.opens -= 1
            self._maybe_free(node)

    # -- directories -------------------------------------------------------------------------------

    @total
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == CONTROL_DIR_INO:
            return inode
        self._dir(inode)
        return inode

    @total
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == CONTROL_DIR_INO:
            self._readdir_control(start_id, token)
            return
        node, directory = self._dir(fh)
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attrs(node), 1):
            return
        if start_id < 2:
            parent = self.inodes[directory.parent]
            if not pyfuse3.readdir_reply(token, b"..", self._attrs(parent), 2):
                return
        for cookie, name in directory.listing_after(max(start_id, 2)):
            child = self.inodes[directory.entries[name]]
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), cookie):
                break
            child.lookups += 1
        self._touch_atime(node)

    @total
    async def releasedir(self, fh: int) -> None:
        return None

    @total
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = PAGE_SIZE
        data.f_frsize = PAGE_SIZE
        limit = self.store.page_limit
        used = self.store.used_pages
        # As tmpfs: with no limit the block and inode counts are all zero.
        data.f_blocks = limit
        data.f_bfree = max(limit - used, 0) if limit else 0
        data.f_bavail = data.f_bfree
        inodes = self.config.nr_inodes
        data.f_files = inodes
        data.f_ffree = max(inodes - len(self.inodes), 0) if inodes else 0
        data.f_favail = data.f_ffree
        data.f_namemax = NAME_MAX
        return data

    # -- extended attributes ---------------------------------------------------------------------

    def _xattr_node(self, inode: int) -> Inode:
        self._check_xattrs_on()
        if inode == CONTROL_DIR_INO or inode in self._control_by_ino:
            raise fail(errno.EOPNOTSUPP)
        return self._inode(inode)

    def _check_xattrs_on(self) -> None:
        """With -o noxattr, ENOSYS: the kernel stops sending xattr requests of that kind and
        answers EOPNOTSUPP itself (and no GETXATTR security.capability precedes each write)."""
        if not self.config.xattrs:
            raise fail(errno.ENOSYS)

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if len(name) > XATTR_NAME_MAX or not name:
            raise fail(errno.ERANGE)
        if not name.startswith(XATTR_NAMESPACES):
            raise fail(errno.EOPNOTSUPP)

    @total
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self._xattr_node(inode)
        self._check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise fail(errno.E2BIG)
        self._check_writable()
        if node.xattrs is None:
            node.xattrs = {}
        node.xattrs[name] = bytes(value)
        node.touch_change()

    @total
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._xattr_node(inode)
        self._check_xattr_name(name)
        if node.xattrs is None or name not in node.xattrs:
            raise fail(pyfuse3.ENOATTR)
        return node.xattrs[name]

    @total
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._check_xattrs_on()
        if inode == CONTROL_DIR_INO or inode in self._control_by_ino:
            return []
        node = self._inode(inode)
        return list(node.xattrs) if node.xattrs else []

    @total
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._xattr_node(inode)
        self._check_xattr_name(name)
        if node.xattrs is None or name not in node.xattrs:
            raise fail(pyfuse3.ENOATTR)
        self._check_writable()
        del node.xattrs[name]
        node.touch_change()

    @total
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # The kernel checks permissions itself (default_permissions); this is only existence.
        if inode != CONTROL_DIR_INO and inode not in self._control_by_ino:
            self._inode(inode)
        return True

    # -- the control directory -------------------------------------------------------------------

    def _control_dir_attrs(self) -> pyfuse3.EntryAttributes:
        return control.control_attributes(CONTROL_DIR_INO, stat.S_IFDIR | 0o555, CACHE_TIMEOUT)

    def _control_file_attrs(self, cfile: ControlFile) -> pyfuse3.EntryAttributes:
        return control.control_attributes(cfile.ino, stat.S_IFREG | cfile.mode, CACHE_TIMEOUT)

    def _readdir_control(self, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries: list[tuple[bytes, pyfuse3.EntryAttributes]] = [
            (b".", self._control_dir_attrs()),
            (b"..", self._attrs(self.inodes[ROOT_INODE])),
        ]
        entries += [(f.name, self._control_file_attrs(f)) for f in self.control_files]
        for cookie, (name, attrs) in enumerate(entries, start=1):
            if cookie <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, cookie):
                break

    def _open_control(self, cfile: ControlFile, flags: int) -> pyfuse3.FileInfo:
        fh = self._fh(cfile.ino)
        if flags & os.O_ACCMODE != os.O_WRONLY and cfile.render is not None:
            self._control_buffers[fh] = cfile.render()
        else:
            self._control_buffers[fh] = b""
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    def mm_stat(self) -> dict[str, int]:
        """zram's mm_stat fields, by name."""
        data = self.store.statistics()
        pool = self.pool.statistics()
        return {
            "orig_data_size": data.orig_data_size,
            "compr_data_size": data.compr_data_size,
            "mem_used_total": pool.pages_used * PAGE_SIZE,
            "mem_limit": self.pool.page_limit * PAGE_SIZE,
            "mem_used_max": pool.max_pages_used * PAGE_SIZE,
            "same_pages": data.same_pages,
            "pages_compacted": pool.pages_compacted,
            "huge_pages": data.huge_pages,
            "huge_pages_since": data.huge_pages_since,
        }

    def stats(self) -> dict[str, Any]:
        """Everything a monitoring script may want, for stats.json and `zfs-ram stat`."""
        limit = self.store.page_limit
        return {
            "mm_stat": self.mm_stat(),
            "pool": self.pool.statistics(),
            "store": self.store.statistics(),
            "compactor": self.compactor.statistics(),
            "fs": {
                "size_bytes": limit * PAGE_SIZE,
                "used_bytes": self.store.used_pages * PAGE_SIZE,
                "nr_inodes": self.config.nr_inodes,
                "inodes_used": len(self.inodes),
                "pool": self.config.pool,
                "compact": self.config.compact,
                "read_only_reason": self.failsafe_reason,
                "requests": self.requests,
            },
            "classes": self.pool.class_statistics(),
            "pid": os.getpid(),
        }

    async def _apply_compact(self, value: bytes) -> None:
        if value.strip() != b"1":
            raise fail(errno.EINVAL)
        await self.compactor.compact_now()

    async def _apply_mem_limit(self, value: bytes) -> None:
        # Rounded up to whole pages, as zram's PAGE_ALIGN: "1k" must not mean "no limit".
        self.pool.page_limit = -(-control.parse_size(value) // PAGE_SIZE)

    async def _apply_mem_used_max(self, value: bytes) -> None:
        if value.strip() != b"0":
            raise fail(errno.EINVAL)
        self.pool.reset_max_pages()

    def _control_files(self) -> list[ControlFile]:
        specs: list[tuple[bytes, int, Callable[[], bytes] | None, Any]] = [
            (b"mm_stat", 0o444, lambda: control.mm_stat_line(self.mm_stat()), None),
            (b"classes", 0o444, lambda: control.classes_table(self.pool.class_statistics()), None),
            (b"stats.json", 0o444, lambda: control.as_json(self.stats()), None),
            (b"compact", 0o200, None, self._apply_compact),
            (
                b"mem_limit",
                0o644,
                lambda: f"{self.pool.page_limit * PAGE_SIZE}\n".encode(),
                self._apply_mem_limit,
            ),
            (b"mem_used_max", 0o200, None, self._apply_mem_used_max),
            (b"pid", 0o444, lambda: f"{os.getpid()}\n".encode(), None),
        ]
        return [
            ControlFile(name, FIRST_CONTROL_FILE_INO + i, mode, render, apply)
            for i, (name, mode, render, apply) in enumerate(specs)
        ]
