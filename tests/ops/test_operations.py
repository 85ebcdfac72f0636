"""The Operations class driven directly, without a mount (as s3ql's t3_fs_api does).

Everything here runs in-process and fast; real mounts are in test_mount_*.py.
"""

from __future__ import annotations

import errno
import os
import platform
import stat
import sys

import pyfuse3
import pytest
import trio

from zfs_ram.daemon.heap import MALLOC_TRIM
from zfs_ram.fs.config import FsConfig
from zfs_ram.fs.control import CONTROL_DIR_INO, CONTROL_NAME
from zfs_ram.fs.operations import ROOT_INODE, ZfsRamOperations
from zfs_ram.testing.ops import Ctx, Fields, run_ops
from zfs_ram.vocabulary import PAGE_SIZE, mem_total_bytes

CTX = Ctx()
run = run_ops
XATTRS = FsConfig(xattrs=True)  # extended attributes are off by default (-o xattr)


async def create(
    ops: ZfsRamOperations, name: bytes, parent: int = ROOT_INODE, mode: int = 0o644
) -> tuple[int, int]:
    info, attrs = await ops.create(parent, name, mode, os.O_RDWR, CTX)
    return info.fh, attrs.st_ino


def errno_of(excinfo: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return excinfo.value.errno


def real_data(size: int) -> bytes:
    """Compressible but not trivial bytes: a slice of a real library file."""
    with open("/usr/lib/x86_64-linux-gnu/libc.so.6", "rb") as f:
        blob = f.read(size)
    return (blob * (size // max(len(blob), 1) + 1))[:size]


def test_write_read_roundtrip_across_pages_and_partial_writes() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await create(ops, b"f")
        data = real_data(5 * PAGE_SIZE + 123)
        assert await ops.write(fh, 0, data) == len(data)
        assert await ops.read(fh, 0, len(data) + 100) == data
        # Overwrite a range straddling two pages, then append.
        await ops.write(fh, PAGE_SIZE - 10, b"X" * 20)
        expected = bytearray(data)
        expected[PAGE_SIZE - 10 : PAGE_SIZE + 10] = b"X" * 20
        assert await ops.read(fh, 0, 10 * PAGE_SIZE) == bytes(expected)
        await ops.write(fh, len(expected), b"tail")
        assert (await ops.getattr(ino, CTX)).st_size == len(expected) + 4
        assert await ops.read(fh, len(expected), 100) == b"tail"
        assert await ops.read(fh, 10**9, 100) == b""
        await ops.release(fh)

    run(body)


def test_sparse_file_and_huge_offset_cost_nothing() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await create(ops, b"sparse")
        offset = 2 * 1024**4  # 2 TiB
        await ops.write(fh, offset, b"end")
        attrs = await ops.getattr(ino, CTX)
        assert attrs.st_size == offset + 3
        assert await ops.read(fh, offset - 5, 8) == b"\0" * 5 + b"end"
        assert ops.store.stored_pages == 1
        fields = Fields(update_size=True)
        attrs.st_size = 1024**5  # truncate up to 1 PiB: a hole
        await ops.setattr(ino, attrs, fields, None, CTX)
        assert (await ops.getattr(ino, CTX)).st_size == 1024**5
        assert ops.store.stored_pages == 1
        await ops.release(fh)

    run(body)


def test_truncate_down_mid_page_zeroes_the_tail() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await create(ops, b"t")
        await ops.write(fh, 0, b"A" * (3 * PAGE_SIZE))
        attrs = await ops.getattr(ino, CTX)
        attrs.st_size = PAGE_SIZE + 100
        await ops.setattr(ino, attrs, Fields(update_size=True), None, CTX)
        attrs.st_size = 3 * PAGE_SIZE
        await ops.setattr(ino, attrs, Fields(update_size=True), None, CTX)
        content = await ops.read(fh, 0, 3 * PAGE_SIZE)
        assert content == b"A" * (PAGE_SIZE + 100) + b"\0" * (2 * PAGE_SIZE - 100)
        await ops.release(fh)

    run(body)


def test_same_filled_pages_take_no_pool_memory() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, _ = await create(ops, b"zeros")
        await ops.write(fh, 0, bytes(8 * PAGE_SIZE))
        await ops.write(fh, 8 * PAGE_SIZE, b"\xab\xcd\xef\x01\x02\x03\x04\x05" * 512)
        stats = ops.control.statistics.mm_stat()
        assert stats["same_pages"] == 9
        assert stats["mem_used_total"] == 0
        assert stats["orig_data_size"] == 9 * PAGE_SIZE
        assert await ops.read(fh, 8 * PAGE_SIZE, 16) == b"\xab\xcd\xef\x01\x02\x03\x04\x05" * 2
        await ops.release(fh)

    run(body)


def test_incompressible_page_is_stored_raw_as_a_huge_page() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, _ = await create(ops, b"random")
        data = os.urandom(2 * PAGE_SIZE)
        await ops.write(fh, 0, data)
        stats = ops.control.statistics.mm_stat()
        assert stats["huge_pages"] == 2
        assert stats["compr_data_size"] == 2 * PAGE_SIZE
        assert await ops.read(fh, 0, 2 * PAGE_SIZE) == data
        await ops.release(fh)

    run(body)


def test_unlinked_open_file_lives_until_release_and_forget() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await create(ops, b"doomed")
        await ops.write(fh, 0, real_data(3 * PAGE_SIZE))
        await ops.unlink(ROOT_INODE, b"doomed", CTX)
        await ops.write(fh, 0, b"still here")
        assert (await ops.read(fh, 0, 10)) == b"still here"
        assert ops.store.stored_pages == 3
        await ops.release(fh)
        assert ino in ops.namespace.inodes  # the kernel still knows it (lookup count 1 from create)
        ops.forget([(ino, 1)])
        assert ino not in ops.namespace.inodes
        assert ops.store.stored_pages == 0
        assert ops.store.pool.statistics().pages_used == 0

    run(body)


def test_size_limit_gives_enospc_and_keeps_existing_files() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, _ = await create(ops, b"a")
        first = real_data(6 * PAGE_SIZE)
        assert await ops.write(fh, 0, first) == len(first)
        fh2, _ = await create(ops, b"b")
        # Only 2 pages left: a short write reports what landed.
        assert await ops.write(fh2, 0, real_data(5 * PAGE_SIZE)) == 2 * PAGE_SIZE
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.write(fh2, 2 * PAGE_SIZE, b"x")
        assert errno_of(excinfo) == errno.ENOSPC
        assert await ops.read(fh, 0, len(first)) == first
        statfs = await ops.statfs(CTX)
        assert (statfs.f_blocks, statfs.f_bfree) == (8, 0)
        # Overwriting a page already held needs no new page.
        assert await ops.write(fh, 0, b"Y" * 10) == 10

    run(body, FsConfig(size_bytes=8 * PAGE_SIZE))


def test_mem_limit_gives_enospc_and_keeps_existing_files() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, _ = await create(ops, b"a")
        written = 0
        data = os.urandom(64 * PAGE_SIZE)  # raw pages: one frame each
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            while True:
                written += await ops.write(fh, written, data[written : written + PAGE_SIZE])
        assert errno_of(excinfo) == errno.ENOSPC
        assert written == 16 * PAGE_SIZE
        assert await ops.read(fh, 0, written) == data[:written]

    run(body, FsConfig(mem_limit_bytes=16 * PAGE_SIZE))


def test_nr_inodes_limit() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        await create(ops, b"one")
        await create(ops, b"two")
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await create(ops, b"three")
        assert errno_of(excinfo) == errno.ENOSPC
        statfs = await ops.statfs(CTX)
        assert (statfs.f_files, statfs.f_ffree) == (3, 0)

    run(body, FsConfig(nr_inodes=3))


def test_directories_link_counts_and_rmdir() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        d = await ops.mkdir(ROOT_INODE, b"d", 0o755, CTX)
        assert d.st_nlink == 2
        assert (await ops.getattr(ROOT_INODE, CTX)).st_nlink == 3
        await ops.mkdir(d.st_ino, b"sub", 0o755, CTX)
        assert (await ops.getattr(d.st_ino, CTX)).st_nlink == 3
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.rmdir(ROOT_INODE, b"d", CTX)
        assert errno_of(excinfo) == errno.ENOTEMPTY
        await ops.rmdir(d.st_ino, b"sub", CTX)
        await ops.rmdir(ROOT_INODE, b"d", CTX)
        assert (await ops.getattr(ROOT_INODE, CTX)).st_nlink == 2

    run(body)


def test_hard_links_and_rename_over_a_link_of_itself() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await create(ops, b"a")
        attrs = await ops.link(ino, ROOT_INODE, b"b", CTX)
        assert attrs.st_nlink == 2
        await ops.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 0, CTX)  # same inode: no-op
        assert (await ops.lookup(ROOT_INODE, b"a", CTX)).st_ino == ino
        await ops.unlink(ROOT_INODE, b"a", CTX)
        assert (await ops.getattr(ino, CTX)).st_nlink == 1
        await ops.release(fh)

    run(body)


def test_rename_rules() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        d1 = await ops.mkdir(ROOT_INODE, b"d1", 0o755, CTX)
        d2 = await ops.mkdir(ROOT_INODE, b"d2", 0o755, CTX)
        await create(ops, b"f", parent=d1.st_ino)
        _, g = await create(ops, b"g", parent=d2.st_ino)
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.rename(d1.st_ino, b"f", d2.st_ino, b"g", pyfuse3.RENAME_NOREPLACE, CTX)
        assert errno_of(excinfo) == errno.EEXIST
        # Exchange swaps the two names.
        f_ino = (await ops.lookup(d1.st_ino, b"f", CTX)).st_ino
        await ops.rename(d1.st_ino, b"f", d2.st_ino, b"g", pyfuse3.RENAME_EXCHANGE, CTX)
        assert (await ops.lookup(d1.st_ino, b"f", CTX)).st_ino == g
        assert (await ops.lookup(d2.st_ino, b"g", CTX)).st_ino == f_ino
        # A directory cannot move into itself.
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.rename(ROOT_INODE, b"d1", d1.st_ino, b"inside", 0, CTX)
        assert errno_of(excinfo) == errno.EINVAL
        # A directory replaces an empty directory; parents' link counts follow.
        await ops.mkdir(d2.st_ino, b"empty", 0o755, CTX)
        await ops.rename(ROOT_INODE, b"d1", d2.st_ino, b"empty", 0, CTX)
        assert (await ops.getattr(ROOT_INODE, CTX)).st_nlink == 3
        assert (await ops.getattr(d2.st_ino, CTX)).st_nlink == 3
        # A file cannot replace a directory, nor a directory a file.
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.rename(d2.st_ino, b"g", d2.st_ino, b"empty", 0, CTX)
        assert errno_of(excinfo) == errno.EISDIR

    run(body)


def test_setgid_directory_inheritance() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        shared = await ops.mkdir(ROOT_INODE, b"shared", 0o2775, Ctx(uid=0, gid=4242))
        assert shared.st_mode & stat.S_ISGID
        sub = await ops.mkdir(shared.st_ino, b"sub", 0o755, CTX)
        assert sub.st_gid == 4242 and sub.st_mode & stat.S_ISGID
        _, ino = await create(ops, b"f", parent=shared.st_ino)
        attrs = await ops.getattr(ino, CTX)
        assert attrs.st_gid == 4242 and not attrs.st_mode & stat.S_ISGID

    run(body)


def test_xattrs_namespaces_and_limits() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        _, ino = await create(ops, b"x")
        await ops.setxattr(ino, b"user.colour", b"blue", CTX)
        await ops.setxattr(ino, b"trusted.t", b"1", CTX)
        await ops.setxattr(ino, b"security.s", b"2", CTX)
        assert await ops.getxattr(ino, b"user.colour", CTX) == b"blue"
        assert sorted(await ops.listxattr(ino, CTX)) == [
            b"security.s",
            b"trusted.t",
            b"user.colour",
        ]
        cases = [
            (b"system.foo", b"v", errno.EOPNOTSUPP),
            (b"user." + b"n" * 251, b"v", errno.ERANGE),
            (b"user.big", b"v" * 65537, errno.E2BIG),
        ]
        for name, value, code in cases:
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await ops.setxattr(ino, name, value, CTX)
            assert errno_of(excinfo) == code
        await ops.removexattr(ino, b"user.colour", CTX)
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.getxattr(ino, b"user.colour", CTX)
        assert errno_of(excinfo) == pyfuse3.ENOATTR

    run(body, XATTRS)


def test_xattrs_are_off_by_default() -> None:
    """ENOSYS, so that the kernel stops asking (security.capability before every write)."""

    async def body(ops: ZfsRamOperations) -> None:
        _fh, ino = await create(ops, b"f")
        for call in (
            ops.getxattr(ino, b"security.capability", CTX),
            ops.setxattr(ino, b"user.a", b"b", CTX),
            ops.listxattr(ino, CTX),
            ops.removexattr(ino, b"user.a", CTX),
        ):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await call
            assert errno_of(excinfo) == errno.ENOSYS

    run(body)


def test_times_follow_posix() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await create(ops, b"f")
        before = await ops.getattr(ino, CTX)
        root_before = await ops.getattr(ROOT_INODE, CTX)
        await trio.sleep(0.01)
        await ops.write(fh, 0, b"data")
        after = await ops.getattr(ino, CTX)
        assert after.st_mtime_ns > before.st_mtime_ns
        assert after.st_ctime_ns > before.st_ctime_ns
        await trio.sleep(0.01)
        await ops.setxattr(ino, b"user.a", b"b", CTX)
        x = await ops.getattr(ino, CTX)
        assert x.st_ctime_ns > after.st_ctime_ns and x.st_mtime_ns == after.st_mtime_ns
        await ops.mkdir(ROOT_INODE, b"d", 0o755, CTX)
        root_after = await ops.getattr(ROOT_INODE, CTX)
        assert root_after.st_mtime_ns > root_before.st_mtime_ns
        # utimensat with explicit nanosecond times.
        attrs = await ops.getattr(ino, CTX)
        attrs.st_atime_ns = 1_000_000_123
        attrs.st_mtime_ns = 2_000_000_456
        await ops.setattr(ino, attrs, Fields(update_atime=True, update_mtime=True), None, CTX)
        final = await ops.getattr(ino, CTX)
        assert (final.st_atime_ns, final.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
        await ops.release(fh)

    run(body, XATTRS)


def test_names_too_long_and_control_dir_protected() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await create(ops, b"n" * 256)
        assert errno_of(excinfo) == errno.ENAMETOOLONG
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await create(ops, CONTROL_NAME)
        assert errno_of(excinfo) == errno.EEXIST
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.rmdir(ROOT_INODE, CONTROL_NAME, CTX)
        assert errno_of(excinfo) == errno.EBUSY
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.create(CONTROL_DIR_INO, b"new", 0o644, os.O_RDWR, CTX)
        assert errno_of(excinfo) == errno.EPERM
        await ops.mkdir(ROOT_INODE, b"d", 0o755, CTX)
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.rename(ROOT_INODE, CONTROL_NAME, ROOT_INODE, b"elsewhere", 0, CTX)
        assert errno_of(excinfo) == errno.EBUSY

    run(body)


def test_control_files_report_and_compact() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        files = []
        for i in range(40):
            fh, ino = await create(ops, f"f{i}".encode())
            await ops.write(fh, 0, real_data(8 * PAGE_SIZE)[i * 97 :] + os.urandom(64))
            files.append((fh, ino))
        for i, (fh, ino) in enumerate(files):
            await ops.release(fh)
            if i % 2:
                await ops.unlink(ROOT_INODE, f"f{i}".encode(), CTX)
                ops.forget([(ino, 1)])
        assert ops.store.pool.can_compact() > 0
        attrs = await ops.lookup(CONTROL_DIR_INO, b"mm_stat", CTX)
        info = await ops.open(attrs.st_ino, os.O_RDONLY, CTX)
        line = await ops.read(info.fh, 0, 4096)
        await ops.release(info.fh)
        fields = [int(x) for x in line.split()]
        assert len(fields) == 9
        assert fields[0] == ops.store.stored_pages * PAGE_SIZE
        compact = await ops.lookup(CONTROL_DIR_INO, b"compact", CTX)
        info = await ops.open(compact.st_ino, os.O_WRONLY | os.O_TRUNC, CTX)
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.write(info.fh, 0, b"garbage\n")
        assert errno_of(excinfo) == errno.EINVAL
        assert await ops.write(info.fh, 0, b"1\n") == 2
        await ops.release(info.fh)
        assert ops.store.pool.can_compact() == 0

    run(body, FsConfig(compact="off"))


def test_mem_limit_control_file_rounds_up_and_rejects_absurd_sizes() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        attrs = await ops.lookup(CONTROL_DIR_INO, b"mem_limit", CTX)

        async def write(value: bytes) -> None:
            info = await ops.open(attrs.st_ino, os.O_WRONLY | os.O_TRUNC, CTX)
            try:
                await ops.write(info.fh, 0, value)
            finally:
                await ops.release(info.fh)

        await write(b"1k\n")  # less than a page is one page, not "no limit"
        assert ops.store.pool.mem_limit_pages == 1
        await write(b"8193")
        assert ops.store.pool.mem_limit_pages == 3
        await write(b"50%\n")  # the syntax of -o mem_limit=: a share of the RAM
        assert ops.store.pool.mem_limit_pages == -(-mem_total_bytes() // 2 // PAGE_SIZE)
        await write(b"8193")
        for bad in (b"9" * 40, b"-1", b"12q", b"", b"50%%", b"%"):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await write(bad)
            assert errno_of(excinfo) == errno.EINVAL
        assert ops.store.pool.mem_limit_pages == 3
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.link(attrs.st_ino, ROOT_INODE, b"x", CTX)
        assert errno_of(excinfo) == errno.EPERM

    run(body)


def test_open_after_unlink_of_a_looked_up_file_finds_its_data() -> None:
    """A path walk that ended before the unlink may still open the inode (the kernel holds it
    until forget); the data must be there, while the space already counts as free."""

    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await create(ops, b"f")
        data = real_data(4 * PAGE_SIZE)
        await ops.write(fh, 0, data)
        await ops.release(fh)
        await ops.unlink(ROOT_INODE, b"f", CTX)
        statfs = await ops.statfs(CTX)
        assert statfs.f_bfree == statfs.f_blocks == 4  # free at once, as on tmpfs
        info = await ops.open(ino, os.O_RDONLY, CTX)  # the kernel still knew the inode
        assert await ops.read(info.fh, 0, len(data)) == data
        assert (await ops.statfs(CTX)).f_bfree == 0  # open again: it counts again
        await ops.release(info.fh)
        assert ops.store.stored_pages == 4
        ops.forget([(ino, 1)])
        assert ops.store.stored_pages == 0 and ops.store.detached_pages == 0
        assert ino not in ops.namespace.inodes

    run(body, FsConfig(size_bytes=4 * PAGE_SIZE))


def test_mass_delete_gives_the_metadata_capacity_back() -> None:
    """CPython's dicts keep their capacity after deletes: after an rm -rf of many files the
    directory's dicts and the inode table must be copied down, or the daemon keeps about
    250 bytes per file it once held (25 MiB after 100k files)."""

    async def body(ops: ZfsRamOperations) -> None:
        d = await ops.mkdir(ROOT_INODE, b"d", 0o755, CTX)
        names = [b"f%d" % i for i in range(12_000)]
        inos = []
        for name in names:
            fh, ino = await create(ops, name, parent=d.st_ino)
            await ops.write(fh, 0, b"x")
            await ops.release(fh)
            inos.append(ino)
        directory = ops.namespace.inodes[d.st_ino].dir
        assert directory is not None
        peak = [
            sys.getsizeof(directory.entries),
            sys.getsizeof(directory.cookies),
            sys.getsizeof(ops.namespace.inodes),
        ]
        keep = set(names[::1000])
        for name, ino in zip(names, inos, strict=True):
            if name not in keep:
                await ops.unlink(d.st_ino, name, CTX)
                ops.forget([(ino, 1)])
        after = [
            sys.getsizeof(directory.entries),
            sys.getsizeof(directory.cookies),
            sys.getsizeof(ops.namespace.inodes),
        ]
        for before, now in zip(peak, after, strict=True):
            assert now < before // 10, (peak, after)
        # What is left still works: names, listing and data.
        assert set(directory.entries) == keep
        for name in sorted(keep):
            attrs = await ops.lookup(d.st_ino, name, CTX)
            assert attrs.st_size == 1
        assert sorted(name for _cookie, name in directory.listing_after(0)) == sorted(keep)
        assert ops.store.stored_pages == len(keep)
        assert (await ops.lookup(d.st_ino, names[1], CTX)).st_ino == 0  # gone: a negative entry

    run(body)


def test_malloc_trim_is_found_on_glibc() -> None:
    """Without it a mass delete leaves the C heap's free pages resident (see the test above)."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert MALLOC_TRIM is not None
    assert MALLOC_TRIM(0) in (0, 1)


def test_requests_are_counted_by_opcode_and_forget_not_as_activity() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        info, attrs = await ops.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, CTX)
        await ops.write(info.fh, 0, b"x" * 5000)
        await ops.release(info.fh)
        total = ops.meter.total
        ops.forget([(attrs.st_ino, 1)])
        assert ops.meter.total == total  # the kernel's forgets are no user activity
        counts = {op: entry.count for op, entry in ops.meter.statistics().items()}
        assert counts == {"CREATE": 1, "WRITE": 1, "RELEASE": 1, "FORGET": 1}
        assert total == 3

    run(body)
