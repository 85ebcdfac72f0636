"""zram's second tier on a real mount: idle, recompress, recomp_algorithm, idle_recompress.

Pages are marked idle (`echo all > idle`), some read again (which makes them busy), then the
idle ones recompressed with the secondary algorithm (`echo type=idle > recompress`). Every file
must read back intact from the daemon (page cache dropped per file), mm_stat keeps zram's nine
columns, and the per-algorithm counters add up to compr_data_size. Bad commands are EINVAL and
change nothing.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import one_error_line, requires_fuse, zfs_ram_cli
from test_comp_algorithm import MIB, fill, uncached, write_errno

from zfs_ram.vocabulary import CONTROL_DIR, MM_STAT_FIELDS, PAGE_SIZE, ControlFile


def control(mount: Any, name: str) -> Path:
    path: Path = mount.path / CONTROL_DIR / name
    return path


@pytest.mark.timeout(90)
def test_idle_pages_are_recompressed_and_read_back(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=64m,recomp_algorithm=zstd")
    assert control(mount, ControlFile.RECOMP_ALGORITHM).read_text() == "#1: lz4 lz4hc [zstd]\n"
    written = fill(mount.path, files=6)
    before = mount.mm_stat()
    control(mount, ControlFile.IDLE).write_text("all\n")
    busy = mount.path / "f0"
    assert uncached(busy) == written[busy]  # read again: its pages are not idle any more
    control(mount, ControlFile.RECOMPRESS).write_text("type=idle\n")
    after = mount.mm_stat()
    assert list(after) == list(MM_STAT_FIELDS)
    assert after["compr_data_size"] < 0.9 * before["compr_data_size"]
    assert after["orig_data_size"] == before["orig_data_size"]
    stats = mount.stats()
    algorithms = stats["algorithms"]
    assert list(algorithms) == ["lz4", "zstd"]
    assert algorithms["lz4"]["pages"] == MIB // PAGE_SIZE  # the file read again
    assert algorithms["zstd"]["pages"] == 5 * MIB // PAGE_SIZE
    assert sum(a["compr_data_size"] for a in algorithms.values()) == after["compr_data_size"]
    assert stats["recompress"]["pages_recompressed"] == 5 * MIB // PAGE_SIZE
    for path, data in written.items():
        assert uncached(path) == data
    # A second pass finds nothing new; an overwrite makes a page lz4's again.
    control(mount, ControlFile.RECOMPRESS).write_text("type=idle\n")
    assert mount.stats()["algorithms"]["zstd"]["pages"] == 5 * MIB // PAGE_SIZE
    (mount.path / "f1").write_bytes(written[busy])
    assert mount.stats()["algorithms"]["zstd"]["pages"] == 4 * MIB // PAGE_SIZE
    assert uncached(mount.path / "f1") == written[busy]


@pytest.mark.timeout(60)
def test_bad_commands_are_einval_and_change_nothing(zfs_ram_mount: Any) -> None:
    plain = zfs_ram_mount("size=16m")
    fill(plain.path, files=2)
    before = plain.mm_stat()
    control(plain, ControlFile.IDLE).write_text("all\n")
    assert write_errno(control(plain, ControlFile.RECOMPRESS), "type=idle\n") == errno.EINVAL
    assert control(plain, ControlFile.RECOMP_ALGORITHM).read_text() == ""
    assert plain.mm_stat() == before
    assert list(plain.stats()["algorithms"]) == ["lz4"]
    tiered = zfs_ram_mount("size=16m,recomp_algorithm=lz4hc")
    for name, text in [
        (ControlFile.IDLE, "soon\n"),
        (ControlFile.IDLE, "-5\n"),
        (ControlFile.RECOMPRESS, "type=cold\n"),
        (ControlFile.RECOMPRESS, "max_pages=10\n"),
    ]:
        assert write_errno(control(tiered, name), text) == errno.EINVAL, (name, text)


@pytest.mark.timeout(60)
def test_idle_recompress_recompresses_on_its_own(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=32m,recomp_algorithm=zstd,idle_recompress=1")
    written = fill(mount.path, files=2)
    deadline = time.monotonic() + 20
    while mount.stats()["recompress"]["pages_recompressed"] < 2 * MIB // PAGE_SIZE:
        assert time.monotonic() < deadline, mount.stats()["recompress"]
        time.sleep(0.2)
    assert mount.stats()["algorithms"]["zstd"]["pages"] == 2 * MIB // PAGE_SIZE
    for path, data in written.items():
        assert uncached(path) == data


@requires_fuse
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("recomp_algorithm=lzo", "'recomp_algorithm=lzo': unknown compression algorithm"),
        ("recomp_algorithm=lz4", "'recomp_algorithm=lz4': is the comp_algorithm already"),
        ("idle_recompress=60", "'idle_recompress=60': needs recomp_algorithm="),
    ],
)
def test_bad_tier_options_are_one_line(mountpoint: Path, options: str, message: str) -> None:
    result = zfs_ram_cli("mount", str(mountpoint), "-o", options)
    assert result.returncode == 1
    assert message in one_error_line(result)
