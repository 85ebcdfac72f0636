"""The pure-Python zsmalloc engine against the compiled one, in process: how much faster each
pool operation runs, on objects of the sizes lz4 gives real file pages.

Sizes come from compressing the 4 KiB pages of files under /usr/lib with lz4 (store_size=False),
as zram would store them (same-filled pages skipped, pages whose lz4 output reaches the huge
watermark stored raw as 4096 bytes). Timed, best of --repeat runs each:
  store       4096 objects, one store() each, and one store_many() of all of them
  read_joined the 4096 objects back in FUSE-read batches of 32 (128 KiB)
  free        the 4096 objects, one free() each, and free_many() in batches of 32
  compact     a pool of --mib MiB of objects after freeing a random half: compact() to the end,
              and its time scaled to 50 MiB moved (issue 14's target: at most 50 ms)

    python benchmarks/pool_engines.py [--mib 200] [--repeat 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lz4.block

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zfs_ram.pool import Pool, ZsmallocPool
from zfs_ram.pool import native as native_pool
from zfs_ram.vocabulary import PAGE_SIZE

MiB = 1 << 20
BATCH = 32  #: objects per FUSE request of 128 KiB
OBJECTS = 4096
#: The issue's target for compaction: 50 MiB moved in at most this many milliseconds.
TARGET_MS_PER_50_MIB = 50.0


def page_sizes(root: str, count: int, huge: int) -> list[int]:
    """Stored sizes of up to `count` pages of the files under root, in walk order."""
    sizes: list[int] = []
    for page in _pages(root):
        if page == page[:8] * (PAGE_SIZE // 8):
            continue  # same-filled: zram keeps no object for it
        n = len(lz4.block.compress(page, store_size=False))
        sizes.append(n if n < huge else PAGE_SIZE)
        if len(sizes) == count:
            break
    return sizes


def _pages(root: str) -> Iterator[bytes]:
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as fh:
                    data = fh.read(4 * MiB)
            except OSError:
                continue
            for pos in range(0, len(data) - PAGE_SIZE + 1, PAGE_SIZE):
                yield data[pos : pos + PAGE_SIZE]


def best(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def engine_timings(
    make: Callable[[], Pool], sizes: list[int], big: list[int], repeat: int, seed: int
) -> dict[str, float]:
    """Seconds per operation kind for one engine."""
    block = random.Random(seed).randbytes(PAGE_SIZE)
    objects = [block[:n] for n in sizes]
    blob = b"".join(objects)
    out: dict[str, float] = {}

    def store_one() -> float:
        with make() as pool:
            t = time.perf_counter()
            for data in objects:
                pool.store(data)
            return time.perf_counter() - t

    def store_many() -> float:
        with make() as pool:
            t = time.perf_counter()
            pool.store_many(blob, sizes)
            return time.perf_counter() - t

    def read_joined() -> float:
        with make() as pool:
            handles = list(pool.store_many(blob, sizes))
            batches = [handles[i : i + BATCH] for i in range(0, len(handles), BATCH)]
            t = time.perf_counter()
            for batch in batches:
                pool.read_joined(batch)
            return time.perf_counter() - t

    def free_one() -> float:
        with make() as pool:
            handles = list(pool.store_many(blob, sizes))
            random.Random(seed).shuffle(handles)
            t = time.perf_counter()
            for h in handles:
                pool.free(h)
            return time.perf_counter() - t

    def free_many() -> float:
        with make() as pool:
            handles = list(pool.store_many(blob, sizes))
            batches = [handles[i : i + BATCH] for i in range(0, len(handles), BATCH)]
            t = time.perf_counter()
            for batch in batches:
                pool.free_many(batch)
            return time.perf_counter() - t

    out["store x4096"] = best(repeat, store_one)
    out["store_many 4096"] = best(repeat, store_many)
    out["read_joined 128 x 32"] = best(repeat, read_joined)
    out["free x4096"] = best(repeat, free_one)
    out["free_many 128 x 32"] = best(repeat, free_many)

    big_blob_block = block * 2
    compact_runs: list[tuple[float, int]] = []
    for _ in range(max(1, repeat // 2)):
        with make() as pool:
            handles = [pool.store(big_blob_block[i % 97 : i % 97 + n]) for i, n in enumerate(big)]
            rng = random.Random(seed)
            pool.free_many(rng.sample(handles, len(handles) // 2))
            moved = pool.statistics().bytes_moved
            t = time.perf_counter()
            pool.compact()
            compact_runs.append((time.perf_counter() - t, pool.statistics().bytes_moved - moved))
    seconds, moved = min(compact_runs)
    out["compact"] = seconds
    out["compact per 50 MiB moved"] = seconds * (50 * MiB) / max(moved, 1)
    out["_moved_mib"] = moved / MiB
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/usr/lib")
    parser.add_argument("--mib", type=int, default=200, help="pool size for the compaction run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not native_pool.BUILT:
        sys.exit("zfs_ram.pool._zsmalloc was not built: nothing to compare")
    huge = ZsmallocPool().huge_class_size
    sample = page_sizes(args.root, 20000, huge)
    if len(sample) < OBJECTS:
        sys.exit(f"only {len(sample)} pages under {args.root}")
    sizes = sample[:OBJECTS]
    big: list[int] = []
    while sum(big) < args.mib * MiB:
        big.extend(sample)
    print(
        f"{len(sample)} pages of {args.root}: mean stored size {sum(sample) / len(sample):.0f} B, "
        f"{sum(1 for n in sample if n == PAGE_SIZE) / len(sample):.0%} raw; compaction over "
        f"{sum(big) / MiB:.0f} MiB in {len(big)} objects, half freed"
    )
    py = engine_timings(ZsmallocPool, sizes, big, args.repeat, args.seed)
    nat = engine_timings(native_pool.NativeZsmallocPool, sizes, big, args.repeat, args.seed)
    print(f"{'operation':28} {'python':>12} {'native':>12} {'python/native':>14}")
    for name in py:
        if name.startswith("_"):
            continue
        print(
            f"{name:28} {py[name] * 1e3:9.2f} ms {nat[name] * 1e3:9.2f} ms "
            f"{py[name] / nat[name]:13.1f}x"
        )
    print(
        f"compaction moved {py['_moved_mib']:.1f} MiB (python) and {nat['_moved_mib']:.1f} MiB "
        f"(native); target: 50 MiB in at most {TARGET_MS_PER_50_MIB:.0f} ms, native "
        f"{nat['compact per 50 MiB moved'] * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
