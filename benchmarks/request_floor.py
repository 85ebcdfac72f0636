"""What one FUSE request costs here, layer by layer: the C floor, pyfuse3's ceiling, zfs_ram.

Issue 13 asks how much of a request is the kernel's round trip and how much is ours. Three
filesystems answer the same system calls on one file, in one run, interleaved:

  floorfs   benchmarks/floorfs.c: a do-nothing filesystem in C on libfuse's low-level loop,
            the floor of a FUSE round trip on this machine (kernel and libfuse only)
  nullfs    benchmarks/nullfs.py: the do-nothing pyfuse3 filesystem, the ceiling of any
            pyfuse3 filesystem (floor + pyfuse3's Cython dispatch + trio's event loop)
  zfs_ram   a real mount (floor + pyfuse3 + zfs_ram's handlers)

Each call sends a known set of requests, none of them answered by the kernel's caches:
  pwrite       WRITE (1 byte at offset 0)
  utime        SETATTR
  open_close   OPEN + RELEASE (the RELEASE is sent without waiting; it still costs the daemon)
  write_fstat  WRITE + GETATTR (a write makes the kernel drop the file's attributes)
Extended attributes are off on all three (the default of zfs_ram, ENOSYS from floorfs and
nullfs), so no GETXATTR precedes the writes. The report gives per call the median microseconds
of each system over the repetitions and the ratios to the floor; "pyfuse3" (nullfs - floorfs)
and "zfs_ram" (zfs_ram - nullfs) are what each layer adds. With --reference-tool, another
checkout's zfs-ram is mounted beside them (zfs_ram_ref) and zfs_ram / zfs_ram_ref is reported
per call: a change to the request path, measured in the same run as the code before it.

Run as root (or any user allowed to mount FUSE) with the project's venv, on an idle machine:
  /work/main/.venv/bin/python benchmarks/request_floor.py --reps 5
floorfs is compiled once into the benchmark cache (gcc and libfuse3-dev, which ./run installs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from systems import (
    CACHE_DIR,
    HERE,
    MIB,
    FuseSystem,
    NullFs,
    System,
    ZfsRam,
    ZfsRamReference,
    is_mounted,
    log,
)

DEFAULT_CALLS = 20_000
DEFAULT_REPS = 5
FILE = "f"  # the one file floorfs has; made on the others
CALLS = ("pwrite", "utime", "open_close", "write_fstat")


class FloorFs(FuseSystem):
    """benchmarks/floorfs.c, compiled into the cache on first use."""

    name = "floorfs"

    def __init__(self, path: Path, size_bytes: int) -> None:
        super().__init__(path, size_bytes)
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> Path:
        source = HERE / "floorfs.c"
        target = CACHE_DIR / "floorfs"
        if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            flags = subprocess.run(
                ["pkg-config", "--cflags", "--libs", "fuse3"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            subprocess.run(
                ["gcc", "-O2", "-o", str(target), str(source), *flags], check=True, text=True
            )
        return target

    def mount(self) -> None:
        self.process = subprocess.Popen([str(self.binary()), str(self.path)])
        deadline = time.monotonic() + 10
        while not is_mounted(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("floorfs did not mount")
            time.sleep(0.02)
        os.stat(self.path)

    def unmount(self) -> None:
        super().unmount()
        if self.process is not None:
            self.process.wait(timeout=10)


@contextlib.contextmanager
def calls(path: Path) -> Iterator[dict[str, Callable[[], object]]]:
    """The system calls measured, on the file at `path` (held open read-write meanwhile: an
    open file would keep the mount alive past its unmount)."""
    fd = os.open(path, os.O_RDWR)
    try:
        yield {
            "pwrite": lambda: os.pwrite(fd, b"x", 0),
            "utime": lambda: os.utime(fd, ns=(1, 1)),
            "open_close": lambda: os.close(os.open(path, os.O_RDONLY)),
            "write_fstat": lambda: (os.pwrite(fd, b"x", 0), os.fstat(fd)),
        }
    finally:
        os.close(fd)


def per_call_us(fn: Callable[[], object], n: int) -> float:
    for _ in range(n // 20):  # warm the path (and the daemon) first
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS)
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS, help="calls per sample")
    parser.add_argument(
        "--reference-tool",
        help="the zfs-ram of another checkout (e.g. /work/ref/.venv/bin/zfs-ram): mounted as "
        "zfs_ram_ref beside the others, and zfs_ram / zfs_ram_ref reported per call",
    )
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="request_floor-"))
    systems: list[System] = []
    for cls in (FloorFs, NullFs, ZfsRam):
        (base / cls.name).mkdir()
        systems.append(cls(base / cls.name, 64 * MIB))
    if args.reference_tool:
        (base / ZfsRamReference.name).mkdir()
        systems.append(
            ZfsRamReference(base / ZfsRamReference.name, 64 * MIB, tool=args.reference_tool)
        )
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for system in systems:
            log(f"mounting {system.name}")
            system.mount()
            if system.name != "floorfs":
                (system.path / FILE).write_bytes(b"")
        for rep in range(args.reps):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for system in order:
                with calls(system.path / FILE) as measured:
                    for name, fn in measured.items():
                        us = per_call_us(fn, args.calls)
                        samples.setdefault((system.name, name), []).append(us)
                        log(f"rep {rep} {system.name:<8} {name:<12} {us:7.1f} us")
    finally:
        for system in systems:
            with contextlib.suppress(Exception):  # unmount the others whatever happens
                system.unmount()
            with contextlib.suppress(OSError):
                system.path.rmdir()
        with contextlib.suppress(OSError):
            base.rmdir()
    print(f"request_floor: {args.reps} reps x {args.calls} calls, medians in microseconds")
    header = f"{'call':<12} {'floorfs':>8} {'nullfs':>8} {'zfs_ram':>8}"
    print(header + f" {'null/floor':>10} {'zfs/floor':>10} {'pyfuse3':>8} {'zfs_ram':>8}")
    for name in CALLS:
        floor, null, zfs = (
            statistics.median(samples[(s, name)]) for s in ("floorfs", "nullfs", "zfs_ram")
        )
        print(
            f"{name:<12} {floor:8.1f} {null:8.1f} {zfs:8.1f} {null / floor:10.2f} "
            f"{zfs / floor:10.2f} {null - floor:+8.1f} {zfs - null:+8.1f}"
        )
    if args.reference_tool:
        print(f"against the reference build ({args.reference_tool}): medians, per-rep ratios")
        for name in CALLS:
            mine, ref = samples[("zfs_ram", name)], samples[(ZfsRamReference.name, name)]
            ratios = sorted(m / r for m, r in zip(mine, ref, strict=True))
            print(
                f"{name:<12} zfs_ram {statistics.median(mine):7.1f}  zfs_ram_ref "
                f"{statistics.median(ref):7.1f}  ratio {statistics.median(ratios):.2f} "
                f"({ratios[0]:.2f}-{ratios[-1]:.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
