"""zfs_ram beside kernel tmpfs, kernel zram+ext4 and a do-nothing pyfuse3 filesystem (the
ceiling), in one run.

Why three systems: absolute figures on a shared, noisy 2-core machine say little. tmpfs is what
zfs_ram replaces; nullfs (benchmarks/nullfs.py) is the best any pyfuse3 filesystem can do here,
so zfs_ram/nullfs is the share of the FUSE ceiling that zfs_ram's own code leaves. Every
repetition runs each workload on all the systems back to back (their order rotates from one
repetition to the next), and the report gives medians of the per-repetition ratios. zram is
ext4 on a kernel zram device of its own (lz4, -o discard; systems.ZramExt4), the kernel's way to
keep files compressed in RAM: issue 14's throughput targets are ratios to it (zfs/zram column);
it is left out, with a line saying why, where it cannot run (not root, no zram module, no
mkfs.ext4). A fifth system runs on request (--systems tmpfs zfs_ram nullfs zram lz4null):
lz4null, nullfs with zfs_ram's codec on every page (nullfs.py --lz4), whose ratio to nullfs says
how far any pure-Python filesystem that compresses each page before answering a write can go.

Workloads (names for --only):
  seqwrite_1m, seqwrite_4k  sequential write of --size-mib of real data (files from /usr/lib and
                            /usr/share, concatenated once into a cached file on disk and held in
                            memory while the benchmark runs), 1 MiB / 4 KiB blocks, fsync at end
  seqread                   1 MiB sequential read after dropping the kernel caches
  randread, randwrite       4 KiB random reads / writes at queue depth 1 (fio, psync)
  smallfiles                create+write 20k files of 1-16 KiB, stat, read all, unlink
  untar                     tar x of a real source tree (>100 MB), read it back, rm -rf
  memory                    (taken after seqwrite_1m) daemon RSS and pool pages against the
                            data's size; tmpfs's Shmem (df); kernel zram for the same data

Dropping caches (echo 3 > /proc/sys/vm/drop_caches) empties the page cache of the FUSE mounts
so reads reach the daemons; tmpfs keeps its pages (they are its storage). It also compacts
every kernel zram pool on the machine (drop_caches runs the shrinkers); no zram device is
otherwise touched, except the one this script creates with hot_add for the memory comparison.

Guest memory is warmed before each sequential workload (--no-prewarm turns it off). This
machine is a Firecracker VM with free page reporting: memory the guest frees is handed back to
the host within seconds, and the guest's next touch of such a page costs a host fault (measured:
~8.6 us per 4 KiB, against ~2.2 us for a page the host still backs). A 1 GiB stream allocates
1-2 GiB of page cache and pool frames, so whether it lands on backed or reported pages decided
whether nullfs wrote at ~300 or ~1500 MiB/s. Populating and freeing 2x the data size just
before the clock starts gives every system the same, backed memory; the kernel hands the freed
pages out again first. On bare metal the warm-up changes nothing.

Run as root (mount, drop_caches, zram) with the project's venv:
  /work/main/.venv/bin/python benchmarks/fs_bench.py --reps 5 --json results.json
Everything mounted is unmounted in a finally block, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from systems import (
    CACHE_DIR,
    KIB,
    MIB,
    ZRAM_CONTROL,
    FuseSystem,
    Lz4NullFs,
    NullFs,
    System,
    Tmpfs,
    ZfsRam,
    ZfsRamReference,
    ZramExt4,
    command_output,
    cpu_seconds,
    describe_run,
    is_mounted,
    log,
    run,
    warm_memory,
)

from zfs_ram.vocabulary import CONTROL_DIR, PAGE_SIZE, parse_mm_stat

# Real data: the first bytes of these trees' regular files, taken in turns from each so the
# mix holds both text (share) and binaries (lib): lz4 compresses it about 2-3x, like real files.
DATA_ROOTS = ("/usr/share", "/usr/lib")
# A real source tree of >100 MB and ~10^4 files: Python's stdlib plus Debian's docs.
TREE_PATHS = ("usr/lib/python3.11", "usr/lib/python3", "usr/share/doc")
# --quick: a few MB of the same kind of tree, so the whole run stays under a minute.
QUICK_TREE_PATHS = (
    "usr/lib/python3.11/email",
    "usr/lib/python3.11/json",
    "usr/lib/python3.11/asyncio",
    "usr/lib/python3.11/unittest",
)
SMALL_FILES = 20_000  # the count
SMALL_MIN, SMALL_MAX = 1 * KIB, 16 * KIB  # the sizes
SMALL_PER_DIR = 1000  # files per directory: real trees are not one flat 20k-entry directory
RANDOM_SECONDS = 5.0  # fio runtime per random-I/O run: ~10^4-10^5 I/Os at QD1, enough for a rate
QUICK_SIZE_MIB = 64
QUICK_SMALL_FILES = 2000
QUICK_RANDOM_SECONDS = 1.5
# The targets: minimum zfs_ram/nullfs ratio per metric.
TARGETS: dict[str, float] = {
    "seqwrite_1m": 0.35,
    "seqread": 0.5,
    "randread": 0.8,
    "randwrite": 0.7,
    "smallfiles.create": 0.7,
    "smallfiles.stat": 0.7,
    "smallfiles.unlink": 0.7,
    "untar": 0.7,
}
# Issue 14's targets: minimum zfs_ram/zram+ext4 ratio (same run, real data, medians).
ZRAM_TARGETS: dict[str, float] = {"seqwrite_1m": 1.0, "seqread": 0.7}
RSS_FACTOR, RSS_SLACK = 1.05, 64 * MIB  # RSS <= 1.05 x pool pages + 64 MiB (issue's target)
ZRAM_TOLERANCE = 0.05  # pool pages within 5% of kernel zram's mem_used_total
WORKLOADS = (
    "seqwrite_1m",
    "seqread",
    "randread",
    "randwrite",
    "seqwrite_4k",
    "smallfiles",
    "untar",
)
SEQ_FILE = "seq.bin"
PREWARM_FACTOR = 2  # warm 2x the data: page cache plus pool frames (or the read buffer)
SYSTEMS = ("tmpfs", "zfs_ram", "nullfs", "zram", "lz4null", "zfs_ram_ref")
DEFAULT_SYSTEMS = SYSTEMS[:4]  # lz4null (the pure-Python codec bound) only when asked for
# The daemons whose CPU time is reported.
CPU_SYSTEMS = ("zfs_ram", "nullfs", "lz4null", "zfs_ram_ref")
DEFAULT_REPS = 3  # the median of 3 outvotes one disturbed repetition; a full rep takes minutes


def drop_caches() -> None:
    """Empty page, dentry and inode caches so reads and lookups reach the filesystems."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# -- inputs, built once and cached on disk -----------------------------------------------------


def _regular_files(root: str) -> Iterator[str]:
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path


def build_dataset(size: int) -> Path:
    """Concatenate real files into one cached file of exactly `size` bytes (once)."""
    path = CACHE_DIR / f"data-{size // MIB}MiB.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    log(f"building {path} from {', '.join(DATA_ROOTS)} (once)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    walkers = [_regular_files(root) for root in DATA_ROOTS]
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        while written < size and walkers:
            for walker in list(walkers):
                try:
                    source = next(walker)
                except StopIteration:
                    walkers.remove(walker)
                    continue
                try:
                    with open(source, "rb") as f:
                        chunk = f.read(size - written)
                except OSError:
                    continue
                out.write(chunk)
                written += len(chunk)
                if written >= size:
                    break
    if written < size:
        raise RuntimeError(f"only {written} bytes of real data under {DATA_ROOTS}")
    tmp.rename(path)
    return path


def build_tarball(quick: bool) -> Path:
    """A tar of a real tree (once); uncompressed so untar measures the filesystem, not gzip."""
    paths = QUICK_TREE_PATHS if quick else TREE_PATHS
    path = CACHE_DIR / ("tree-quick.tar" if quick else "tree.tar")
    if path.exists():
        return path
    log(f"building {path} from /{', /'.join(paths)} (once)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    run(["tar", "-cf", str(tmp), "-C", "/", *[p for p in paths if os.path.exists("/" + p)]])
    tmp.rename(path)
    return path


# -- workloads -------------------------------------------------------------------------------


@dataclass
class Context:
    data: bytes
    tarball: Path
    small_files: int
    random_seconds: float
    fio: str | None
    seed: int = 1
    prewarm: bool = True

    def warm(self) -> None:
        """Called by a sequential workload right before its clock starts."""
        if self.prewarm:
            warm_memory(PREWARM_FACTOR * len(self.data))


# A workload returns {metric: (value, unit)}; values are rates, higher is better.
Result = dict[str, tuple[float, str]]


def _write_file(path: Path, data: bytes, block: int) -> float:
    """Write data sequentially in `block`-sized writes, fsync, close; seconds taken."""
    view = memoryview(data)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write = os.write
        for offset in range(0, len(view), block):
            write(fd, view[offset : offset + block])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def ensure_seq_file(ctx: Context, system: System) -> Path:
    path = system.path / SEQ_FILE
    if not path.exists() or path.stat().st_size != len(ctx.data):
        _write_file(path, ctx.data, MIB)
        system.settle()
    return path


def wl_seqwrite(block: int) -> Callable[[Context, System], Result]:
    def workload(ctx: Context, system: System) -> Result:
        path = system.path / SEQ_FILE
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        system.settle()
        ctx.warm()
        seconds = _write_file(path, ctx.data, block)
        if block != MIB:
            path.unlink()  # only the 1 MiB file stays, for the read workloads
        return {"": (len(ctx.data) / MIB / seconds, "MiB/s")}

    return workload


def wl_seqread(ctx: Context, system: System) -> Result:
    path = ensure_seq_file(ctx, system)
    drop_caches()
    ctx.warm()
    buffer = bytearray(len(ctx.data))
    view = memoryview(buffer)
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(buffer):
            got = os.readv(fd, [view[done : done + MIB]])
            if got == 0:
                break
            done += got
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    if done != len(buffer) or (system.verifies and buffer != ctx.data):
        raise RuntimeError(f"{system.name}: read back differs from what was written")
    return {"": (len(buffer) / MIB / seconds, "MiB/s")}


def _fio(ctx: Context, path: Path, mode: str) -> float:
    assert ctx.fio is not None
    cmd = [
        ctx.fio,
        "--name=bench",
        f"--filename={path}",
        f"--rw={mode}",
        "--bs=4k",
        "--iodepth=1",
        "--ioengine=psync",
        f"--size={len(ctx.data)}",
        f"--runtime={ctx.random_seconds}",
        "--time_based",
        "--invalidate=1",
        f"--randseed={ctx.seed}",
        "--output-format=json",
    ]
    if mode == "randwrite":
        # Half-compressible buffers, refilled per write: neither all-same nor incompressible.
        cmd += ["--buffer_compress_percentage=50", "--refill_buffers", "--end_fsync=1"]
    out = run(cmd, stdout=subprocess.PIPE).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["read" if mode == "randread" else "write"]["iops"])


def _python_random(ctx: Context, path: Path, mode: str) -> float:
    """The fallback without fio: os.pread/os.pwrite of 4 KiB pages at random offsets."""
    rng = random.Random(ctx.seed)
    pages = len(ctx.data) // PAGE_SIZE
    block = bytes(ctx.data[:PAGE_SIZE])
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        count = 0
        start = time.perf_counter()
        deadline = start + ctx.random_seconds
        while time.perf_counter() < deadline:
            for _ in range(64):
                offset = rng.randrange(pages) * PAGE_SIZE
                if mode == "randread":
                    os.pread(fd, PAGE_SIZE, offset)
                else:
                    os.pwrite(fd, block, offset)
            count += 64
        if mode == "randwrite":
            os.fsync(fd)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


def wl_random(mode: str) -> Callable[[Context, System], Result]:
    def workload(ctx: Context, system: System) -> Result:
        path = ensure_seq_file(ctx, system)
        drop_caches()
        iops = _fio(ctx, path, mode) if ctx.fio else _python_random(ctx, path, mode)
        return {"": (iops, "IOPS")}

    return workload


def wl_smallfiles(ctx: Context, system: System) -> Result:
    rng = random.Random(ctx.seed)
    sizes = [rng.randint(SMALL_MIN, SMALL_MAX) for _ in range(ctx.small_files)]
    offsets = [rng.randrange(len(ctx.data) - SMALL_MAX) for _ in range(ctx.small_files)]
    top = system.path / "small"
    names = [top / f"d{i // SMALL_PER_DIR:03d}" / f"f{i:05d}" for i in range(ctx.small_files)]
    data = memoryview(ctx.data)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    result: Result = {}

    start = time.perf_counter()
    top.mkdir()
    for i, name in enumerate(names):
        if i % SMALL_PER_DIR == 0:
            name.parent.mkdir()
        fd = os.open(name, flags, 0o644)
        os.write(fd, data[offsets[i] : offsets[i] + sizes[i]])
        os.close(fd)
    result["create"] = (len(names) / (time.perf_counter() - start), "files/s")

    drop_caches()  # stat and read must ask the filesystem, not the dentry/attribute cache
    start = time.perf_counter()
    for name in names:
        os.stat(name)
    result["stat"] = (len(names) / (time.perf_counter() - start), "files/s")

    start = time.perf_counter()
    total = 0
    for name in names:
        fd = os.open(name, os.O_RDONLY)
        total += len(os.read(fd, SMALL_MAX + 1))
        os.close(fd)
    result["read"] = (len(names) / (time.perf_counter() - start), "files/s")
    if total != sum(sizes):
        raise RuntimeError(f"{system.name}: small files read back {total} != {sum(sizes)} bytes")

    start = time.perf_counter()
    for i, name in enumerate(names):
        os.unlink(name)
        if i % SMALL_PER_DIR == SMALL_PER_DIR - 1 or i == len(names) - 1:
            name.parent.rmdir()
    top.rmdir()
    result["unlink"] = (len(names) / (time.perf_counter() - start), "files/s")
    return result


def wl_untar(ctx: Context, system: System) -> Result:
    top = system.path / "tree"
    top.mkdir()
    size = ctx.tarball.stat().st_size
    with open(ctx.tarball, "rb") as f:  # into the page cache: time the target, not the disk
        while f.read(8 * MIB):
            pass
    result: Result = {}
    start = time.perf_counter()
    run(["tar", "-xf", str(ctx.tarball), "-C", str(top)])
    result[""] = (size / MIB / (time.perf_counter() - start), "MiB/s")
    drop_caches()
    # Through a pipe: GNU tar skips reading file contents when its archive is /dev/null.
    start = time.perf_counter()
    run("tar -cf - . | cat > /dev/null", shell=True, cwd=top)
    result["readback"] = (size / MIB / (time.perf_counter() - start), "MiB/s")
    start = time.perf_counter()
    run(["rm", "-rf", str(top)])
    result["rm"] = (size / MIB / (time.perf_counter() - start), "MiB/s")
    return result


WORKLOAD_FUNCS: dict[str, Callable[[Context, System], Result]] = {
    "seqwrite_1m": wl_seqwrite(MIB),
    "seqwrite_4k": wl_seqwrite(PAGE_SIZE),
    "seqread": wl_seqread,
    "randread": wl_random("randread"),
    "randwrite": wl_random("randwrite"),
    "smallfiles": wl_smallfiles,
    "untar": wl_untar,
}


# -- kernel zram, for the memory comparison ---------------------------------------------------


def zram_mem_used(data: bytes) -> dict[str, int] | None:
    """mm_stat of a zram device of our own (hot_add, lz4) holding `data`; None if no zram."""
    if not (ZRAM_CONTROL / "hot_add").exists():
        return None
    device = int((ZRAM_CONTROL / "hot_add").read_text())
    sysdir = Path(f"/sys/block/zram{device}")
    try:
        (sysdir / "comp_algorithm").write_text("lz4\n")
        (sysdir / "disksize").write_text(f"{len(data) + 64 * MIB}\n")
        fd = os.open(f"/dev/zram{device}", os.O_WRONLY)
        try:
            view = memoryview(data)
            for offset in range(0, len(view), MIB):
                os.write(fd, view[offset : offset + MIB])
            os.fsync(fd)
        finally:
            os.close(fd)
        return parse_mm_stat((sysdir / "mm_stat").read_text(), exact=False)
    finally:
        with contextlib.suppress(OSError):
            (sysdir / "reset").write_text("1\n")
        with contextlib.suppress(OSError):
            (ZRAM_CONTROL / "hot_remove").write_text(f"{device}\n")


# -- running and reporting ---------------------------------------------------------------------


@dataclass
class Sample:
    rep: int
    system: str
    workload: str  # "workload" or "workload.metric"
    value: float
    unit: str
    daemon_cpu_s: float | None = None


@dataclass
class Report:
    env: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    zram: dict[str, int] | None = None
    errors: list[str] = field(default_factory=list)


def environment(argv: list[str]) -> dict[str, Any]:
    return describe_run("fs_bench.py", argv, {"fio": command_output("fio", "--version") or None})


def per_rep_ratios(report: Report, num: str, den: str) -> dict[str, list[float]]:
    """num/den per metric, one value per repetition (pairs from one repetition cancel drift)."""
    by_key: dict[tuple[str, int], dict[str, float]] = {}
    for s in report.samples:
        by_key.setdefault((s.workload, s.rep), {})[s.system] = s.value
    per_metric: dict[str, list[float]] = {}
    for (metric, _), values in by_key.items():
        if num in values and den in values and values[den] > 0:
            per_metric.setdefault(metric, []).append(values[num] / values[den])
    return per_metric


def ratios(report: Report, num: str, den: str) -> dict[str, float]:
    """Median over repetitions of num/den per metric."""
    return {m: statistics.median(v) for m, v in per_rep_ratios(report, num, den).items()}


def ratio_ranges(report: Report, num: str, den: str) -> dict[str, tuple[float, float]]:
    """(lowest, highest) per-repetition num/den per metric: how far one run's median can be
    trusted on this machine."""
    return {m: (min(v), max(v)) for m, v in per_rep_ratios(report, num, den).items()}


def _median_cpu(report: Report, metric: str, system: str) -> float | None:
    values = [
        s.daemon_cpu_s
        for s in report.samples
        if s.workload == metric and s.system == system and s.daemon_cpu_s is not None
    ]
    return statistics.median(values) if values else None


def render(report: Report, systems: list[str]) -> str:
    env = report.env
    lines = [
        f"fs_bench {env['date']} on {env['host']}: {env['cpu']}, {env['mem_gib']} GiB, "
        f"Linux {env['kernel']}, Python {env['python']}, zfs_ram {env['commit']}",
        f"command: {env['command']}",
        f"random I/O: {env['fio'] or 'Python pread/pwrite (apt-get install -y fio for fio)'}",
        "guest memory warmed before sequential workloads: "
        + ("yes" if env.get("prewarm", False) else "no (--no-prewarm)"),
        "",
    ]
    metrics: list[str] = []
    units: dict[str, str] = {}
    medians: dict[tuple[str, str], float] = {}
    for s in report.samples:
        if s.workload not in metrics:
            metrics.append(s.workload)
        units[s.workload] = s.unit
    for m in metrics:
        for name in systems:
            values = [s.value for s in report.samples if s.workload == m and s.system == name]
            if values:
                medians[(m, name)] = statistics.median(values)
    to_null = ratios(report, "zfs_ram", "nullfs")
    to_tmpfs = ratios(report, "zfs_ram", "tmpfs")
    to_zram = ratios(report, "zfs_ram", "zram")
    head = f"{'workload':<20}{'unit':>8}" + "".join(f"{n:>10}" for n in systems)
    head += f"{'zfs/ceil':>10}{'zfs/tmpfs':>10}"
    if "zram" in systems:
        head += f"{'zfs/zram':>10}"
    head += f"{'target':>8}  verdict"
    if "zfs_ram" in systems and "nullfs" in systems:  # the CPU column needs both
        head += "  daemon CPU s " + "/".join(
            {"zfs_ram": "zfs", "nullfs": "null"}.get(n, n) for n in CPU_SYSTEMS if n in systems
        )
    lines += [head, "-" * len(head)]
    for m in metrics:
        row = f"{m:<20}{units[m]:>8}"
        for name in systems:
            value = medians.get((m, name))
            row += f"{value:>10.4g}" if value is not None else f"{'-':>10}"
        c, t = to_null.get(m), to_tmpfs.get(m)
        row += f"{c:>10.2f}" if c is not None else f"{'-':>10}"
        row += f"{t:>10.3f}" if t is not None else f"{'-':>10}"
        if "zram" in systems:
            z = to_zram.get(m)
            row += f"{z:>10.2f}" if z is not None else f"{'-':>10}"
        target = TARGETS.get(m)
        if target is not None:
            verdict = "-" if c is None else "ok" if c >= target else "MISS"
            row += f"{target:>8.2f}  {verdict:<7}"
        else:
            row += " " * 17
        if "." not in m or m.endswith(".create") or m == "untar":  # once per workload
            cpu = {n: _median_cpu(report, m, n) for n in CPU_SYSTEMS}
            shown = [n for n in CPU_SYSTEMS if n in systems and cpu[n] is not None]
            if "zfs_ram" in shown and "nullfs" in shown:
                if units[m] == "IOPS":  # time-based: CPU per I/O, not per run
                    ios = {n: medians.get((m, n), 0.0) * env["random_seconds"] for n in shown}
                    per = [1e6 * (cpu[n] or 0.0) / ios[n] if ios[n] else 0.0 for n in shown]
                    row += "  " + " / ".join(f"{v:.0f}" for v in per) + " us per I/O"
                else:
                    row += "  " + " / ".join(f"{cpu[n] or 0.0:.1f}" for n in shown)
        lines.append(row.rstrip())
    if to_zram:
        spread = ratio_ranges(report, "zfs_ram", "zram")
        lines += ["", "against kernel zram+ext4 (issue 14): median (per-repetition range)"]
        for m, target in ZRAM_TARGETS.items():
            if m in to_zram:
                low, high = spread[m]
                verdict = "ok" if to_zram[m] >= target else "MISS"
                lines.append(
                    f"  {m:<20}{to_zram[m]:>6.2f} ({low:.2f}-{high:.2f})  target "
                    f"{target:.2f}: {verdict}"
                )
    against_ref = ratios(report, "zfs_ram", "zfs_ram_ref")
    if against_ref:
        spread = ratio_ranges(report, "zfs_ram", "zfs_ram_ref")
        lines += ["", "against the reference build (--reference-tool): median (range)"]
        for m in metrics:
            if m in against_ref:
                low, high = spread[m]
                lines.append(f"  {m:<20}{against_ref[m]:>6.2f} ({low:.2f}-{high:.2f})")
    bound = ratios(report, "lz4null", "nullfs")
    if bound:
        spread = ratio_ranges(report, "lz4null", "nullfs")
        lines += [
            "",
            "the pure-Python bound, lz4null/nullfs (nullfs plus zfs_ram's codec on "
            "every page, no pool): median (per-repetition range)",
        ]
        for m in metrics:
            if m in bound and m in TARGETS:
                low, high = spread[m]
                verdict = (
                    "the bound is below the target"
                    if high < TARGETS[m]
                    else "the bound is above the target"
                    if low >= TARGETS[m]
                    else "the target is within the bound's spread"
                )
                lines.append(
                    f"  {m:<20}{bound[m]:>6.2f} ({low:.2f}-{high:.2f})  target "
                    f"{TARGETS[m]:.2f}: {verdict}"
                )
    lines.append("")
    lines += render_memory(report)
    lines.append("")
    lines += [f"FAILED: {e}" for e in report.errors]
    lines.append(
        "medians of per-repetition ratios; values are rates (higher is better); daemon "
        "CPU: utime+stime of the FUSE daemon over the whole workload (all its phases)"
    )
    return "\n".join(lines)


def render_memory(report: Report) -> list[str]:
    if not report.memory:
        return []
    zfs = [m for m in report.memory if m["system"] == "zfs_ram"]
    lines = ["memory with the seqwrite_1m file in place (medians over repetitions):"]
    data = report.memory[0]["data_bytes"]
    lines.append(f"  data written: {data / MIB:.1f} MiB")

    def median_of(system: str, key: str) -> float | None:
        values = [r[key] for r in report.memory if r["system"] == system and key in r]
        return statistics.median(values) if values else None

    if (shmem := median_of("tmpfs", "shmem_bytes")) is not None:
        lines.append(f"  tmpfs Shmem (df used): {shmem / MIB:.1f} MiB")
    if (rss := median_of("nullfs", "rss_bytes")) is not None:
        lines.append(f"  nullfs daemon RSS: {rss / MIB:.1f} MiB (pyfuse3+trio baseline)")
    if (rss := median_of("lz4null", "rss_bytes")) is not None:
        rss_after = median_of("lz4null", "rss_after_rm")
        lines.append(
            f"  lz4null daemon RSS: {rss / MIB:.1f} MiB, after deleting everything "
            + (f"{rss_after / MIB:.1f} MiB" if rss_after is not None else "-")
            + " (pages as Python objects: what malloc gives back)"
        )
    if zfs:
        rss = statistics.median(r["rss_bytes"] for r in zfs)
        pool = statistics.median(r["pool_bytes"] for r in zfs)
        compr = statistics.median(r["compr_data_size"] for r in zfs)
        limit = RSS_FACTOR * pool + RSS_SLACK
        lines.append(
            f"  zfs_ram pool pages: {pool / MIB:.1f} MiB (compr_data_size "
            f"{compr / MIB:.1f} MiB, ratio {data / pool if pool else 0:.2f})"
        )
        lines.append(
            f"  zfs_ram daemon RSS: {rss / MIB:.1f} MiB; target <= 1.05 x pool + 64 MiB"
            f" = {limit / MIB:.1f} MiB: {'ok' if rss <= limit else 'MISS'}"
        )
        rss_after = median_of("zfs_ram", "rss_after_rm")
        pool_after = median_of("zfs_ram", "pool_after_rm")
        if rss_after is not None and pool_after is not None:
            lines.append(
                f"  zfs_ram after deleting everything: RSS {rss_after / MIB:.1f} MiB, "
                f"pool {pool_after / MIB:.1f} MiB"
            )
        if report.zram:
            zram = report.zram["mem_used_total"]
            off = pool / zram - 1 if zram else 0.0
            lines.append(
                f"  kernel zram (lz4) mem_used_total for the same data: "
                f"{zram / MIB:.1f} MiB (compr {report.zram['compr_data_size'] / MIB:.1f}"
                f" MiB); zfs_ram pool is {off:+.1%}: "
                f"{'ok' if abs(off) <= ZRAM_TOLERANCE else 'MISS'} (target within 5%)"
            )
        else:
            lines.append("  kernel zram: not measured (--no-zram, or no /sys/class/zram-control)")
    return lines


def clean(system: System) -> None:
    """Remove whatever a failed workload left behind (best effort)."""
    for entry in system.path.iterdir():
        if entry.name == CONTROL_DIR:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> Report:
    size = (QUICK_SIZE_MIB if args.quick else args.size_mib) * MIB
    workloads = [w for w in WORKLOADS if w in args.only] if args.only else list(WORKLOADS)
    fio = shutil.which("fio")
    if fio is None:
        log(
            "fio not found: random I/O falls back to Python pread/pwrite; "
            "for fio: apt-get install -y fio"
        )
    dataset = build_dataset(size)
    data = dataset.read_bytes()
    ctx = Context(
        data=data,
        tarball=build_tarball(args.quick),
        small_files=QUICK_SMALL_FILES if args.quick else args.small_files,
        random_seconds=QUICK_RANDOM_SECONDS if args.quick else args.random_seconds,
        fio=fio,
        prewarm=not args.no_prewarm,
    )
    report = Report(
        env=environment(argv) | {"random_seconds": ctx.random_seconds, "prewarm": ctx.prewarm}
    )
    fs_size = max(4 * 1024 * MIB, 3 * size)  # room for the data, the tree and slack
    root = Path(tempfile.mkdtemp(prefix="fs_bench-"))
    systems: list[System] = []
    makers: dict[str, Callable[[Path], System]] = {
        "tmpfs": lambda path: Tmpfs(path, fs_size),
        "zfs_ram": lambda path: ZfsRam(path, fs_size, args.zfs_ram_options),
        "nullfs": lambda path: NullFs(path, fs_size, xattrs=args.nullfs_xattrs),
        "lz4null": lambda path: Lz4NullFs(path, fs_size, xattrs=args.nullfs_xattrs),
        "zram": lambda path: ZramExt4(path, fs_size),
        "zfs_ram_ref": lambda path: ZfsRamReference(
            path, fs_size, args.zfs_ram_options, tool=args.reference_tool
        ),
    }
    for name in SYSTEMS:
        if name not in (args.systems or DEFAULT_SYSTEMS):
            continue
        if name == "zram" and (reason := ZramExt4.unavailable_reason()) is not None:
            log(f"zram+ext4 left out: {reason}")
            report.errors.append(f"zram+ext4 not run: {reason}")
            continue
        path = root / name
        path.mkdir()
        systems.append(makers[name](path))
    try:
        for system in systems:
            log(f"mounting {system.name} at {system.path}")
            system.mount()
        for rep in range(args.reps):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for workload in workloads:
                for system in order:
                    system.settle()
                    pid = system.pid()
                    cpu0 = cpu_seconds(pid) if pid else None
                    try:
                        result = WORKLOAD_FUNCS[workload](ctx, system)
                    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
                        # One failing system must not end the run: record it and clean up.
                        log(f"rep {rep} {system.name} {workload} FAILED: {error}")
                        report.errors.append(f"rep {rep} {system.name} {workload}: {error}")
                        clean(system)
                        continue
                    cpu = cpu_seconds(pid) - cpu0 if pid and cpu0 is not None else None
                    for metric, (value, unit) in result.items():
                        name = f"{workload}.{metric}" if metric else workload
                        report.samples.append(Sample(rep, system.name, name, value, unit, cpu))
                        log(f"rep {rep} {system.name:<8} {name:<20} {value:10.1f} {unit}")
                    if workload == "seqwrite_1m":
                        system.settle()
                        mem = {"rep": rep, "system": system.name, "data_bytes": len(data)}
                        mem |= system.memory()
                        report.memory.append(mem)
            for system in systems:  # a clean slate for the next repetition
                with contextlib.suppress(FileNotFoundError):
                    (system.path / SEQ_FILE).unlink()
                system.settle()
                if isinstance(system, FuseSystem):
                    after = system.memory()
                    for row in report.memory:
                        if row["rep"] == rep and row["system"] == system.name:
                            row["rss_after_rm"] = after.get("rss_bytes", 0)
                            if "pool_bytes" in after:
                                row["pool_after_rm"] = after["pool_bytes"]
        if not args.no_zram and any(r["system"] == "zfs_ram" for r in report.memory):
            log("measuring kernel zram with the same data")
            report.zram = zram_mem_used(data)
    finally:
        for system in reversed(systems):
            try:
                system.unmount()
            except Exception as error:  # keep unmounting the others
                log(f"unmounting {system.name} failed: {error}")
        for system in systems:
            if is_mounted(system.path):
                log(f"WARNING: {system.path} is still mounted")
            else:
                with contextlib.suppress(OSError):
                    system.path.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description="zfs_ram vs tmpfs vs zram+ext4 vs a do-nothing pyfuse3 filesystem",
        epilog="Needs root. Random I/O uses fio if installed (apt-get install -y fio).",
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument(
        "--size-mib", type=int, default=1024, help="sequential data size in MiB (default 1024)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run < 1 min")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=WORKLOADS,
        metavar="WORKLOAD",
        help=f"run only these workloads, of: {', '.join(WORKLOADS)}",
    )
    parser.add_argument("--json", type=Path, help="write samples and summary to this file")
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=SYSTEMS,
        help="the systems to run (default tmpfs zfs_ram nullfs zram; zram is ext4 on a "
        "kernel zram device; lz4null is "
        "nullfs plus zfs_ram's codec: the bound for pure-Python compression)",
    )
    parser.add_argument(
        "--small-files",
        type=int,
        default=SMALL_FILES,
        help=f"files in the smallfiles workload (default {SMALL_FILES})",
    )
    parser.add_argument(
        "--random-seconds",
        type=float,
        default=RANDOM_SECONDS,
        help=f"seconds per random-I/O run (default {RANDOM_SECONDS})",
    )
    parser.add_argument(
        "--nullfs-xattrs",
        action="store_true",
        help="nullfs and lz4null support xattrs (getxattr -> ENODATA) as zfs_ram "
        "does with -o xattr (give it in --zfs-ram-options too): the kernel then sends "
        "GETXATTR security.capability on every write(2)",
    )
    parser.add_argument(
        "--zfs-ram-options", default="", help="extra zfs-ram mount options, e.g. pool=zbud"
    )
    parser.add_argument("--no-zram", action="store_true", help="skip the kernel zram comparison")
    parser.add_argument(
        "--reference-tool",
        help="the zfs-ram of another checkout (e.g. /work/ref/.venv/bin/zfs-ram): mounted as "
        "zfs_ram_ref beside this one, and zfs_ram/zfs_ram_ref reported",
    )
    parser.add_argument(
        "--no-prewarm",
        action="store_true",
        help="do not warm guest memory before the sequential workloads "
        "(see the module comment: free page reporting in a VM)",
    )
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else DEFAULT_REPS
    if args.reference_tool and not args.systems:
        args.systems = [*DEFAULT_SYSTEMS, "zfs_ram_ref"]
    if "zfs_ram_ref" in (args.systems or ()) and not args.reference_tool:
        parser.error("zfs_ram_ref needs --reference-tool")
    if os.geteuid() != 0:
        parser.error("must run as root (mount, drop_caches, zram)")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally that unmounts

    signal.signal(signal.SIGTERM, on_term)
    report = run_benchmark(args, argv)
    ran = {sample.system for sample in report.samples}
    systems = [
        n for n in SYSTEMS if n in (args.systems or DEFAULT_SYSTEMS) and (n != "zram" or n in ran)
    ]
    text = render(report, systems)
    print(text)
    if args.json:
        payload = asdict(report)
        payload["summary"] = {
            "zfs_ram/nullfs": ratios(report, "zfs_ram", "nullfs"),
            "zfs_ram/tmpfs": ratios(report, "zfs_ram", "tmpfs"),
            "zfs_ram/zram": ratios(report, "zfs_ram", "zram"),
            "zram_targets": ZRAM_TARGETS,
            "lz4null/nullfs": ratios(report, "lz4null", "nullfs"),
            "targets": TARGETS,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
