"""comp_algorithm on a real mount: the mount option, the control file, the statistics.

As zram: `cat comp_algorithm` lists the compressors with the one in use in brackets; writing a
name changes it only while nothing is stored (EBUSY after), an unknown name is EINVAL, and a
refused write changes nothing. The data reads back intact from the daemon (each file's page
cache dropped with POSIX_FADV_DONTNEED, so the reads reach the pool).
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import one_error_line, requires_fuse, zfs_ram_cli

from zfs_ram.vocabulary import CONTROL_DIR, PAGE_SIZE, ControlFile

MIB = 1 << 20


def text_file(seed: int, size: int) -> bytes:
    """Text-like bytes that every compressor shrinks, zstd the most."""
    rng = random.Random(seed)
    words = [f"word{rng.randrange(5000)} ".encode() for _ in range(size // 6)]
    return b"".join(words)[:size]


def uncached(path: Path) -> bytes:
    """The file's bytes as the daemon serves them: its page cache dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return path.read_bytes()
    finally:
        os.close(fd)


def write_errno(path: Path, text: str) -> int:
    with pytest.raises(OSError) as excinfo, open(path, "w") as file:
        file.write(text)
    assert excinfo.value.errno is not None
    return excinfo.value.errno


def fill(root: Path, files: int = 8, size: int = MIB) -> dict[Path, bytes]:
    written = {root / f"f{i}": text_file(i, size) for i in range(files)}
    for path, data in written.items():
        path.write_bytes(data)
    return written


@pytest.mark.timeout(60)
def test_zstd_mount_stores_fewer_bytes_and_refuses_a_change(zfs_ram_mount: Any) -> None:
    lz4 = zfs_ram_mount("size=64m")
    zstd = zfs_ram_mount("size=64m,comp_algorithm=zstd")
    control = zstd.path / CONTROL_DIR / ControlFile.COMP_ALGORITHM
    assert control.read_text() == "lz4 lz4hc [zstd]\n"
    assert (lz4.path / CONTROL_DIR / ControlFile.COMP_ALGORITHM).read_text() == "[lz4] lz4hc zstd\n"
    written = fill(lz4.path)
    fill(zstd.path)
    before = zstd.mm_stat()
    assert write_errno(control, "lz4\n") == errno.EBUSY
    assert write_errno(control, "lzo\n") == errno.EINVAL
    control.write_text("zstd\n")  # the one in use: nothing to change
    assert control.read_text() == "lz4 lz4hc [zstd]\n"
    assert zstd.mm_stat() == before
    for path, data in written.items():
        assert uncached(zstd.path / path.name) == data
        assert uncached(path) == data
    stats = zstd.stats()
    assert stats["fs"]["comp_algorithm"] == "zstd"
    pages = len(written) * MIB // PAGE_SIZE
    algorithms = stats["algorithms"]
    assert list(algorithms) == ["zstd"]
    assert algorithms["zstd"]["pages"] == pages
    assert algorithms["zstd"]["compr_data_size"] == stats["mm_stat"]["compr_data_size"]
    assert stats["mm_stat"]["compr_data_size"] < 0.9 * lz4.mm_stat()["compr_data_size"]
    assert list(lz4.stats()["algorithms"]) == ["lz4"]


@pytest.mark.timeout(60)
def test_an_empty_mount_may_change_its_algorithm(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=16m")
    control = mount.path / CONTROL_DIR / ControlFile.COMP_ALGORITHM
    control.write_text("lz4hc\n")
    assert control.read_text() == "lz4 [lz4hc] zstd\n"
    data = text_file(7, 256 * 1024)
    (mount.path / "f").write_bytes(data)
    assert uncached(mount.path / "f") == data
    assert list(mount.stats()["algorithms"]) == ["lz4hc"]
    assert write_errno(control, "zstd\n") == errno.EBUSY


@pytest.mark.timeout(60)
def test_the_compressor_may_not_become_the_recompressor(zfs_ram_mount: Any) -> None:
    """An empty mount refuses, with EINVAL and nothing changed, the recomp_algorithm as its
    comp_algorithm (the two must differ, as at mount time)."""
    mount = zfs_ram_mount("size=16m,recomp_algorithm=zstd")
    control = mount.path / CONTROL_DIR / ControlFile.COMP_ALGORITHM
    assert write_errno(control, "zstd\n") == errno.EINVAL
    assert control.read_text() == "[lz4] lz4hc zstd\n"
    assert "Traceback" not in mount.log()


@requires_fuse
@pytest.mark.timeout(60)
def test_an_unknown_algorithm_is_one_line_and_no_mount(mountpoint: Path) -> None:
    result = zfs_ram_cli("mount", str(mountpoint), "-o", "comp_algorithm=lzo")
    assert result.returncode == 1
    assert one_error_line(result) == (
        "zfs-ram: bad mount option 'comp_algorithm=lzo': unknown compression algorithm"
        " (choose from lz4, lz4hc, zstd)"
    )
    assert not os.path.ismount(mountpoint)


@pytest.mark.timeout(60)
def test_stat_shows_the_algorithm_and_its_pages(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=16m,comp_algorithm=lz4hc")
    (mount.path / "f").write_bytes(text_file(1, MIB))
    table = zfs_ram_cli("stat", str(mount.path))
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert row.split()[header.split().index("ALGORITHM")] == "lz4hc"
    rows = zfs_ram_cli("stat", "--algorithms", "-b", str(mount.path))
    assert rows.returncode == 0, rows.stderr
    header, row = rows.stdout.splitlines()
    fields = dict(zip(header.split(), row.split(), strict=True))
    compr = mount.mm_stat()["compr_data_size"]
    assert fields["ALGORITHM"] == "lz4hc"
    assert fields["PAGES"] == str(MIB // PAGE_SIZE)
    assert fields["COMPR"] == str(compr)
    assert fields["COMP-RATIO"] == f"{MIB / compr:.2f}"
