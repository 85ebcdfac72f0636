"""The pyfuse3 Operations of zfs_ram: FUSE requests translated into namespace and page-store calls.

Thin by design. The namespace (fs/namespace.py) owns names, link counts, inode lifetime and the
time rules; the page store owns file contents and size=; the control directory (fs/control.py)
owns MOUNTPOINT/.zfs_ram and is reached through one check per handler (`control.owns(ino)`
or `control.holds(fh)`). The daemon builds all of them and hands them in (daemon/stack.py).
What is left here is FUSE's own: attributes and their cache lifetimes, file handles, flags,
and the waits at mem_limit.

Every handler is total: it returns or raises FUSEError. A refusal from below (FsError) is
answered with its errno. Any other exception is a bug in one request: it is logged with its
traceback and answered EIO, and the filesystem keeps serving (pyfuse3 would otherwise end
main() and leave a dead mount); pool corruption also switches the mount to read-only.
forget() never raises.

Permission checks are the kernel's: it checks modes and owners (default_permissions) on every
mount but root's own (daemon/options.py), which only root can enter, and where the one check
left to a filesystem is access(2)'s: `access` answers it as the kernel would for root.

Concurrency: trio runs one handler at a time between awaits. Handlers do not await while a
change is half made; the only awaits are compaction before ENOSPC and control-file commands.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from zfs_ram.fs.control import CONTROL_DIR_INO, Compaction, ControlDirectory
from zfs_ram.fs.errors import FsError
from zfs_ram.fs.inodes import Inode, now_ns
from zfs_ram.fs.namespace import NAME_MAX, ROOT_INODE, Namespace, check_name
from zfs_ram.fs.requests import OPCODES, RequestMeter
from zfs_ram.pagestore import MAX_FILE_SIZE, NoSpaceError, PageStore
from zfs_ram.pagetable import FileData
from zfs_ram.pool import PoolCorruptionError
from zfs_ram.vocabulary import PAGE_SIZE

log = logging.getLogger(__name__)

assert ROOT_INODE == pyfuse3.ROOT_INODE
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# All changes go through this mount, so the kernel may cache names and attributes for long.
EXECUTE_BITS = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
CACHE_TIMEOUT = 300.0
# How long a write at mem_limit waits for the kernel to forget deleted files: 50 x 10 ms.
FORGET_WAIT_STEPS = 50
FORGET_WAIT_SECONDS = 0.01

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])


def total(handler: F) -> F:
    """Count the request; answer FsError with its errno and any other exception with EIO."""
    opcode = OPCODES[handler.__name__]

    @functools.wraps(handler)
    async def wrapper(self: ZfsRamOperations, *args: Any, **kwargs: Any) -> Any:
        started = self.meter.clock()
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as refusal:
            raise pyfuse3.FUSEError(refusal.errno) from None
        except PoolCorruptionError as error:
            # Serving on from a broken pool could hand out wrong bytes: stop all writes.
            self.enter_failsafe(f"{handler.__name__}: {error}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("request %s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.meter.record(opcode, started)

    return wrapper  # type: ignore[return-value]


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class ZfsRamOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        *,
        namespace: Namespace,
        store: PageStore,
        compaction: Compaction,
        control: ControlDirectory,
        meter: RequestMeter,
        xattrs: bool = False,
    ) -> None:
        super().__init__()
        self.namespace = namespace
        self.store = store
        self.compaction = compaction
        self.control = control
        self.meter = meter
        self.xattrs = xattrs
        self.ready = trio.Event()  # set once FUSE_INIT was handled
        self._handles: dict[int, int] = {}  # open file handle -> inode
        # Handles opened by someone outside the file's group: their writes clear setgid.
        self._outsiders: set[int] = set()
        self._next_fh = 1

    def init(self) -> None:
        self.ready.set()

    def enter_failsafe(self, reason: str) -> None:
        if self.namespace.enter_failsafe(reason):
            log.critical("pool corruption detected, filesystem is now read-only: %s", reason)

    # -- helpers -----------------------------------------------------------------------------

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

    def _attrs_of(self, ino: int) -> pyfuse3.EntryAttributes:
        if self.control.owns(ino):
            return self.control.attributes(ino)
        return self._attrs(self.namespace.inode(ino))

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

    def _fh(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        return fh

    def _file(self, ino: int) -> tuple[Inode, FileData]:
        node = self.namespace.inode(ino)
        if node.data is None:
            raise fail(errno.EISDIR if node.is_dir else errno.EINVAL)
        return node, node.data

    # -- names ---------------------------------------------------------------------------------

    @total
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == CONTROL_DIR_INO:
            if name == b"..":
                return self._attrs(self.namespace.inode(ROOT_INODE))
            return self.control.attributes(self.control.lookup(name))
        ino = self.namespace.lookup(parent_inode, name)
        if ino == 0:
            return self._negative_entry()
        return self._attrs_of(ino)

    # Synchronous on purpose: pyfuse3 awaits a handler's result only if it is not None, so a
    # plain forget runs to completion inside the request and can never interleave with others.
    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:  # type: ignore[override]
        started = self.meter.clock()
        for ino, count in inode_list:
            try:
                self.namespace.forget(ino, count)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, count)
        self.meter.forgotten("FORGET", started)

    @total
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attrs_of(inode)

    @total
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if self.control.owns(inode):
            size_only = fields.update_size and not (
                fields.update_mode or fields.update_uid or fields.update_gid
            )
            self.control.setattr(inode, size_only)
            return self.control.attributes(inode)
        node = self.namespace.inode(inode)
        self.namespace.check_writable()
        stamp = now_ns()
        if fields.update_size:
            if node.data is None:
                raise fail(errno.EISDIR if node.is_dir else errno.EINVAL)
            if attr.st_size > MAX_FILE_SIZE:
                raise fail(errno.EFBIG)
            await self._truncate(node.data, attr.st_size)
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
        fs/namespace.py), which it does within milliseconds; their objects make room."""
        for _ in range(FORGET_WAIT_STEPS):
            if not self.store.detached_pages:
                break
            await trio.sleep(FORGET_WAIT_SECONDS)
        await self.compaction.compact_now()

    async def _truncate(self, data: FileData, size: int) -> None:
        try:
            self.store.truncate(data, size)
        except NoSpaceError as error:
            if not error.physical:
                raise fail(errno.ENOSPC) from None
            await self._make_room()
            try:
                self.store.truncate(data, size)
            except NoSpaceError:
                raise fail(errno.ENOSPC) from None

    @total
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.namespace.inode(inode)
        if node.target is None:
            raise fail(errno.EINVAL)
        self.namespace.touch_atime(node)
        return node.target

    @total
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise fail(errno.EINVAL)
        node = self.namespace.create(parent_inode, name, mode, ctx.uid, ctx.gid, rdev=rdev)
        return self._attrs(node)

    @total
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFDIR | (mode & 0o7777)
        return self._attrs(self.namespace.create(parent_inode, name, mode, ctx.uid, ctx.gid))

    @total
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if len(target) >= PAGE_SIZE:
            raise fail(errno.ENAMETOOLONG)
        mode = stat.S_IFLNK | 0o777
        node = self.namespace.create(parent_inode, name, mode, ctx.uid, ctx.gid, target=target)
        return self._attrs(node)

    @total
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.control.owns(inode):
            self.namespace.check_writable()
            check_name(new_name)
            raise fail(errno.EPERM)
        return self._attrs(self.namespace.link(inode, new_parent_inode, new_name))

    @total
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.namespace.unlink(parent_inode, name)

    @total
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.namespace.rmdir(parent_inode, name)

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
        self.namespace.rename(
            parent_inode_old,
            name_old,
            parent_inode_new,
            name_new,
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
            exchange=bool(flags & pyfuse3.RENAME_EXCHANGE),
        )

    # -- files -----------------------------------------------------------------------------------

    @total
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        mode = stat.S_IFREG | (mode & 0o7777)
        node = self.namespace.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        self.namespace.opened(node)
        return pyfuse3.FileInfo(fh=self._fh(node.ino), keep_cache=True), self._attrs(node)

    @total
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.control.owns(inode):
            fh = self._fh(inode)
            try:
                self.control.open(fh, inode, write_only=flags & os.O_ACCMODE == os.O_WRONLY)
            except FsError:
                del self._handles[fh]
                raise
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        node, data = self._file(inode)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self.namespace.check_writable()
            if data.size:
                await self._truncate(data, 0)
            node.touch_modify()
        self.namespace.opened(node)
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
        if self.control.holds(fh):
            return self.control.read(fh, off, size)
        node, data = self._file(self._handles[fh])
        self.namespace.touch_atime(node)
        return self.store.read(data, off, size)

    @total
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        ino = self._handles[fh]
        if self.control.holds(fh):
            await self.control.write(ino, bytes(buf))
            return len(buf)
        self.namespace.check_writable()
        node, data = self._file(ino)
        if off + len(buf) > MAX_FILE_SIZE:
            raise fail(errno.EFBIG)
        try:
            written = self.store.write(data, off, buf)
        except NoSpaceError as error:
            written = error.written
            if error.physical:
                # At mem_limit: make room first, and fail only if it still does not fit.
                await self._make_room()
                try:
                    written += self.store.write(data, off + written, buf[written:])
                except NoSpaceError as again:
                    written += again.written
        if written:
            node.touch_modify()
            if fh in self._outsiders and node.mode & stat.S_ISGID:
                # The kernel clears setgid only on group-executable files; tmpfs clears it
                # whenever the writer is outside the group (setattr_should_drop_sgid).
                node.mode &= ~stat.S_ISGID
        if written == 0 and len(buf):
            raise fail(errno.ENOSPC)
        return written

    # flush, fsync and fsyncdir are left to pyfuse3's defaults, which answer ENOSYS: the kernel
    # then stops sending them (fc->no_flush, no_fsync, no_fsyncdir) and close(2) and fsync(2)
    # return 0 without a round trip. There is nothing to do for them: every write is in the
    # daemon's memory when it returns, as on tmpfs, where fsync is a no-op too (a file's
    # unfinished last page may wait uncompressed until release; it is no less safe there).

    @total
    async def release(self, fh: int) -> None:
        ino = self._handles.pop(fh)
        if self.control.holds(fh):
            self.control.release(fh)
            return
        self._outsiders.discard(fh)
        node = self.namespace.inodes.get(ino)
        if node is not None:
            self.namespace.closed(node)  # first: a file it frees needs no flush
            if node.data is not None:
                # Compress the unfinished last page now that the writer is gone. If the pool
                # is full it stays pending, readable, and is stored by a later write or close.
                with contextlib.suppress(NoSpaceError):
                    self.store.flush(node.data)

    # -- directories -------------------------------------------------------------------------------

    @total
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != CONTROL_DIR_INO:
            self.namespace.directory(inode)
        return inode

    @total
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == CONTROL_DIR_INO:
            entries = [(b".", fh), (b"..", ROOT_INODE), *self.control.listing()]
            for cookie, (name, ino) in enumerate(entries, start=1):
                if cookie > start_id and not pyfuse3.readdir_reply(
                    token, name, self._attrs_of(ino), cookie
                ):
                    break
            return
        node, directory = self.namespace.directory(fh)
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attrs(node), 1):
            return
        if start_id < 2:
            parent = self.namespace.inodes[directory.parent]
            if not pyfuse3.readdir_reply(token, b"..", self._attrs(parent), 2):
                return
        inodes = self.namespace.inodes
        for cookie, name in directory.listing_after(max(start_id, 2)):
            child = inodes[directory.entries[name]]
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), cookie):
                break
            child.lookups += 1
        self.namespace.touch_atime(node)

    @total
    async def releasedir(self, fh: int) -> None:
        return None

    @total
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = PAGE_SIZE
        data.f_frsize = PAGE_SIZE
        limit = self.store.size_limit_pages
        used = self.store.used_pages
        # As tmpfs: with no limit the block and inode counts are all zero.
        data.f_blocks = limit
        data.f_bfree = max(limit - used, 0) if limit else 0
        data.f_bavail = data.f_bfree
        inodes = self.namespace.config.nr_inodes
        data.f_files = inodes
        data.f_ffree = max(inodes - self.namespace.inodes_used, 0) if inodes else 0
        data.f_favail = data.f_ffree
        data.f_namemax = NAME_MAX
        return data

    # -- extended attributes ---------------------------------------------------------------------

    def _xattr_node(self, inode: int) -> Inode:
        self._check_xattrs_on()
        if self.control.owns(inode):
            raise fail(errno.EOPNOTSUPP)
        return self.namespace.inode(inode)

    def _check_xattrs_on(self) -> None:
        """With -o noxattr, ENOSYS: the kernel stops sending xattr requests of that kind and
        answers EOPNOTSUPP itself (and no GETXATTR security.capability precedes each write)."""
        if not self.xattrs:
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
        self.namespace.check_writable()
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
        if self.control.owns(inode):
            return []
        node = self.namespace.inode(inode)
        return list(node.xattrs) if node.xattrs else []

    @total
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._xattr_node(inode)
        self._check_xattr_name(name)
        if node.xattrs is None or name not in node.xattrs:
            raise fail(pyfuse3.ENOATTR)
        self.namespace.check_writable()
        del node.xattrs[name]
        node.touch_change()

    @total
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Only sent without default_permissions, i.e. by root (see the module): root may
        read and write anything, search any directory, and execute a file with an x bit."""
        if self.control.owns(inode):
            return not mode & os.X_OK or inode == CONTROL_DIR_INO
        node = self.namespace.inode(inode)
        return not mode & os.X_OK or stat.S_ISDIR(node.mode) or bool(node.mode & EXECUTE_BITS)
