"""The daemon's RSS after a large write and a mass delete with survivors, against its pool.

Issue 15's target: 1 GiB written, then 90 % deleted (compact=auto, no manual step): the daemon's
RSS at most the pool's pages (mm_stat's mem_used_total) + the fresh mount's RSS + 4 MiB. This
mounts zfs_ram for each (engine, fraction), records the fresh mount's RSS, writes files of a
realistic mix (log-uniform sizes from 4 KiB to 4 MiB, cut from the files under /usr, seeded),
deletes a shuffled share of them by bytes, waits for the compactor (at most SETTLE_SECONDS,
polled), and prints

    residue = RSS - mem_used_total - fresh RSS

with where it lives, from /proc/PID/smaps, as growth over the fresh mount: the pool's frame
arena (its 64 MiB segments are the daemon's only mappings advised MADV_NOHUGEPAGE), the C heap
([heap], where glibc serves small mallocs and CPython's dicts and lists), other anonymous
mappings (CPython's 1 MiB pymalloc arenas, glibc's mmapped chunks and thread arenas) and file
pages (code and data of the libraries).

Memory figures only (no timing), so it may run on a busy machine:

    python benchmarks/rss_after_delete.py [--mib 1024] [--fractions 90,50] [--engines native]
        [--repeat 3] [--tool OTHER/zfs-ram]

--tool mounts another checkout's zfs-ram instead (the code before a change, say), so that the
two can be compared on the same machine and data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from systems import ZfsRam, describe_run, log, rss_bytes

from zfs_ram.client import ControlClient

KIB = 1024
MIB = 1024 * KIB
TARGET_BYTES = 4 * MIB  # issue 15: RSS at most pool + fresh + 4 MiB
SMALLEST_FILE = 4 * KIB
LARGEST_FILE = 4 * MIB
SOURCE_ROOTS = ("/usr/lib", "/usr/share", "/usr/bin")
# A source file is read up to this much, so that no single file dominates the data.
SOURCE_PIECE = 2 * MIB
SETTLE_SECONDS = 5.0  # the target's window: compact=auto, within 5 s of the delete
POLL_SECONDS = 0.1
STABLE_POLLS = 5  # pages_used unchanged this many polls in a row, compactor idle: settled


def source_stream(seed: int) -> Iterator[bytes]:
    """Pieces of the files under /usr, in a seeded order, endlessly (starting over shuffled
    again if the files run out)."""
    paths: list[str] = []
    for root in SOURCE_ROOTS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            paths.extend(os.path.join(dirpath, name) for name in sorted(filenames))
    rng = random.Random(seed)
    while True:
        rng.shuffle(paths)
        yielded = False
        for path in paths:
            try:
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb") as fh:
                    piece = fh.read(SOURCE_PIECE)
            except OSError:
                continue
            if piece:
                yielded = True
                yield piece
        if not yielded:
            raise RuntimeError(f"no readable files under {SOURCE_ROOTS}")


def file_sizes(total: int, seed: int) -> list[int]:
    """Log-uniform sizes from SMALLEST_FILE to LARGEST_FILE (not page-aligned) summing to
    about `total`."""
    rng = random.Random(seed)
    sizes: list[int] = []
    written = 0
    while written < total:
        size = int(SMALLEST_FILE * (LARGEST_FILE / SMALLEST_FILE) ** rng.random())
        size = min(size, total - written) or 1
        sizes.append(size)
        written += size
    return sizes


def write_files(root: Path, total: int, seed: int) -> list[tuple[Path, int]]:
    """Files of `total` bytes under root (100 to a directory); returns (path, size)."""
    stream = source_stream(seed)
    buffer = bytearray()
    files: list[tuple[Path, int]] = []
    for i, size in enumerate(file_sizes(total, seed)):
        while len(buffer) < size:
            buffer += next(stream)
        directory = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            directory.mkdir()
        path = directory / f"f{i:05d}"
        with open(path, "wb") as fh:
            fh.write(buffer[:size])
        del buffer[:size]
        files.append((path, size))
    return files


def delete_share(files: list[tuple[Path, int]], fraction: float, seed: int) -> int:
    """Unlink a shuffled share of the files until `fraction` of their bytes are gone."""
    order = list(files)
    random.Random(seed + 1).shuffle(order)
    goal = fraction * sum(size for _, size in files)
    deleted = 0
    for path, size in order:
        if deleted >= goal:
            break
        path.unlink()
        deleted += size
    return deleted


@dataclass
class Regions:
    """Resident bytes of a process's mappings, by kind (see the module comment)."""

    arena: int = 0
    heap: int = 0
    anon: int = 0
    files: int = 0
    anon_mappings: int = 0

    def minus(self, other: Regions) -> Regions:
        return Regions(
            self.arena - other.arena,
            self.heap - other.heap,
            self.anon - other.anon,
            self.files - other.files,
            self.anon_mappings - other.anon_mappings,
        )


def regions(pid: int) -> Regions:
    """The daemon's resident memory by kind, from /proc/PID/smaps."""
    out = Regions()
    name = ""
    rss = 0
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            head, _, rest = line.partition(" ")
            if "-" in head and head.replace("-", "").isalnum() and ":" not in head:
                fields = line.split()
                name = fields[5] if len(fields) > 5 else ""
            elif head == "Rss:":
                rss = int(rest.split()[0]) * KIB
            elif head == "VmFlags:":
                flags = rest.split()
                if name == "[heap]":
                    out.heap += rss
                elif name == "":
                    if "nh" in flags:
                        out.arena += rss
                    else:
                        out.anon += rss
                        out.anon_mappings += 1
                else:
                    out.files += rss
    return out


def wait_settled(client: ControlClient) -> float:
    """Poll until the compactor is idle and pages_used stays put, at most SETTLE_SECONDS;
    returns the seconds waited."""
    started = time.monotonic()
    last = -1
    stable = 0
    while time.monotonic() - started < SETTLE_SECONDS:
        stats = client.stats()
        used = stats["pool"]["pages_used"]
        stable = stable + 1 if used == last and not stats["compactor"]["running"] else 0
        if stable >= STABLE_POLLS:
            break
        last = used
        time.sleep(POLL_SECONDS)
    return time.monotonic() - started


def measure(
    engine: str, fraction: float, total: int, seed: int, tool: str | None
) -> dict[str, object]:
    """One fresh mount: fill, delete `fraction`, settle; the memory figures."""
    os.environ["ZFS_RAM_ENGINE"] = engine
    with tempfile.TemporaryDirectory(prefix="rss_after_delete.") as tmp:
        mountpoint = Path(tmp)
        system = ZfsRam(mountpoint, 2 * total + 256 * MIB, "compact=auto", tool=tool)
        system.mount()
        try:
            pid = system.pid()
            assert pid is not None
            client = ControlClient(mountpoint)
            client.stats()  # the control directory answered once, as every run does next
            fresh = rss_bytes(pid)
            fresh_regions = regions(pid)
            files = write_files(mountpoint, total, seed)
            filled = client.mm_stat()
            filled_rss = rss_bytes(pid)
            deleted = delete_share(files, fraction, seed)
            waited = wait_settled(client)
            mm = client.mm_stat()
            rss = rss_bytes(pid)
            after = regions(pid)
            pool = mm["mem_used_total"]
            residue = rss - pool - fresh
            grown = after.minus(fresh_regions)
            return {
                "engine": engine,
                "fraction": fraction,
                "files": len(files),
                "written_mib": round(total / MIB, 1),
                "deleted_mib": round(deleted / MIB, 1),
                "fresh_rss_mib": round(fresh / MIB, 2),
                "filled_rss_mib": round(filled_rss / MIB, 2),
                "filled_pool_mib": round(filled["mem_used_total"] / MIB, 2),
                "rss_mib": round(rss / MIB, 2),
                "pool_mib": round(pool / MIB, 2),
                "compr_mib": round(mm["compr_data_size"] / MIB, 2),
                "residue_mib": round(residue / MIB, 2),
                "residue_per_target": round(residue / TARGET_BYTES, 2),
                "settled_after_s": round(waited, 1),
                "growth_arena_mib": round(grown.arena / MIB, 2),
                "growth_arena_minus_pool_mib": round((grown.arena - pool) / MIB, 2),
                "growth_heap_mib": round(grown.heap / MIB, 2),
                "growth_anon_mib": round(grown.anon / MIB, 2),
                "growth_anon_mappings": grown.anon_mappings,
                "growth_files_mib": round(grown.files / MIB, 2),
            }
        finally:
            system.unmount()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="bytes written, in MiB")
    parser.add_argument(
        "--python-mib", type=int, default=256, help="the same for the python engine"
    )
    parser.add_argument("--fractions", default="90,50", help="delete shares in percent")
    parser.add_argument("--engines", default="native", help="native,python")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="fresh mounts per setting")
    parser.add_argument("--tool", help="another checkout's zfs-ram to mount instead")
    args = parser.parse_args()
    print(json.dumps(describe_run("rss_after_delete.py", sys.argv[1:], {"tool": args.tool})))
    summary: list[str] = []
    for engine in args.engines.split(","):
        mib = args.mib if engine == "native" else args.python_mib
        for percent in args.fractions.split(","):
            residues: list[float] = []
            for rep in range(args.repeat):
                log(f"{engine}: {mib} MiB, {percent} % deleted, run {rep + 1}")
                result = measure(engine, int(percent) / 100, mib * MIB, args.seed, args.tool)
                print(json.dumps(result), flush=True)
                residues.append(float(str(result["residue_mib"])))
                log(
                    f"  residue {result['residue_mib']} MiB = {result['residue_per_target']}x "
                    f"the 4 MiB target (rss {result['rss_mib']}, pool {result['pool_mib']}, "
                    f"fresh {result['fresh_rss_mib']}; growth: heap {result['growth_heap_mib']}"
                    f", anon {result['growth_anon_mib']}, arena-pool "
                    f"{result['growth_arena_minus_pool_mib']}, files {result['growth_files_mib']})"
                )
            median = statistics.median(residues)
            summary.append(
                f"{engine} {mib} MiB, {percent} % deleted: residue median {median:.2f} MiB "
                f"({min(residues):.2f}-{max(residues):.2f}) = {median * MIB / TARGET_BYTES:.2f}x "
                f"the 4 MiB target"
            )
    print("\n".join(["", *summary]))


if __name__ == "__main__":
    main()
