"""writeback=auto under memory pressure, and the writeback walk, without a mount.

The pressure watch reads a PSI file (here one the test writes, on trio's mock clock): while
`some avg10` stays below the threshold nothing moves; above it, the pages untouched for
PRESSURE_IDLE_SECONDS go to the backing file and the busy ones stay in memory; without PSI, or
without writeback=auto, the watch does nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from zfs_ram import native
from zfs_ram.backing import BackingFile, BackingWriteError, NoBackingFileError
from zfs_ram.codec import Codec
from zfs_ram.daemon.writeback import (
    PRESSURE_IDLE_SECONDS,
    PRESSURE_INTERVAL_SECONDS,
    Writeback,
    memory_pressure,
)
from zfs_ram.pagestore import PageStore
from zfs_ram.pagetable import FileData
from zfs_ram.pool import create_pool
from zfs_ram.vocabulary import PAGE_SIZE


def psi(some: float) -> str:
    return (
        f"some avg10={some:.2f} avg60=0.00 avg300=0.00 total=1\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )


def text_pages(count: int, seed: int) -> bytes:
    return b"".join(
        (f"{seed} page {n:05d} ".encode() * PAGE_SIZE)[:PAGE_SIZE] for n in range(count)
    )


def test_memory_pressure_reads_some_avg10(tmp_path: Path) -> None:
    path = tmp_path / "memory"
    path.write_text(psi(12.5))
    assert memory_pressure(str(path)) == 12.5
    path.write_text("full avg10=3.00\n")
    assert memory_pressure(str(path)) is None
    assert memory_pressure(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("engine", [native.PYTHON, native.NATIVE])
@pytest.mark.parametrize("auto", [True, False])
def test_pressure_writes_back_the_idle_pages(tmp_path: Path, engine: str, auto: bool) -> None:
    pressure = tmp_path / "memory"
    pressure.write_text(psi(0))
    cold_content, hot_content = text_pages(20, 1), text_pages(5, 2)

    async def main() -> None:
        store = PageStore(
            create_pool("zsmalloc"), codec=Codec(engine=engine), clock=trio.current_time
        )
        cold, hot = FileData(), FileData()
        store.attach_backing(BackingFile(str(tmp_path / "backing")), lambda: [cold, hot])
        walk = Writeback(store, lambda: [cold, hot], auto=auto, pressure_path=str(pressure))
        store.write(cold, 0, cold_content)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walk.run)
            await trio.sleep(PRESSURE_IDLE_SECONDS + 10)
            assert store.backed_pages == 0  # idle long enough, but no pressure
            store.write(hot, 0, hot_content)
            pressure.write_text(psi(25))
            await trio.sleep(3 * PRESSURE_INTERVAL_SECONDS)
            nursery.cancel_scope.cancel()
        stats = walk.statistics()
        if auto:
            assert store.backed_pages == stats.pressure_pages == 20  # the cold file only
            assert stats.pressure_runs >= 1
            assert store.pool.objects == 5
        else:
            assert store.backed_pages == stats.pressure_runs == 0
        assert store.read(cold, 0, len(cold_content)) == cold_content
        assert store.read(hot, 0, len(hot_content)) == hot_content

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_walk_is_refused_without_a_file_and_counts_a_full_one(tmp_path: Path) -> None:
    async def main() -> None:
        store = PageStore(create_pool("zsmalloc"))
        files = [FileData(), FileData()]
        for number, data in enumerate(files):
            store.write(data, 0, text_pages(3, number))
        walk = Writeback(store, lambda: files)
        with pytest.raises(NoBackingFileError):
            await walk.writeback(idle=False, huge=False, incompressible=False)
        assert walk.statistics().runs == 0
        store.attach_backing(BackingFile(str(tmp_path / "backing"), max_slots=4))
        with pytest.raises(BackingWriteError) as error:
            await walk.writeback(idle=False, huge=False, incompressible=False)
        assert error.value.written == 4  # 3 from the first file, 1 from the second
        assert "stopped after 4 pages" in str(error.value)
        assert store.backed_pages == 4 and store.pool.objects == 2

    trio.run(main)
