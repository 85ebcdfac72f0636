"""The fsx random tester: its model on its own, then seeded runs on real mounts of both pools.

The mount runs force the compactor to work hard (it wakes for a single reclaimable page and
moves four objects per step) and also compact on demand every ten steps, after which every file
and mm_stat's page count are checked against the model. CI runs FSX_OPS steps per pool; a soak
is the same with ZFS_RAM_FSX_OPS set, or the module's command line (see its docstring).
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from zfs_ram.client import ControlClient
from zfs_ram.testing.fsx import (
    FileModel,
    Fsx,
    FsxConfig,
    FsxFailure,
    check_churn_content,
    churn_content,
)
from zfs_ram.vocabulary import PAGE_SIZE

# Steps per pool in CI: about five seconds each on the 2-core CI machine.
FSX_OPS = int(os.environ.get("ZFS_RAM_FSX_OPS", "1500"))
# The guard grows with a soak's step count (about 300 steps a second here), or a long soak
# would be cut short by the timeout meant for CI's 1500 steps.
FSX_TIMEOUT = 120 + FSX_OPS // 100
# Mount options that make the background compactor run at every chance, in small steps.
HARD_COMPACTION = "compact=auto,compact_min_pages=1,compact_batch=4"


class Reference:
    """The obvious model: a whole bytearray (only for small sizes)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, offset: int, data: bytes) -> None:
        if offset > len(self.data):
            self.data += bytes(offset - len(self.data))
        self.data[offset : offset + len(data)] = data

    def truncate(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data += bytes(size - len(self.data))


@pytest.mark.parametrize("seed", range(5))
def test_file_model_agrees_with_a_plain_bytearray(seed: int) -> None:
    rng = random.Random(seed)
    model, ref = FileModel(), Reference()
    for _ in range(300):
        if rng.random() < 0.7:
            offset, data = (
                rng.randrange(6 * PAGE_SIZE),
                rng.randbytes(rng.randrange(1, 2 * PAGE_SIZE)),
            )
            model.write(offset, data)
            ref.write(offset, data)
        else:
            size = rng.randrange(6 * PAGE_SIZE)
            model.truncate(size)
            ref.truncate(size)
        assert model.size == len(ref.data)
        assert model.read(0, model.size + 10) == bytes(ref.data)
        offset = rng.randrange(7 * PAGE_SIZE)
        assert model.read(offset, 100) == bytes(ref.data[offset : offset + 100])
        # Pages held: exactly those with a written byte below the size (what the store keeps).
        assert all(p * PAGE_SIZE < model.size for p in model.pages)
        last, tail = divmod(model.size, PAGE_SIZE)
        if tail and last in model.pages:
            assert not any(model.pages[last][tail:])


def test_fsx_passes_on_a_plain_directory(tmp_path: Path) -> None:
    result = Fsx(FsxConfig(root=tmp_path / "run", seed=3, ops=300, control=None)).run()
    assert result.ops == 300 and result.bytes_verified > result.bytes_written > 0
    assert set(result.op_counts) >= {"write", "read", "truncate", "rename", "mmap_write"}
    assert not (tmp_path / "run" / "a").exists()  # cleaned up


def test_fsx_reports_seed_step_and_log_when_a_file_is_corrupted(tmp_path: Path) -> None:
    fsx = Fsx(FsxConfig(root=tmp_path / "run", seed=9, ops=400, control=None))
    original = fsx.op_read

    def sabotaged_read() -> None:  # flip one byte behind the model's back, then read
        path = fsx.pick_existing()
        if path is not None and fsx.step > 50 and os.path.getsize(fsx.root / path) > 0:
            with open(fsx.root / path, "r+b") as f:
                byte = f.read(1)
                f.seek(0)
                f.write(bytes([byte[0] ^ 0xFF]))
        original()

    fsx._ops[fsx._ops.index(original)] = sabotaged_read
    with pytest.raises(FsxFailure) as excinfo:
        fsx.run()
    text = str(excinfo.value)
    assert "seed=9" in text and "replay: python -m zfs_ram.testing.fsx" in text
    assert "bytes differ from offset 0" in text
    assert f"#{fsx.step} " in text  # the failing step is in the log tail


def test_replay_with_the_same_seed_does_the_same_steps(tmp_path: Path) -> None:
    logs = []
    for run in ("one", "two"):
        fsx = Fsx(FsxConfig(root=tmp_path / run, seed=5, ops=150, control=None))
        fsx.run()
        logs.append(fsx.log)
    assert logs[0] == logs[1]
    other = Fsx(FsxConfig(root=tmp_path / "three", seed=6, ops=150, control=None))
    other.run()
    assert other.log != logs[0]


def test_churn_content_detects_torn_files() -> None:
    data = churn_content(random.Random(1), 50_000, 7)
    assert check_churn_content(data) is None
    assert check_churn_content(data[:-1]) == "body of 49999 bytes, header says 50000"
    torn = bytearray(data)
    torn[30_000:30_010] = bytes(10)
    assert "sha256" in str(check_churn_content(bytes(torn)))
    assert check_churn_content(b"short") is not None


@pytest.mark.mount
@pytest.mark.timeout(FSX_TIMEOUT)
@pytest.mark.parametrize("pool", ["zsmalloc", "zbud"])
def test_fsx_on_a_mount_with_compaction_forced(zfs_ram_mount: Any, pool: str) -> None:
    mount = zfs_ram_mount(HARD_COMPACTION, pool=pool)
    seed = {"zsmalloc": 11, "zbud": 12}[pool]
    cfg = FsxConfig(
        root=mount.path / "fsx",
        seed=seed,
        ops=FSX_OPS,
        compact_every=10,
        control=ControlClient(mount.path),
        check_accounting=True,
    )
    result = Fsx(cfg).run()  # raises FsxFailure with the replay recipe
    assert result.compactions == FSX_OPS // 10 + 1
    print(f"fsx {pool}: {result}")
    stats = mount.stats()
    assert stats["compactor"]["runs"] >= result.compactions
    assert stats["fs"]["read_only_reason"] is None
    assert mount.mm_stat()["mem_used_total"] == 0  # everything deleted and given back


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_fsx_sees_unexpected_errors_as_failures(zfs_ram_mount: Any) -> None:
    """A short write or an errno the model does not expect (size= is tiny) fails the run."""
    mount = zfs_ram_mount("size=64k")
    cfg = FsxConfig(root=mount.path / "fsx", seed=1, ops=200, control=ControlClient(mount.path))
    with pytest.raises(FsxFailure) as excinfo:
        Fsx(cfg).run()
    text = str(excinfo.value)
    assert "fsx seed=1 failed at step" in text
    assert "short" in text or os.strerror(errno.ENOSPC) in text
