"""Bad input gets a clear error and changes nothing; the daemon keeps answering.

Most limits are checked twice: by the kernel before a request reaches the daemon (name and
xattr lengths, offsets past the largest file), and by the daemon itself for a client that
bypasses the kernel's checks. The mount tests cover what a user sees; the Operations tests the
daemon's own checks. Every mount test ends with the fixture's teardown, which fails the test if
the daemon logged a traceback or did not exit 0.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from zfs_ram.fs.config import FsConfig
from zfs_ram.fs.operations import ROOT_INODE, ZfsRamOperations
from zfs_ram.pagestore import MAX_FILE_SIZE
from zfs_ram.testing.ops import Ctx, Fields, run_ops
from zfs_ram.vocabulary import PAGE_SIZE

TIB = 1 << 40
PIB = 1 << 50
# The daemon may grow by this much while it answers the huge-offset requests (page tables of
# one chunk, Python's allocator); a MemoryError-sized allocation would be gigabytes.
RSS_SLACK = 16 << 20


def errno_of(action: Callable[[], object]) -> int:
    with pytest.raises(OSError) as excinfo:
        action()
    return excinfo.value.errno


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.fixture
def mount(zfs_ram_mount: Any) -> Any:
    return zfs_ram_mount("size=64m,xattr")


def assert_still_answers(mount: Any) -> None:
    """The daemon serves data and statistics after the bad input."""
    (mount.path / "alive").write_bytes(b"still here")
    assert (mount.path / "alive").read_bytes() == b"still here"
    assert len(mount.mm_stat()) == 9
    os.unlink(mount.path / "alive")


# ---- names


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_names_longer_than_255_bytes_are_enametoolong(mount: Any) -> None:
    mnt = mount.path
    (mnt / "file").write_text("x")
    (mnt / "dir").mkdir()
    before = listing(mnt)
    makers: list[Callable[[Path], object]] = [
        lambda p: p.write_text("x"),
        os.mkdir,
        os.mkfifo,
        lambda p: os.symlink("file", p),
        lambda p: os.link(mnt / "file", p),
        lambda p: os.rename(mnt / "file", p),
        os.stat,
    ]
    for long in ("n" * 256, "é" * 128):  # 256 bytes either way
        for i, make in enumerate(makers):
            assert errno_of(lambda: make(mnt / long)) == errno.ENAMETOOLONG, i  # noqa: B023
    assert errno_of(lambda: os.symlink("t" * 4096, mnt / "s")) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.mkdir(mnt / "/".join(["d" * 250] * 20))) == errno.ENAMETOOLONG
    assert listing(mnt) == before
    assert (mnt / "file").read_text() == "x"
    (mnt / ("é" * 127 + "n")).write_text("255 bytes is fine")
    os.symlink("t" * 4095, mnt / "s")
    assert os.readlink(mnt / "s") == "t" * 4095
    assert_still_answers(mount)


def test_the_daemon_checks_name_lengths_itself() -> None:
    """A request with a long name that got past the kernel is refused too."""

    async def body(ops: ZfsRamOperations) -> None:
        ctx = Ctx()
        long = b"n" * 256
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.create(ROOT_INODE, long, 0o644, os.O_RDWR, ctx)
        assert excinfo.value.errno == errno.ENAMETOOLONG
        for request in (
            ops.mkdir(ROOT_INODE, long, 0o755, ctx),
            ops.lookup(ROOT_INODE, long, ctx),
            ops.symlink(ROOT_INODE, long, b"t", ctx),
            ops.unlink(ROOT_INODE, long, ctx),
        ):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await request
            assert excinfo.value.errno == errno.ENAMETOOLONG
        assert ops.namespace.inodes.keys() == {ROOT_INODE}

    _run(body)


# ---- extended attributes


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_xattr_limits_and_namespaces(mount: Any) -> None:
    path = mount.path / "f"
    path.write_text("x")
    os.setxattr(path, "user.keep", b"kept")
    cases: list[tuple[str, bytes, int]] = [
        ("user." + "n" * 251, b"v", errno.ERANGE),  # 256 bytes of name
        ("", b"v", errno.ERANGE),
        ("user.big", b"v" * 65537, errno.E2BIG),
        ("foo.bar", b"v", errno.EOPNOTSUPP),
        ("system.bar", b"v", errno.EOPNOTSUPP),
        ("os2.bar", b"v", errno.EOPNOTSUPP),
    ]
    for name, value, code in cases:
        assert errno_of(lambda: os.setxattr(path, name, value)) == code, name  # noqa: B023
    for name in ("foo.bar", "system.bar"):
        assert errno_of(lambda: os.getxattr(path, name)) == errno.EOPNOTSUPP  # noqa: B023
        assert errno_of(lambda: os.removexattr(path, name)) == errno.EOPNOTSUPP  # noqa: B023
    assert os.listxattr(path) == ["user.keep"]
    assert os.getxattr(path, "user.keep") == b"kept"
    os.setxattr(path, "user.max", b"v" * 65536)  # exactly at the limit
    os.setxattr(path, "trusted.t", b"1")
    os.setxattr(path, "security.s", b"2")
    assert sorted(os.listxattr(path)) == ["security.s", "trusted.t", "user.keep", "user.max"]
    # The control files have no extended attributes.
    mm = mount.control / "mm_stat"
    assert errno_of(lambda: os.setxattr(mm, "user.x", b"v")) == errno.EOPNOTSUPP
    assert os.listxattr(mm) == []
    assert_still_answers(mount)


def test_the_daemon_checks_xattr_limits_itself() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        ctx = Ctx()
        info, attrs = await ops.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ctx)
        ino = attrs.st_ino
        for name, value, code in (
            (b"user." + b"n" * 251, b"v", errno.ERANGE),
            (b"", b"v", errno.ERANGE),
            (b"user.big", b"v" * 65537, errno.E2BIG),
            (b"nope.x", b"v", errno.EOPNOTSUPP),
        ):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await ops.setxattr(ino, name, value, ctx)
            assert excinfo.value.errno == code, name
        assert await ops.listxattr(ino, ctx) == []
        await ops.release(info.fh)

    _run(body, FsConfig(xattrs=True))


# ---- the control directory


CONTROL_GARBAGE = [
    ("compact", b"2"),
    ("compact", b"yes"),
    ("compact", b"\xff\x00"),
    ("compact", b"1\n1"),
    ("compact", b"1" * 100_000),
    ("mem_limit", b"abc"),
    ("mem_limit", b"-1"),
    ("mem_limit", b"12q"),
    ("mem_limit", b"1e9"),
    ("mem_limit", b"0x10"),
    ("mem_limit", b"\n"),
    ("mem_used_max", b"5"),
    ("mem_used_max", b"reset"),
]


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_garbage_in_control_files_is_einval_and_changes_nothing(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=64m,mem_limit=32m,compact=off")
    (mount.path / "f").write_bytes(os.urandom(PAGE_SIZE * 8))
    before_mm = mount.mm_stat()
    runs = mount.stats()["compactor"]["runs"]
    for name, data in CONTROL_GARBAGE:
        fd = os.open(mount.control / name, os.O_WRONLY)
        try:
            assert errno_of(lambda: os.write(fd, data)) == errno.EINVAL, (name, data)  # noqa: B023
        finally:
            os.close(fd)
        assert mount.mm_stat() == before_mm, (name, data)
        assert mount.stats()["compactor"]["runs"] == runs, (name, data)
        assert (mount.control / "mem_limit").read_text().strip() == str(32 << 20)
    assert (mount.path / "f").stat().st_size == PAGE_SIZE * 8
    assert_still_answers(mount)


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_read_only_control_files_refuse_writes(mount: Any) -> None:
    for name in ("mm_stat", "classes", "stats.json", "pid"):
        # Root passes the kernel's permission check; the daemon refuses the write itself.
        fd = os.open(mount.control / name, os.O_WRONLY)
        try:
            assert errno_of(lambda: os.write(fd, b"1")) == errno.EACCES  # noqa: B023
        finally:
            os.close(fd)
    assert int((mount.control / "pid").read_text()) == mount.pid


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_the_control_directory_cannot_be_removed_renamed_or_changed(mount: Any) -> None:
    mnt, ctl = mount.path, mount.control
    os.mkdir(mnt / "d")
    (mnt / "f").write_text("f")
    attempts: list[tuple[Callable[[], object], set[int]]] = [
        (lambda: os.rmdir(ctl), {errno.EPERM, errno.EBUSY}),
        (lambda: os.rename(ctl, mnt / "elsewhere"), {errno.EPERM, errno.EBUSY}),
        (lambda: os.rename(mnt / "d", ctl), {errno.EPERM, errno.EBUSY}),
        (lambda: os.rename(mnt / "f", ctl), {errno.EISDIR}),
        (lambda: os.unlink(ctl), {errno.EISDIR, errno.EPERM}),
        (lambda: os.mkdir(ctl), {errno.EEXIST}),
        (lambda: os.unlink(ctl / "mm_stat"), {errno.EPERM}),
        (lambda: os.rename(ctl / "mm_stat", ctl / "other"), {errno.EPERM}),
        (lambda: os.rename(ctl / "mm_stat", mnt / "other"), {errno.EPERM, errno.EXDEV}),
        (lambda: os.rename(mnt / "f", ctl / "f"), {errno.EPERM, errno.EXDEV}),
        (lambda: os.mkdir(ctl / "sub"), {errno.EPERM}),
        (lambda: (ctl / "new").write_text("x"), {errno.EPERM, errno.EACCES}),
        (lambda: os.symlink("x", ctl / "s"), {errno.EPERM}),
        (lambda: os.chmod(ctl / "mm_stat", 0o777), {errno.EPERM}),
        (lambda: os.chmod(ctl, 0o777), {errno.EPERM}),
        (lambda: os.chown(ctl / "compact", 1000, 1000), {errno.EPERM}),
        (lambda: os.link(ctl / "mm_stat", mnt / "hard"), {errno.EPERM, errno.ENOENT}),
    ]
    for i, (attempt, codes) in enumerate(attempts):
        assert errno_of(attempt) in codes, f"attempt {i}"
    assert listing(mnt) == ["d", "f"]
    assert sorted(os.listdir(ctl)) == sorted(
        [
            *("mm_stat", "classes", "stats.json", "compact", "mem_limit", "mem_used_max", "pid"),
            *("comp_algorithm", "recomp_algorithm", "idle", "recompress"),
            *("writeback", "bd_stat"),
        ]
    )
    assert (mnt / "f").read_text() == "f"
    mount.compact()  # the control files still work
    assert_still_answers(mount)


# ---- directories


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_rmdir_of_a_non_empty_directory_and_other_misuse(mount: Any) -> None:
    mnt = mount.path
    os.makedirs(mnt / "d" / "sub")
    (mnt / "d" / "file").write_text("kept")
    assert errno_of(lambda: os.rmdir(mnt / "d")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rmdir(mnt / "d" / "file")) == errno.ENOTDIR
    assert errno_of(lambda: os.unlink(mnt / "d")) == errno.EISDIR
    assert errno_of(lambda: os.rmdir(f"{mnt}/d/.")) == errno.EINVAL  # pathlib drops "."
    assert errno_of(lambda: os.rename(mnt / "d", mnt / "d" / "sub" / "inside")) == errno.EINVAL
    assert errno_of(lambda: os.rmdir(mnt / "missing")) == errno.ENOENT
    assert errno_of(lambda: os.mkdir(mnt / "d")) == errno.EEXIST
    assert sorted(os.listdir(mnt / "d")) == ["file", "sub"]
    assert (mnt / "d" / "file").read_text() == "kept"
    assert os.stat(mnt / "d").st_nlink == 3
    assert_still_answers(mount)


# ---- offsets and sizes


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_huge_offsets_are_holes_that_cost_nothing(mount: Any) -> None:
    mnt = mount.path
    start_rss = rss(mount.pid)
    with open(mnt / "far", "wb") as f:
        f.seek(2 * TIB)
        f.write(b"end")
    st = os.stat(mnt / "far")
    assert st.st_size == 2 * TIB + 3 and st.st_blocks <= 8
    assert mount.mm_stat()["orig_data_size"] == PAGE_SIZE
    os.truncate(mnt / "far", PIB)
    assert os.stat(mnt / "far").st_size == PIB
    assert mount.mm_stat()["orig_data_size"] == PAGE_SIZE  # truncating up adds only a hole
    with open(mnt / "far", "rb") as f:
        f.seek(TIB)
        assert f.read(1 << 20) == bytes(1 << 20)  # a megabyte of hole, read as zeros
        f.seek(2 * TIB)
        assert f.read(3) == b"end"
    # The largest file there can be (MAX_LFS_FILESIZE): its last byte, and a truncate to it.
    fd = os.open(mnt / "edge", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"z", MAX_FILE_SIZE - 1) == 1
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
        assert os.pread(fd, 1, MAX_FILE_SIZE - 1) == b"z"
        assert os.pread(fd, 1, MAX_FILE_SIZE - 2) == b"\0"
        # One byte further cannot be expressed: the kernel refuses it before the daemon.
        assert errno_of(lambda: os.pwrite(fd, b"zz", MAX_FILE_SIZE - 1)) in (
            errno.EFBIG,
            errno.EINVAL,
        )
        assert errno_of(lambda: os.ftruncate(fd, -1)) == errno.EINVAL
        os.ftruncate(fd, 0)
        os.ftruncate(fd, MAX_FILE_SIZE)
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
    finally:
        os.close(fd)
    assert mount.mm_stat()["orig_data_size"] == PAGE_SIZE
    assert rss(mount.pid) - start_rss < RSS_SLACK
    os.unlink(mnt / "far")
    os.unlink(mnt / "edge")
    mount.compact()
    assert mount.mm_stat()["mem_used_total"] == 0
    assert_still_answers(mount)


def test_past_the_largest_file_the_daemon_says_efbig() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        ctx = Ctx()
        info, attrs = await ops.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ctx)
        for offset in (MAX_FILE_SIZE, MAX_FILE_SIZE - 1, 1 << 64):
            with pytest.raises(pyfuse3.FUSEError) as excinfo:
                await ops.write(info.fh, offset, b"xy")
            assert excinfo.value.errno == errno.EFBIG
        beyond = _Attrs()  # EntryAttributes cannot hold it; a FUSE request (u64) can
        beyond.st_size = MAX_FILE_SIZE + 1
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            await ops.setattr(attrs.st_ino, beyond, Fields(update_size=True), None, ctx)
        assert excinfo.value.errno == errno.EFBIG
        assert (await ops.getattr(attrs.st_ino, ctx)).st_size == 0
        assert ops.store.stored_pages == 0
        await ops.release(info.fh)

    _run(body)


# ---- helpers for the Operations tests


class _Attrs:
    st_size = 0


_run = run_ops
