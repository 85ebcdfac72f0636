"""zram's backing device on a real mount: backing_file=, writeback, bd_stat, writeback=auto.

A tree of real files (a part of the running Python's standard library) is written, every page
marked idle and written back (`echo idle > writeback`): the pool must shrink to at most a fifth
of what it held, bd_stat must count the pages, the backing file must take one block per page
on its disk, and every file must read back byte for byte once the kernel's caches are dropped
(so the reads reach the daemon and the file). Deleting files must give the backing file's
blocks back (hole punching). Bad input is one line and changes nothing: a backing file that
cannot be used refuses the mount; writeback without a backing file is ENODEV; a full disk
under the backing file is ENOSPC, the pages not written staying in memory.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import one_error_line, requires_fuse, zfs_ram_cli
from test_comp_algorithm import MIB, fill, write_errno

from zfs_ram.vocabulary import BD_STAT_FIELDS, CONTROL_DIR, MM_STAT_FIELDS, PAGE_SIZE, ControlFile

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="drops caches and mounts a tmpfs")
# Standard-library packages copied as the tree: about 6 MiB of .py and .pyc files.
FORGET_TIMEOUT = 10.0
TREE_PACKAGES = ("email", "json", "asyncio", "unittest", "xml", "concurrent", "importlib")


def control(mount: Any, name: str) -> Path:
    path: Path = mount.path / CONTROL_DIR / name
    return path


def bd_stat(mount: Any) -> dict[str, int]:
    fields = control(mount, ControlFile.BD_STAT).read_text().split()
    assert len(fields) == len(BD_STAT_FIELDS)
    return dict(zip(BD_STAT_FIELDS, map(int, fields), strict=True))


def drop_caches() -> None:
    """Every clean page cache page and dentry goes: reads must ask the daemon again."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def copy_tree(target: Path) -> dict[Path, bytes]:
    """A part of the standard library, copied into `target`; relative path -> bytes."""
    source = Path(sysconfig.get_paths()["stdlib"])
    for name in TREE_PACKAGES:
        shutil.copytree(source / name, target / name)
    return {
        path.relative_to(target): (source / path.relative_to(target)).read_bytes()
        for path in target.rglob("*")
        if path.is_file()
    }


def bd_count_after_forget(mount: Any, done: Callable[[int], bool]) -> int:
    """bd_count once `done` says so: an unlinked file's pages are freed only when the kernel
    forgets its inode, a request it sends when it drops the inode, not before unlink returns."""
    deadline = time.monotonic() + FORGET_TIMEOUT
    while not done(count := bd_stat(mount)["bd_count"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def blocks(path: Path) -> int:
    """The disk space a file takes, in 512-byte sectors."""
    return os.stat(path).st_blocks


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: 16 pages of room for a backing file."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@as_root
@pytest.mark.timeout(180)
def test_idle_pages_are_written_back_and_read_back(zfs_ram_mount: Any, tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    mount = zfs_ram_mount(f"size=256m,backing_file={backing}")
    assert backing.exists() and bd_stat(mount) == dict.fromkeys(BD_STAT_FIELDS, 0)
    tree = copy_tree(mount.path)
    before = mount.mm_stat()
    control(mount, ControlFile.IDLE).write_text("all\n")
    control(mount, ControlFile.WRITEBACK).write_text("idle\n")
    after = mount.mm_stat()
    assert list(after) == list(MM_STAT_FIELDS)
    assert after["mem_used_total"] <= 0.2 * before["mem_used_total"], (before, after)
    assert after["orig_data_size"] == before["orig_data_size"]  # still held, as zram counts
    assert after["compr_data_size"] < 0.2 * before["compr_data_size"]
    counted = bd_stat(mount)
    objects = before["orig_data_size"] // PAGE_SIZE - before["same_pages"]
    assert counted["bd_count"] == counted["bd_writes"] == objects > 0
    stats = mount.stats()
    assert stats["backing"]["bd_count"] == counted["bd_count"]
    assert stats["backing"]["backing_file"] == str(backing)
    # One 4 KiB block per page written back, on the backing file's own disk.
    assert blocks(backing) == counted["bd_count"] * PAGE_SIZE // 512
    drop_caches()
    for name, data in tree.items():
        assert (mount.path / name).read_bytes() == data, name
    assert bd_stat(mount)["bd_reads"] >= counted["bd_count"]
    assert mount.mm_stat()["mem_used_total"] <= 0.2 * before["mem_used_total"]  # served
    # Deleting files frees their slots, and their blocks go back to the disk.
    for name in TREE_PACKAGES[:4]:
        shutil.rmtree(mount.path / name)
    bd_count_after_forget(mount, lambda count: count < counted["bd_count"])
    while True:  # the blocks of the same moment (more forgets may be on their way)
        left, taken = bd_stat(mount)["bd_count"], blocks(backing)
        if bd_stat(mount)["bd_count"] == left:
            break
    assert 0 < left < counted["bd_count"]
    assert taken == left * PAGE_SIZE // 512
    # An overwrite frees the page's slot too; the new page is in memory.
    victim = next(name for name in tree if (mount.path / name).exists() and len(tree[name]) > 0)
    (mount.path / victim).write_bytes(b"new\n")
    assert bd_stat(mount)["bd_count"] < left
    for name in TREE_PACKAGES[4:]:
        shutil.rmtree(mount.path / name)
    assert bd_count_after_forget(mount, lambda count: count == 0) == 0
    assert blocks(backing) == 0
    assert mount.unmount() == 0
    assert backing.stat().st_size == 0  # emptied at unmount


@pytest.mark.timeout(60)
def test_writeback_without_a_backing_file_is_enodev(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=16m")
    fill(mount.path, files=2)
    control(mount, ControlFile.IDLE).write_text("all\n")
    before = mount.mm_stat()
    assert write_errno(control(mount, ControlFile.WRITEBACK), "idle\n") == errno.ENODEV
    assert mount.mm_stat() == before
    assert bd_stat(mount) == dict.fromkeys(BD_STAT_FIELDS, 0)
    assert mount.stats()["backing"] is None
    assert "writeback refused: no backing_file" in mount.log()


@pytest.mark.timeout(60)
def test_bad_writeback_commands_are_einval(zfs_ram_mount: Any, tmp_path: Path) -> None:
    mount = zfs_ram_mount(f"size=16m,backing_file={tmp_path / 'backing'}")
    fill(mount.path, files=1)
    for text in ["cold\n", "page_index=3\n", "idle huge\n", "\n"]:
        assert write_errno(control(mount, ControlFile.WRITEBACK), text) == errno.EINVAL, text
    assert bd_stat(mount)["bd_count"] == 0
    control(mount, ControlFile.WRITEBACK).write_text("type=huge\n")  # zram 6.16's form
    control(mount, ControlFile.WRITEBACK).write_text("incompressible\n")


@as_root
@pytest.mark.timeout(90)
def test_a_full_disk_stops_writeback_and_loses_nothing(
    zfs_ram_mount: Any, small_disk: Path
) -> None:
    backing = small_disk / "backing"
    mount = zfs_ram_mount(f"size=16m,backing_file={backing}")
    data = os.urandom(MIB)  # 256 raw (huge) pages; the disk has room for 16
    (mount.path / "random").write_bytes(data)
    written = fill(mount.path, files=1)
    before = mount.mm_stat()
    assert write_errno(control(mount, ControlFile.WRITEBACK), "huge\n") == errno.ENOSPC
    count = bd_stat(mount)["bd_count"]
    assert 0 < count <= 16
    assert mount.mm_stat()["huge_pages"] == before["huge_pages"] - count
    assert "No space left on device (the other pages stay in memory)" in mount.log()
    assert mount.stats()["backing"]["failed_writes"] >= 1  # Python writes again on close
    drop_caches()
    assert (mount.path / "random").read_bytes() == data
    for path, content in written.items():
        assert path.read_bytes() == content
    (mount.path / "random").unlink()
    assert bd_count_after_forget(mount, lambda count: count == 0) == 0


@as_root
@pytest.mark.timeout(120)
def test_auto_writeback_makes_room_at_mem_limit(zfs_ram_mount: Any, tmp_path: Path) -> None:
    plain = zfs_ram_mount("size=64m,mem_limit=1m")
    with pytest.raises(OSError) as refused:
        fill(plain.path, files=6)
    assert refused.value.errno == errno.ENOSPC  # the same writes, without writeback=auto
    backing = tmp_path / "backing"
    mount = zfs_ram_mount(f"size=64m,mem_limit=1m,backing_file={backing},writeback=auto")
    written = fill(mount.path, files=6)  # 6 MiB of text: about 2.5 MiB compressed
    stats = mount.stats()
    assert stats["mm_stat"]["mem_used_total"] <= MIB
    assert stats["backing"]["auto_pages"] > 0
    assert stats["backing"]["bd_count"] == bd_stat(mount)["bd_count"] > 0
    drop_caches()
    for path, content in written.items():
        assert path.read_bytes() == content


@requires_fuse
def test_bad_backing_options_are_one_line(mountpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "used").write_bytes(b"someone's data")
    cases = [
        (f"backing_file={tmp_path}", "is a directory"),
        (f"backing_file={tmp_path / 'used'}", "is not empty"),
        (f"backing_file={tmp_path / 'no' / 'file'}", "No such file or directory"),
        ("writeback=auto", "'writeback=auto': needs backing_file="),
        ("backing_file=", "'backing_file=': expected a file path"),
        (f"backing_file={tmp_path / 'b'},writeback=on", "'writeback=on': expected one of"),
    ]
    if os.geteuid() == 0:
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(readonly)], check=True)
        cases.append((f"backing_file={readonly / 'backing'}", "Read-only file system"))
    try:
        for options, message in cases:
            result = zfs_ram_cli("mount", str(mountpoint), "-o", options)
            assert result.returncode == 1, (options, result)
            assert message in one_error_line(result), options
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(tmp_path / "readonly")], check=False)
    assert (tmp_path / "used").read_bytes() == b"someone's data"
    assert not os.listdir(mountpoint)
