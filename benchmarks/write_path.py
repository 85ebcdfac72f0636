"""In-process cost of one 4 KiB overwrite in zfs_ram's page store, beside lz4 alone.

fs_bench.py's randwrite says how fast a mount is; this says what zfs_ram's own write path costs
per page, without FUSE: a file of --size-mib of real data is written, then random whole pages
are overwritten with half-compressible buffers (2 KiB random, 2 KiB zeros: like fio's
--buffer_compress_percentage=50 in fs_bench's randwrite, not identical to it), and the same
buffers are compressed by python-lz4 alone in the same run. The ratio is the write path's
cost in units of the compression it cannot avoid.

Run with the project's venv:
  .venv/bin/python benchmarks/write_path.py --size-mib 256
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import lz4.block

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fs_bench

from zfs_ram.pagestore import PageStore
from zfs_ram.pagetable import FileData
from zfs_ram.pool import create_pool
from zfs_ram.vocabulary import PAGE_SIZE

MIB = 1 << 20
BATCH = 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--writes", type=int, default=30_000, help="overwrites per repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pool", default="zsmalloc", choices=("zsmalloc", "zbud"))
    args = parser.parse_args()
    data = fs_bench.build_dataset(args.size_mib * MIB).read_bytes()
    store = PageStore(create_pool(args.pool))
    file = FileData()
    for offset in range(0, len(data), MIB):
        store.write(file, offset, data[offset : offset + MIB])
    store.pool.compact()
    rng = random.Random(1)
    # Half random, half zeros: fio's --buffer_compress_percentage=50.
    buffers = [os.urandom(PAGE_SIZE // 2) + bytes(PAGE_SIZE // 2) for _ in range(64)]
    pages = len(data) // PAGE_SIZE
    write_us: list[float] = []
    lz4_us: list[float] = []
    compress = lz4.block.compress
    for _ in range(args.reps):
        offsets = [rng.randrange(pages) * PAGE_SIZE for _ in range(args.writes)]
        write_s = lz4_s = 0.0
        # Short alternating batches, so that both see the same machine (it is shared, and
        # its speed drifts by tens of percent within a minute).
        for first in range(0, args.writes, BATCH):
            batch = range(first, min(first + BATCH, args.writes))
            start = time.perf_counter()
            for i in batch:
                store.write(file, offsets[i], buffers[i & 63])
            middle = time.perf_counter()
            for i in batch:
                compress(buffers[i & 63], store_size=False)
            write_s += middle - start
            lz4_s += time.perf_counter() - middle
        write_us.append(write_s / args.writes * 1e6)
        lz4_us.append(lz4_s / args.writes * 1e6)
    store.pool.check()
    write, alone = statistics.median(write_us), statistics.median(lz4_us)
    print(
        f"{args.pool}, {args.size_mib} MiB file, {args.writes} random 4 KiB overwrites "
        f"x {args.reps}, medians:"
    )
    print(f"  PageStore.write  {write:6.2f} us per page")
    print(f"  lz4 alone        {alone:6.2f} us per page")
    print(
        f"  ratio            {write / alone:6.2f}x  (per repetition: "
        + " ".join(f"{w / a:.2f}" for w, a in zip(write_us, lz4_us, strict=True))
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
