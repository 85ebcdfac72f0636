"""Where zfs_ram's daemon spends its time: py-spy samples it while fs_bench's workloads run.

fs_bench.py says which workloads miss their target; this says why, from samples rather than
guesses. It mounts zfs_ram alone, runs each chosen workload once with
``py-spy record --format raw`` attached to the daemon, and prints per workload the functions
with the most samples: "self" (the sample's innermost frame: time spent in that function's own
code) and "total" (the function anywhere on the stack). Idle samples (the daemon waiting for
/dev/fuse) are left out by py-spy, so the shares are of the daemon's busy time; the daemon's
CPU seconds against the workload's wall time are printed too.

py-spy goes into its own venv, never the project's:
  python3 -m venv /tmp/prof-venv && /tmp/prof-venv/bin/pip install py-spy
  /work/main/.venv/bin/python benchmarks/profile_zfs_ram.py --size-mib 256 seqwrite_1m randwrite
The raw stacks stay in --out (flamegraph.pl or speedscope read them).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fs_bench

DEFAULT_PY_SPY = "/tmp/prof-venv/bin/py-spy"
SAMPLE_RATE = 250  # per second: ~10^3 samples in a few seconds, low enough not to stall the daemon
SMALL_FILES = 5000  # enough samples for the metadata paths at a quarter of fs_bench's time
PY_SPY_START = 1.0  # seconds py-spy needs to attach before its first sample


def _frame_name(frame: str) -> str:
    """'write (zfs_ram/pagestore.py:229)' -> 'write (zfs_ram/pagestore.py)': a row per function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def summarize(raw: Path, top: int) -> str:
    """Top functions by self and total samples from py-spy's raw (collapsed) output."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            total_counts[name] += count
    if not samples:
        return "  no samples"
    lines = [f"  {samples} busy samples"]
    lines.append(f"  {'self':>6}  function")
    for name, count in self_counts.most_common(top):
        lines.append(f"  {count / samples:>6.1%}  {name}")
    lines.append(f"  {'total':>6}  function (anywhere on the stack)")
    for name, count in total_counts.most_common(top):
        lines.append(f"  {count / samples:>6.1%}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("workloads", nargs="+", choices=fs_bench.WORKLOADS)
    parser.add_argument("--size-mib", type=int, default=256, help="sequential data (MiB)")
    parser.add_argument("--small-files", type=int, default=SMALL_FILES)
    parser.add_argument("--random-seconds", type=float, default=fs_bench.RANDOM_SECONDS)
    parser.add_argument("--py-spy", default=DEFAULT_PY_SPY, help="py-spy binary")
    parser.add_argument("--native", action="store_true", help="also sample C frames (slower)")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/zfs_ram_profile"), help="folder for the raw stacks"
    )
    parser.add_argument("--options", default="", help="extra zfs-ram mount options")
    parser.add_argument(
        "--nullfs",
        action="store_true",
        help="profile the do-nothing ceiling instead: what FUSE+pyfuse3+trio cost by themselves",
    )
    args = parser.parse_args(argv)
    if not Path(args.py_spy).exists():
        parser.error(f"no py-spy at {args.py_spy}; see this script's docstring")
    args.out.mkdir(parents=True, exist_ok=True)

    size = args.size_mib * fs_bench.MIB
    ctx = fs_bench.Context(
        data=fs_bench.build_dataset(size).read_bytes(),
        tarball=fs_bench.build_tarball(quick=False),
        small_files=args.small_files,
        random_seconds=args.random_seconds,
        fio=shutil.which("fio"),
    )
    root = Path(tempfile.mkdtemp(prefix="profile_zfs_ram-"))
    (root / "mnt").mkdir()
    fs_size = max(4096 * fs_bench.MIB, 3 * size)
    system: fs_bench.System = (
        fs_bench.NullFs(root / "mnt", fs_size)
        if args.nullfs
        else fs_bench.ZfsRam(root / "mnt", fs_size, args.options)
    )
    try:
        system.mount()
        pid = system.pid()
        assert pid is not None
        for workload in args.workloads:
            if workload in ("seqread", "randread", "randwrite"):
                fs_bench.ensure_seq_file(ctx, system)  # set-up outside the profile
            system.settle()
            raw = args.out / f"{workload}.txt"
            cmd = [
                args.py_spy,
                "record",
                "-p",
                str(pid),
                "--format",
                "raw",
                "-o",
                str(raw),
                "--rate",
                str(SAMPLE_RATE),
            ]
            if args.native:
                cmd.append("--native")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(PY_SPY_START)
            cpu0, start = fs_bench.cpu_seconds(pid), time.perf_counter()
            result = fs_bench.WORKLOAD_FUNCS[workload](ctx, system)
            wall, cpu = time.perf_counter() - start, fs_bench.cpu_seconds(pid) - cpu0
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            spy.wait(timeout=60)
            figures = ", ".join(f"{k or workload}={v:.4g} {u}" for k, (v, u) in result.items())
            print(f"== {workload}: {figures}; daemon CPU {cpu:.2f} s of {wall:.2f} s wall")
            print(summarize(raw, args.top) if raw.exists() else "  py-spy wrote nothing")
            sys.stdout.flush()
    finally:
        system.unmount()
        if not fs_bench.is_mounted(system.path):
            os.rmdir(system.path)
            os.rmdir(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
