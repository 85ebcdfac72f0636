"""The kernel's caches in front of zfs_ram, and the rules zfs_ram relies on (issue 13).

zfs_ram lets the kernel cache names, attributes and file pages for 300 s (every change goes
through the mount, as on tmpfs) and keeps the page cache across opens (keep_cache). These tests
pin down what that must never cost: attributes that lag behind a write, a control file read
stale, a deleted file whose pages stay cached, a read sent for pages the kernel holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import counter_since

from zfs_ram.daemon.lifecycle import BDI_DIR
from zfs_ram.daemon.options import DEFAULT_READ_AHEAD_KB
from zfs_ram.mounts import find_mount
from zfs_ram.vocabulary import PAGE_SIZE

MIB = 1 << 20
#: Big enough that its pages stand out of the noise in /proc/meminfo's Cached.
CACHED_FILE_BYTES = 128 * MIB


def read_meter(mount: Any) -> Callable[[], int]:
    """A function that gives the READ requests served since its previous call, less the ones
    reading stats.json takes itself (a control file is read with direct I/O, in pieces)."""
    return counter_since(lambda: int(mount.stats()["requests"].get("READ", {"count": 0})["count"]))


def test_attributes_follow_every_write_and_truncate(zfs_ram_mount: Any) -> None:
    """A write drops the file's cached attributes: stat and fstat show the new size and
    mtime at once, through the same descriptor, another one and a second name."""
    mnt = Path(zfs_ram_mount("size=64m").path)
    path = mnt / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.link(path, mnt / "g")
    before = os.fstat(fd)
    for size in (1, PAGE_SIZE + 7, 3 * PAGE_SIZE, 1 * MIB):
        time.sleep(0.002)
        os.pwrite(fd, b"x", size - 1)
        for st in (os.fstat(fd), os.stat(path), os.stat(mnt / "g")):
            assert st.st_size == size
            assert st.st_mtime_ns > before.st_mtime_ns
            assert st.st_ctime_ns == st.st_mtime_ns
        before = os.fstat(fd)
    os.ftruncate(fd, 10)
    assert os.stat(mnt / "g").st_size == 10
    assert os.stat(path).st_blocks <= 8  # the footprint shrank with the file
    os.close(fd)
    assert path.read_bytes() == b"x" + b"\0" * 9


def test_cached_pages_are_read_once_and_never_stale(zfs_ram_mount: Any) -> None:
    """keep_cache: once read, a file's pages come from the kernel, without a READ, to every
    later reader; a write through any descriptor is seen by every reader at once."""
    mount = zfs_ram_mount("size=64m")
    path = Path(mount.path) / "f"
    data = os.urandom(256 * 1024)
    path.write_bytes(data)
    assert path.read_bytes() == data
    reads = read_meter(mount)
    for _ in range(3):
        assert path.read_bytes() == data
    assert reads() == 0
    with open(path, "r+b") as writer, open(path, "rb") as reader:
        writer.seek(5000)
        writer.write(b"changed")
        writer.flush()
        reader.seek(4990)
        assert reader.read(20) == data[4990:5000] + b"changed" + data[5007:5010]
    assert path.read_bytes()[5000:5007] == b"changed"


def test_control_files_are_never_cached(zfs_ram_mount: Any) -> None:
    """Statistics are read fresh every time: each read of a control file is a READ, and what
    it says follows the data at once."""
    mount = zfs_ram_mount("size=64m")
    mnt = Path(mount.path)
    mm_stat = mnt / ".zfs_ram" / "mm_stat"

    def orig_data_size() -> int:
        return int(mm_stat.read_text().split()[0])

    assert orig_data_size() == 0
    reads = read_meter(mount)
    for _ in range(5):
        orig_data_size()
    assert reads() >= 5  # one per open at least: the kernel keeps none of it
    for pages in (1, 5, 64):
        (mnt / "f").write_bytes(os.urandom(pages * PAGE_SIZE))
        assert orig_data_size() == pages * PAGE_SIZE
    with open(mm_stat, "rb", buffering=0) as held:  # one descriptor, read again and again
        first = held.read()
        (mnt / "f").unlink()
        deadline = time.monotonic() + 5
        while os.pread(held.fileno(), 4096, 0) == first:
            assert time.monotonic() < deadline, "mm_stat did not change after the delete"
            time.sleep(0.01)


def _cached_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Cached line in /proc/meminfo")


def test_a_deleted_files_cached_pages_are_dropped(zfs_ram_mount: Any) -> None:
    """The kernel's copy of a file's pages (written through, kept across opens) goes when the
    file goes: deleting files frees the page cache as well as the pool."""
    mnt = Path(zfs_ram_mount("size=512m").path)
    path = mnt / "big"
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(CACHED_FILE_BYTES // MIB):
            f.write(chunk)
    assert path.read_bytes()[:MIB] == chunk  # and read back: every page is cached now
    with_file = _cached_bytes()
    path.unlink()
    deadline = time.monotonic() + 5
    while with_file - _cached_bytes() < CACHED_FILE_BYTES // 2:
        assert time.monotonic() < deadline, (
            f"Cached fell by {(with_file - _cached_bytes()) // MIB} MiB only after deleting "
            f"a {CACHED_FILE_BYTES // MIB} MiB file"
        )
        time.sleep(0.05)


def bdi_read_ahead_kb(mount: Any) -> int:
    """The kernel's read-ahead of the mount, from its backing device in sysfs."""
    info = find_mount(str(mount.path))
    assert info is not None
    return int(Path(f"{BDI_DIR}/{info.major}:{info.minor}/read_ahead_kb").read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may raise a mount's read-ahead")
def test_sequential_reads_come_in_requests_of_a_mebibyte(zfs_ram_mount: Any) -> None:
    """read_ahead_kb (1024 by default): a sequential 1 MiB read(2) of uncached pages is one
    READ request, not the eight of the kernel's 128 KiB read-ahead; 0 leaves the kernel's."""
    mount = zfs_ram_mount("size=64m")
    assert bdi_read_ahead_kb(mount) == DEFAULT_READ_AHEAD_KB
    path = Path(mount.path) / "f"
    data = os.urandom(8 * MIB)
    path.write_bytes(data)
    reads = read_meter(mount)
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # drop its clean pages
        reads()
        assert b"".join(iter(lambda: f.read(MIB), b"")) == data
    assert 8 <= reads() <= 10  # one per MiB, and maybe a short first one

    assert bdi_read_ahead_kb(zfs_ram_mount("size=64m,read_ahead_kb=256")) == 256
    kernels = bdi_read_ahead_kb(zfs_ram_mount("size=64m,read_ahead_kb=0"))
    assert kernels == 128  # VM_READAHEAD_PAGES
