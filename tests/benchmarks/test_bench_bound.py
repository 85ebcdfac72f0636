"""benchmarks/nullfs.py --lz4, the pure-Python bound fs_bench compares zfs_ram with: its
figures only mean something if it does the codec's work on the real bytes, so its store must
read back every whole page as written and never a stale page."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

from zfs_ram.testing.fsx import make_data
from zfs_ram.vocabulary import PAGE_SIZE

FILLER = b"\x5a" * (1 << 20)


def load_nullfs() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "nullfs.py"
    spec = importlib.util.spec_from_file_location("bench_nullfs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def mixed_bytes(size: int, seed: int) -> bytes:
    """Runs of every kind the codec treats apart (fsx's generator): text, random, zeros,
    same-filled words and partly compressible data, in pieces that straddle pages."""
    rng = random.Random(seed)
    parts = [
        make_data(rng, rng.randrange(1, 3 * PAGE_SIZE), tag)[1] for tag in range(size // PAGE_SIZE)
    ]
    return b"".join(parts)[:size]


def test_whole_pages_read_back_and_partly_written_pages_never_read_stale() -> None:
    store = load_nullfs().CodecStore()
    rng = random.Random(7)
    data = mixed_bytes(4 << 20, seed=1)
    model: dict[int, bytes | None] = {}  # page -> its bytes, or None: reads as the filler
    size = 0
    for _ in range(1500):
        roll = rng.random()
        if roll < 0.1:
            cut = rng.randrange(0, 256 * PAGE_SIZE)
            store.cut(1, cut)
            model = {p: b for p, b in model.items() if p < cut // PAGE_SIZE}
            size = min(size, cut)
            continue
        if roll < 0.5:  # whole pages: one (the single-page path), a few, or a 1 MiB write
            off = rng.randrange(0, 256) * PAGE_SIZE
            length = PAGE_SIZE * rng.choice([1, 1, 2, 32, 256])
        else:
            off = rng.randrange(0, 256 * PAGE_SIZE)
            length = rng.randrange(1, 3 * PAGE_SIZE)
        start = rng.randrange(len(data) - length)
        buf = data[start : start + length]
        store.write(1, off, buf)
        end = off + length
        size = max(size, end)
        for page in range(off // PAGE_SIZE, (end + PAGE_SIZE - 1) // PAGE_SIZE):
            lo, hi = page * PAGE_SIZE, (page + 1) * PAGE_SIZE
            model[page] = buf[lo - off : hi - off] if off <= lo and end >= hi else None

    def expected(page: int) -> bytes:
        return model.get(page) or FILLER[:PAGE_SIZE]

    kept = 0
    for page in range((size + PAGE_SIZE - 1) // PAGE_SIZE):
        assert store.read(1, page * PAGE_SIZE, PAGE_SIZE, FILLER) == expected(page), page
        kept += model.get(page) is not None
    assert kept > 50  # the check above compared real pages, not only fillers
    for _ in range(300):  # reads across pages, at any offset, as the kernel's 128 KiB ones
        off = rng.randrange(size)
        length = min(rng.randrange(1, 128 * 1024), size - off)
        whole = b"".join(
            expected(p) for p in range(off // PAGE_SIZE, (off + length - 1) // PAGE_SIZE + 1)
        )
        assert (
            store.read(1, off, length, FILLER) == whole[off % PAGE_SIZE : off % PAGE_SIZE + length]
        )


def test_a_deleted_file_keeps_no_pages() -> None:
    store = load_nullfs().CodecStore()
    store.write(3, 0, mixed_bytes(64 * PAGE_SIZE, seed=2))
    assert store.read(3, 0, PAGE_SIZE, FILLER) is not None
    store.drop(3)
    assert store.read(3, 0, PAGE_SIZE, FILLER) is None
