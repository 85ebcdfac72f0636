"""POSIX behaviour on a real mount, through ordinary file APIs and shell tools.

Where zfs_ram and tmpfs could differ, the expected values are those of tmpfs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import counter_since

from zfs_ram.vocabulary import PAGE_SIZE

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


@pytest.fixture
def mnt(zfs_ram_mount: Any) -> Path:
    return Path(zfs_ram_mount("size=256m,xattr").path)


def sh(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def request_meter(mount: Any) -> Callable[[], int]:
    """A function that gives the requests the daemon served since its previous call, leaving
    out the ones it takes to read them (stats.json's lookup, open, read and release)."""
    return counter_since(lambda: int(mount.stats()["fs"]["requests"]))


def opcode_meter(mount: Any, *opcodes: str) -> Callable[[], dict[str, int]]:
    """A function that gives, per opcode, the requests served since its previous call: exact,
    since reading stats.json costs none of the opcodes a test would count (WRITE, GETXATTR)."""

    def served() -> dict[str, int]:
        requests = mount.stats()["requests"]
        return {op: requests[op]["count"] if op in requests else 0 for op in opcodes}

    last = served()

    def since() -> dict[str, int]:
        nonlocal last
        now = served()
        counts = {op: now[op] - last[op] for op in opcodes}
        last = now
        return counts

    return since


def test_copy_a_real_tree_and_diff(mnt: Path) -> None:
    source = Path("/usr/share/doc")
    sh("cp", "-a", str(source), str(mnt / "doc"))
    result = subprocess.run(
        ["diff", "-r", "--no-dereference", str(source), str(mnt / "doc")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # Metadata survived cp -a too: a sample of modes and mtimes.
    for path in list(source.rglob("*"))[:200]:
        here = mnt / "doc" / path.relative_to(source)
        a, b = os.lstat(path), os.lstat(here)
        assert (a.st_mode, a.st_mtime_ns) == (b.st_mode, b.st_mtime_ns)
        if not stat.S_ISDIR(a.st_mode):
            assert a.st_size == b.st_size


def test_df_reports_size_and_inodes(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=64m,nr_inodes=1000")
    out = sh("df", "-B1", "--output=size,used,avail,itotal", mount.path).stdout.split()
    assert out[4:] == [str(64 << 20), "0", str(64 << 20), "1000"]
    vfs = os.statvfs(mount.path)
    assert (vfs.f_bsize, vfs.f_blocks, vfs.f_namemax) == (PAGE_SIZE, (64 << 20) // PAGE_SIZE, 255)


def test_control_dir_is_hidden_and_answers(mnt: Path) -> None:
    (mnt / "file").write_bytes(b"hello" * 1000)
    listing = sh("ls", "-a", str(mnt)).stdout.split()
    assert listing == [".", "..", "file"]
    fields = sh("cat", str(mnt / ".zfs_ram" / "mm_stat")).stdout.split()
    assert len(fields) == 9
    assert int(fields[0]) == PAGE_SIZE * 2  # orig_data_size: two pages held
    assert "obj_allocated" in (mnt / ".zfs_ram" / "classes").read_text()
    sh("sh", "-c", f"echo 1 > {mnt}/.zfs_ram/compact")
    with pytest.raises(subprocess.CalledProcessError):
        sh("sh", "-c", f"echo nonsense > {mnt}/.zfs_ram/compact")
    with pytest.raises(OSError) as excinfo:
        (mnt / ".zfs_ram" / "newfile").write_text("x")
    assert excinfo.value.errno in (errno.EPERM, errno.EACCES)
    with pytest.raises(OSError) as excinfo:
        os.rmdir(mnt / ".zfs_ram")
    assert excinfo.value.errno in (errno.EPERM, errno.EBUSY)


def test_enospc_at_size_keeps_earlier_files(zfs_ram_mount: Any) -> None:
    mnt = Path(zfs_ram_mount("size=4m").path)
    keep = os.urandom(PAGE_SIZE * 100)
    (mnt / "keep").write_bytes(keep)
    result = subprocess.run(
        ["dd", "if=/dev/urandom", f"of={mnt}/fill", "bs=64k", "count=100"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "No space left on device" in result.stderr
    assert (mnt / "fill").stat().st_size == 4 * 1024 * 1024 - len(keep)
    assert (mnt / "keep").read_bytes() == keep
    with pytest.raises(OSError) as excinfo:
        (mnt / "more").write_bytes(b"x" * PAGE_SIZE)
    assert excinfo.value.errno == errno.ENOSPC
    os.unlink(mnt / "fill")
    (mnt / "more").write_bytes(b"x" * PAGE_SIZE)  # space is back after the delete


def test_unlinked_open_file_stays_usable(mnt: Path) -> None:
    # pyfuse3's own gotcha test: removal must wait for the last handle and forget.
    path = mnt / "gotcha"
    with open(path, "w+b", buffering=0) as f1:
        f2 = open(path, "r+b", buffering=0)  # noqa: SIM115
        os.unlink(path)
        f2.write(b"foobar")
        os.close(os.dup(f1.fileno()))
        f1.seek(0)
        assert f1.read() == b"foobar"
        f2.close()
    assert not path.exists()


def test_partial_writes_append_truncate_and_holes(mnt: Path) -> None:
    path = mnt / "f"
    with open(path, "wb") as f:
        f.write(b"A" * 10000)
        f.seek(20000)
        f.write(b"B")
    data = path.read_bytes()
    assert data == b"A" * 10000 + b"\0" * 10000 + b"B"
    with open(path, "ab") as f:  # O_APPEND
        f.seek(0)
        f.write(b"C")
    assert path.read_bytes()[-2:] == b"BC"
    os.truncate(path, 5000)
    os.truncate(path, 9000)
    assert path.read_bytes() == b"A" * 5000 + b"\0" * 4000
    with open(path, "r+b") as f:
        f.seek(4090)
        f.write(b"x" * 20)
        f.seek(8990)
        assert f.read(100) == b"\0" * 10
    with open(path, "wb"):  # O_TRUNC
        pass
    assert path.stat().st_size == 0
    # A sparse file far out costs nothing.
    with open(mnt / "sparse", "wb") as f:
        f.seek(2 * 1024**4)
        f.write(b"end")
    st = (mnt / "sparse").stat()
    assert st.st_size == 2 * 1024**4 + 3 and st.st_blocks <= 8


def test_du_shows_compressed_and_apparent_sizes(mnt: Path) -> None:
    (mnt / "zeros").write_bytes(bytes(1 << 20))
    (mnt / "text").write_bytes(b"all work and no play makes jack a dull boy\n" * 30000)
    (mnt / "random").write_bytes(os.urandom(1 << 20))
    assert (mnt / "zeros").stat().st_blocks == 0  # same-filled pages cost nothing
    text = (mnt / "text").stat()
    assert 0 < text.st_blocks * 512 < text.st_size / 10
    assert (mnt / "random").stat().st_blocks * 512 == 1 << 20
    apparent = int(sh("du", "-sb", "--apparent-size", str(mnt)).stdout.split()[0])
    real = int(sh("du", "-sB1", str(mnt)).stdout.split()[0])
    assert apparent > 3 * (1 << 20) - 100 and real < apparent / 2


def test_links_symlinks_special_files(mnt: Path) -> None:
    (mnt / "a").write_text("x")
    os.link(mnt / "a", mnt / "b")
    assert (mnt / "a").stat().st_nlink == 2
    os.symlink("a", mnt / "s")
    assert os.readlink(mnt / "s") == "a" and (mnt / "s").read_text() == "x"
    assert os.lstat(mnt / "s").st_size == 1
    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
    os.mknod(mnt / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.lstat(mnt / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(mnt / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)
    os.mkdir(mnt / "d")
    os.mkdir(mnt / "d" / "e")
    assert os.stat(mnt / "d").st_nlink == 3
    assert os.stat(mnt).st_nlink == 3
    with pytest.raises(OSError) as excinfo:
        os.rmdir(mnt / "d")
    assert excinfo.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as excinfo:
        os.link(mnt / "d", mnt / "dlink")
    assert excinfo.value.errno == errno.EPERM


def renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, bytes(src), at_fdcwd, bytes(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_rename_noreplace_exchange_and_over_empty_dir(mnt: Path) -> None:
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    with pytest.raises(OSError) as excinfo:
        renameat2(mnt / "a", mnt / "b", 1)  # RENAME_NOREPLACE
    assert excinfo.value.errno == errno.EEXIST
    renameat2(mnt / "a", mnt / "b", 2)  # RENAME_EXCHANGE
    assert (mnt / "a").read_text() == "B" and (mnt / "b").read_text() == "A"
    os.rename(mnt / "a", mnt / "b")
    assert not (mnt / "a").exists() and (mnt / "b").read_text() == "B"
    os.mkdir(mnt / "d1")
    os.mkdir(mnt / "d2")
    (mnt / "d1" / "inner").write_text("i")
    os.rename(mnt / "d1", mnt / "d2")
    assert (mnt / "d2" / "inner").read_text() == "i"
    os.mkdir(mnt / "d3")
    (mnt / "d3" / "x").write_text("x")
    with pytest.raises(OSError) as excinfo:
        os.rename(mnt / "d2", mnt / "d3")
    assert excinfo.value.errno == errno.ENOTEMPTY


def test_chmod_chown_utimens_and_ctime(mnt: Path) -> None:
    path = mnt / "f"
    path.write_text("x")
    before = path.stat()
    time.sleep(0.01)
    os.chmod(path, 0o4750)
    after = path.stat()
    assert stat.S_IMODE(after.st_mode) == 0o4750
    assert after.st_ctime_ns > before.st_ctime_ns and after.st_mtime_ns == before.st_mtime_ns
    os.chown(path, 1234, 5678)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(path, ns=(1_234_567_891_234_567_891, 1_111_111_111_222_222_222))
    st = path.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (
        1_234_567_891_234_567_891,
        1_111_111_111_222_222_222,
    )
    os.setxattr(path, "user.tag", b"value")
    assert os.getxattr(path, "user.tag") == b"value"
    assert "user.tag" in os.listxattr(path)
    with pytest.raises(OSError) as excinfo:
        os.getxattr(path, "user.missing")
    assert excinfo.value.errno == errno.ENODATA
    with pytest.raises(OSError) as excinfo:
        os.setxattr(path, "user." + "n" * 300, b"v")
    assert excinfo.value.errno == errno.ERANGE


def test_readdir_is_stable_while_the_directory_changes(mnt: Path) -> None:
    d = mnt / "many"
    d.mkdir()
    names = {f"f{i:05d}" for i in range(3000)}
    for name in names:
        (d / name).touch()
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            (d / f"new{i}").touch()
            os.unlink(d / f"new{i}")
            i += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        seen = [e.name for e in os.scandir(d)]
    finally:
        stop.set()
        worker.join()
    stable = [n for n in seen if n.startswith("f")]
    assert len(stable) == len(set(stable)) == len(names)


def test_long_names(mnt: Path) -> None:
    (mnt / ("n" * 255)).write_text("ok")
    with pytest.raises(OSError) as excinfo:
        (mnt / ("n" * 256)).write_text("no")
    assert excinfo.value.errno == errno.ENAMETOOLONG


def test_deleting_files_returns_pool_memory(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=256m,compact=off")
    mnt = Path(mount.path)
    shutil.copytree("/usr/share/perl/5.36.0", mnt / "perl", symlinks=True)
    full = mount.mm_stat()
    assert full["mem_used_total"] > 0
    shutil.rmtree(mnt / "perl")
    mount.compact()
    empty = mount.mm_stat()
    assert empty["orig_data_size"] == 0 and empty["compr_data_size"] == 0
    assert empty["mem_used_total"] == 0


def test_fsync_and_close_cost_no_requests(zfs_ram_mount: Any) -> None:
    """tmpfs has nothing to flush: the kernel is told once (ENOSYS) and stops asking."""
    mount = zfs_ram_mount("size=64m")
    mnt = Path(mount.path)

    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 5000)
    dirfd = os.open(mnt, os.O_RDONLY)
    os.fsync(fd)  # the first FSYNC and FSYNCDIR reach the daemon, and get ENOSYS
    os.fsync(dirfd)
    os.close(os.open(mnt / "f", os.O_RDONLY))  # and the first FLUSH
    time.sleep(0.3)  # for the RELEASE, which the kernel sends in the background
    requests = request_meter(mount)
    for _ in range(20):
        os.fsync(fd)
        os.fdatasync(fd)
        os.fsync(dirfd)
    assert requests() == 0
    fds = [os.open(mnt / "f", os.O_RDONLY) for _ in range(20)]
    requests()
    for each in fds:
        os.close(each)
    time.sleep(0.3)  # RELEASE is sent in the background; FLUSH would be waited for
    assert requests() <= 20  # RELEASEs only: no FLUSH
    os.close(dirfd)
    os.close(fd)
    assert (mnt / "f").read_bytes() == b"x" * 5000


def test_missing_names_are_cached_and_created_over(zfs_ram_mount: Any) -> None:
    """A lookup of a missing name is answered once; creating, linking or renaming onto that
    name through the mount must still show the new file at once."""
    mount = zfs_ram_mount("size=64m")
    mnt = Path(mount.path)

    requests = request_meter(mount)
    names = ["new", "link", "moved", "dir"]
    for name in names:
        assert not (mnt / name).exists()
    requests()
    for _ in range(20):
        for name in names:
            assert not (mnt / name).exists()
    assert requests() == 0  # all answered by the kernel's cache
    (mnt / "new").write_text("1")
    os.link(mnt / "new", mnt / "link")
    (mnt / "tmp").write_text("2")
    os.rename(mnt / "tmp", mnt / "moved")
    (mnt / "dir").mkdir()
    assert [(mnt / n).exists() for n in names] == [True] * 4
    assert (mnt / "link").read_text() == "1" and (mnt / "moved").read_text() == "2"
    for name in names[:3]:
        (mnt / name).unlink()
    (mnt / "dir").rmdir()
    assert [(mnt / n).exists() for n in names] == [False] * 4
    assert sh("ls", "-A", str(mnt)).stdout == ""


@pytest.mark.parametrize(("options", "xattrs"), [("", False), ("noxattr", False), ("xattr", True)])
def test_noxattr_saves_the_getxattr_before_each_write(
    zfs_ram_mount: Any, options: str, xattrs: bool
) -> None:
    """Off by default: with extended attributes the kernel asks for security.capability
    before every write(2)."""
    mount = zfs_ram_mount(",".join(filter(None, ["size=64m", options])))
    mnt = Path(mount.path)

    path = mnt / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x")  # the first write tells the kernel whether xattrs exist at all
    requests = opcode_meter(mount, "WRITE", "GETXATTR")
    for i in range(50):
        os.pwrite(fd, bytes([i]) * PAGE_SIZE, i * PAGE_SIZE)
    counted = requests()
    os.close(fd)
    assert path.read_bytes() == b"".join(bytes([i]) * PAGE_SIZE for i in range(50))
    if not xattrs:
        assert counted == {"WRITE": 50, "GETXATTR": 0}  # WRITE only
        for call in (
            lambda: os.setxattr(path, "user.a", b"1"),
            lambda: os.getxattr(path, "user.a"),
            lambda: os.listxattr(path),
            lambda: os.removexattr(path, "user.a"),
        ):
            with pytest.raises(OSError) as excinfo:
                call()
            assert excinfo.value.errno == errno.EOPNOTSUPP
    else:
        assert counted == {"WRITE": 50, "GETXATTR": 50}  # security.capability, then WRITE
        os.setxattr(path, "user.a", b"1")
        assert os.listxattr(path) == ["user.a"]
