"""Fragmentation, compaction and speed of the pools on real compressed pages.

Fills a pool with lz4-compressed 4 KiB pages of the files under /usr/lib and /usr/share (as
zram would store them: same-filled pages skipped, pages whose lz4 output reaches the huge
watermark stored raw as 4096 bytes), frees a random share, compacts, and prints for each
allocator how many bytes of memory the pool holds per byte stored at each stage, the frames
returned to the OS, arena Rss against pages_used, metadata per object, and operation rates.

    python benchmarks/pool_fragmentation.py [--mib 400] [--seed 1] [--fractions 25,50,75,90]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lz4.block

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zfs_ram.pool import create_pool
from zfs_ram.vocabulary import PAGE_SIZE

MiB = 1 << 20
#: Where the input pages come from: large, varied, present on every Debian system.
DEFAULT_ROOTS = ("/usr/lib", "/usr/share")
#: Files larger than this are cut short so that one huge file cannot dominate the sample.
MAX_BYTES_PER_FILE = 4 * MiB


def same_filled(page: bytes) -> bool:
    """zram's page_same_filled(): every 8-byte word equals the first (such pages cost nothing)."""
    return page == page[:8] * (PAGE_SIZE // 8)


def collect_objects(roots: list[str], mib: int, seed: int, huge: int) -> tuple[list[bytes], dict]:
    """Compressed objects for about `mib` MiB of input pages, in a seeded file order."""
    files: list[str] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    random.Random(seed).shuffle(files)
    objects: list[bytes] = []
    info = {"pages": 0, "same": 0, "huge": 0, "files": 0, "input": 0}
    raw = bytearray(PAGE_SIZE)
    for path in files:
        if info["input"] >= mib * MiB:
            break
        try:
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            with open(path, "rb") as fh:
                data = fh.read(MAX_BYTES_PER_FILE)
        except OSError:
            continue
        if not data:
            continue
        info["files"] += 1
        for off in range(0, len(data), PAGE_SIZE):
            page = data[off : off + PAGE_SIZE]
            if len(page) < PAGE_SIZE:
                raw[:] = bytes(PAGE_SIZE)
                raw[: len(page)] = page
                page = bytes(raw)
            info["pages"] += 1
            info["input"] += PAGE_SIZE
            if same_filled(page):
                info["same"] += 1
                continue
            comp = lz4.block.compress(page, store_size=False)
            if len(comp) >= huge:
                info["huge"] += 1
                comp = page
            objects.append(comp)
    return objects, info


@dataclass
class Run:
    kind: str
    fraction: float
    stored_fill: int
    pages_fill: int
    stored_freed: int
    pages_freed: int
    pages_compacted_end: int
    frames_returned: int
    rss_end: int
    meta_per_obj: float
    store_rate: float
    read_rate: float
    free_rate: float
    compact_mib_s: float
    compact_s: float
    freeable_before: int

    def ratio(self, pages: int, stored: int) -> float:
        return pages * PAGE_SIZE / stored if stored else 0.0


def run_once(kind: str, objects: list[bytes], fraction: float, seed: int) -> Run:
    pool = create_pool(kind)
    try:
        t0 = time.perf_counter()
        handles = [pool.store(o) for o in objects]
        t1 = time.perf_counter()
        for h in handles:
            pool.read(h)
        t2 = time.perf_counter()
        fill = pool.statistics()
        meta = fill.metadata_bytes / fill.objects
        victims = random.Random(seed).sample(handles, int(len(handles) * fraction))
        t3 = time.perf_counter()
        for h in victims:
            pool.free(h)
        t4 = time.perf_counter()
        freed = pool.statistics()
        pool.compact()
        t5 = time.perf_counter()
        end = pool.statistics()
        pool.check()
        return Run(
            kind=kind,
            fraction=fraction,
            stored_fill=fill.bytes_stored,
            pages_fill=fill.pages_used,
            stored_freed=freed.bytes_stored,
            pages_freed=freed.pages_used,
            pages_compacted_end=end.pages_used,
            frames_returned=fill.pages_used - end.pages_used,
            rss_end=pool.arena_rss_bytes(),
            meta_per_obj=meta,
            store_rate=len(objects) / (t1 - t0),
            read_rate=len(objects) / (t2 - t1),
            free_rate=len(victims) / (t4 - t3) if victims else 0.0,
            compact_mib_s=end.bytes_moved / MiB / (t5 - t4) if end.bytes_moved else 0.0,
            compact_s=t5 - t4,
            freeable_before=freed.freeable_pages,
        )
    finally:
        pool.close()


def print_table(kind: str, runs: list[Run]) -> None:
    print(f"\n== {kind} ==")
    head = (
        f"{'freed':>5} {'fill':>6} {'freed':>6} {'compact':>7} {'frames back':>11} "
        f"{'rss/used':>8} {'meta B/obj':>10} {'store/s':>8} {'read/s':>8} {'free/s':>8} "
        f"{'compact':>13}"
    )
    print("pool bytes / stored bytes after fill, after frees, after compaction")
    print(head)
    for r in runs:
        used_end = r.pages_compacted_end * PAGE_SIZE
        compact = f"{r.compact_mib_s:6.0f} MiB/s" if r.compact_mib_s else "      -"
        print(
            f"{r.fraction:5.0%} {r.ratio(r.pages_fill, r.stored_fill):6.3f} "
            f"{r.ratio(r.pages_freed, r.stored_freed):6.3f} "
            f"{r.ratio(r.pages_compacted_end, r.stored_freed):7.3f} "
            f"{r.frames_returned:11d} {r.rss_end / used_end if used_end else 0:8.4f} "
            f"{r.meta_per_obj:10.1f} {r.store_rate:8.0f} {r.read_rate:8.0f} "
            f"{r.free_rate:8.0f} {compact:>13}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--mib",
        type=int,
        default=400,
        help="MiB of input pages (default 400, the size of the kernel measurement)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fractions", default="25,50,75,90", help="percent freed, comma-separated")
    ap.add_argument("--kinds", default="zsmalloc,zbud")
    ap.add_argument("--roots", default=",".join(DEFAULT_ROOTS))
    args = ap.parse_args(argv)
    huge = create_pool("zsmalloc").huge_class_size
    t = time.perf_counter()
    objects, info = collect_objects(args.roots.split(","), args.mib, args.seed, huge)
    stored = sum(map(len, objects))
    print(
        f"input: {info['input'] / MiB:.1f} MiB in {info['pages']} pages of {info['files']} files; "
        f"{info['same']} same-filled skipped, {info['huge']} stored raw (lz4 >= {huge} B); "
        f"{len(objects)} objects, {stored / MiB:.1f} MiB to store "
        f"(collected in {time.perf_counter() - t:.1f} s)"
    )
    fractions = [int(f) / 100 for f in args.fractions.split(",")]
    for kind in args.kinds.split(","):
        runs = [run_once(kind, objects, f, args.seed + i) for i, f in enumerate(fractions)]
        print_table(kind, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
