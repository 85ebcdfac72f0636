"""The page store in-process: sequential 1 MiB writes and reads, 4 KiB random writes, and 10 KiB
appends (tar's records), on real data, no mount.

For each workload: the time per MiB (best of `--repeat`) and the pool objects stored per MiB
written, which counts each page compressed and stored (a partial page that is recompressed on
every write counts each time). Runs against whichever zfs_ram is on the path, so the same
script measures an older checkout too (PYTHONPATH=/work/main).

    .venv/bin/python benchmarks/pagestore_bench.py [--mib 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import glob
import random
import time
from array import array
from collections.abc import Callable, Sequence

from zfs_ram.pagestore import PageStore
from zfs_ram.pagetable import FileData
from zfs_ram.pool import create_pool
from zfs_ram.pool.base import BytesLike

MIB = 1 << 20
RECORD = 10 * 1024  # tar's default record: 20 blocks of 512 bytes


def real_data(mib: int) -> bytes:
    """`mib` MiB of the shared libraries in /usr/lib, in order."""
    out = bytearray()
    for path in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")):
        try:
            with open(path, "rb") as file:
                out += file.read(4 * MIB)
        except OSError:
            continue
        if len(out) >= mib * MIB:
            break
    return bytes(out[: mib * MIB])


class Counted:
    """A page store over a fresh pool whose stores are counted (store and store_many)."""

    def __init__(self) -> None:
        self.pool = create_pool("zsmalloc")
        self.stored = 0
        store, store_many = self.pool.store, self.pool.store_many

        def counting_store(data: BytesLike) -> int:
            self.stored += 1
            return store(data)

        def counting_store_many(blob: BytesLike, sizes: Sequence[int]) -> array[int]:
            before = self.stored  # store_many may call store(): count its objects once
            handles = store_many(blob, sizes)
            self.stored = before + len(handles)
            return handles

        self.pool.store = counting_store  # type: ignore[method-assign]  # counting
        self.pool.store_many = counting_store_many  # type: ignore[method-assign]  # counting
        self.store = PageStore(self.pool)
        self.data = FileData()


def sequential(data: bytes, block: int) -> Callable[[Counted], None]:
    def run(c: Counted) -> None:
        for offset in range(0, len(data), block):
            c.store.write(c.data, offset, data[offset : offset + block])
        flush = getattr(c.store, "flush", None)
        if flush is not None:
            flush(c.data)

    return run


def random_4k(data: bytes) -> Callable[[Counted], None]:
    pages = len(data) // 4096
    order = random.Random(1).sample(range(pages), pages)

    def run(c: Counted) -> None:
        for page in order:
            c.store.write(c.data, page * 4096, data[page * 4096 : (page + 1) * 4096])

    return run


def timed(workload: Callable[[Counted], None], mib: int, repeat: int) -> tuple[float, float]:
    best = float("inf")
    stored = 0
    for _ in range(repeat):
        c = Counted()
        start = time.perf_counter()
        workload(c)
        best = min(best, time.perf_counter() - start)
        stored = c.stored
    return best / mib * 1e3, stored / mib


def read_back(data: bytes, block: int, repeat: int) -> float:
    c = Counted()
    sequential(data, MIB)(c)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for offset in range(0, len(data), block):
            c.store.read(c.data, offset, block)
        best = min(best, time.perf_counter() - start)
    return best / (len(data) / MIB) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = real_data(args.mib)
    workloads = {
        "write 1 MiB blocks": sequential(data, MIB),
        "write 10 KiB appends": sequential(data, RECORD),
        "write 4 KiB random": random_4k(data),
    }
    for name, workload in workloads.items():
        ms, stored = timed(workload, args.mib, args.repeat)
        print(f"{name:22s} {ms:8.2f} ms/MiB  {1000 / ms:7.1f} MiB/s  {stored:6.1f} stores/MiB")
    for block in (MIB, 128 * 1024):
        ms = read_back(data, block, args.repeat)
        print(f"read {block // 1024:5d} KiB blocks    {ms:8.2f} ms/MiB  {1000 / ms:7.1f} MiB/s")


if __name__ == "__main__":
    main()
