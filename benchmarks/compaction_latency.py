"""Does the compactor stall foreground reads? 4 KiB read latency, idle vs during compaction.

One zfs_ram mount (compact=off, so compaction happens only when this script asks): fill it
with real data in many files, delete a shuffled half, then measure 4 KiB reads at random
offsets of a probe file, each read evicted from the page cache first (posix_fadvise
DONTNEED), so that every read is a FUSE request served by the daemon:
  idle        no compaction running
  compacting  while `echo 1 > .zfs_ram/compact` runs in another thread
Prints median, p90, p99 and max for both, and the ratio of the p99s (target: at most 2).

    python benchmarks/compaction_latency.py [--fill-mib 400] [--batch 64] [--reads 5000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from zfs_ram.client import COMPACT_TIMEOUT, ControlClient
from zfs_ram.vocabulary import PAGE_SIZE, ControlFile

MIB = 1 << 20


def real_blob(total: int, seed: int) -> bytes:
    """Real, compressible bytes: shuffled library files, concatenated."""
    rng = random.Random(seed)
    paths = sorted(p for p in Path("/usr/lib/x86_64-linux-gnu").glob("*.so*") if p.is_file())
    rng.shuffle(paths)
    parts, size = [], 0
    for path in paths:
        data = path.read_bytes()
        parts.append(data)
        size += len(data)
        if size >= total:
            break
    blob = b"".join(parts)
    return (blob * (total // max(len(blob), 1) + 1))[:total]


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "median": statistics.median(ordered),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": ordered[-1],
    }


def probe_reads(
    path: Path, count: int, rng: random.Random, until: threading.Event | None = None
) -> list[float]:
    """Latencies (seconds) of uncached 4 KiB reads at random page offsets."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = os.fstat(fd).st_size // PAGE_SIZE
        samples = []
        while len(samples) < count and not (until is not None and until.is_set()):
            offset = rng.randrange(pages) * PAGE_SIZE
            os.posix_fadvise(fd, offset, PAGE_SIZE, os.POSIX_FADV_DONTNEED)
            started = time.perf_counter()
            os.pread(fd, PAGE_SIZE, offset)
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fill-mib", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4, help="compact_batch= mount option")
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="zfs_ram-latency-"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    zfs_ram = [sys.executable, "-m", "zfs_ram"]
    subprocess.run(
        zfs_ram + ["mount", str(mnt), "-o", f"size=0,compact=off,compact_batch={args.batch}"],
        check=True,
    )
    try:
        blob = real_blob(args.fill_mib * MIB, args.seed)
        probe = mnt / "probe"
        probe.write_bytes(blob[: 32 * MIB])
        files = []
        offset = 0
        while offset < len(blob):
            size = rng.randint(1, 64) * PAGE_SIZE
            path = mnt / f"f{len(files):06d}"
            path.write_bytes(blob[offset : offset + size])
            files.append(path)
            offset += size
        rng.shuffle(files)
        for path in files[: len(files) // 2]:
            path.unlink()
        probe_reads(probe, 200, rng)  # warm up the code paths
        idle = probe_reads(probe, args.reads, rng)
        done = threading.Event()
        timing: dict[str, float] = {}

        control = ControlClient(mnt)

        def compact() -> None:
            started = time.perf_counter()
            control.write(ControlFile.COMPACT, "1\n", timeout=COMPACT_TIMEOUT)
            timing["seconds"] = time.perf_counter() - started
            done.set()

        before = control.mm_stat()["pages_compacted"]
        worker = threading.Thread(target=compact)
        worker.start()
        busy = probe_reads(probe, 10**9, rng, until=done)
        worker.join()
        after = control.mm_stat()["pages_compacted"]
    finally:
        subprocess.run(zfs_ram + ["umount", str(mnt)], check=False)
        if not os.path.ismount(mnt):
            mnt.rmdir()
            tmp.rmdir()
    freed = after - before
    print(
        f"fill {args.fill_mib} MiB, compact_batch={args.batch}: compaction freed {freed} pages"
        f" ({freed * PAGE_SIZE / MIB:.1f} MiB) in {timing['seconds']:.2f} s;"
        f" {len(busy)} reads ran meanwhile"
    )
    print(f"{'4 KiB read':12} {'median':>9} {'p90':>9} {'p99':>9} {'max':>9}   (microseconds)")
    rows = {"idle": percentiles(idle), "compacting": percentiles(busy)}
    for name, row in rows.items():
        print(
            f"{name:12} "
            + " ".join(f"{row[k] * 1e6:9.0f}" for k in ("median", "p90", "p99", "max"))
        )
    ratio = rows["compacting"]["p99"] / rows["idle"]["p99"]
    print(f"p99 ratio compacting/idle: {ratio:.2f} (target <= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
