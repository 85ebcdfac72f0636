"""``zfs-ram experiment``: the fragmentation experiment from the command line.

The CLI module of zfs_ram calls ``add_parser(subparsers)``; ``python -m zfs_ram.experiments``
runs the same parser on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from zfs_ram.experiments.arms import ARMS_BY_NAME, Arm
from zfs_ram.experiments.report import render_table, write_json, write_plot
from zfs_ram.experiments.runner import (
    DEFAULT_WAIT,
    ExperimentResult,
    Interrupted,
    Progress,
    run_experiment,
)
from zfs_ram.experiments.targets import (
    KernelZramTarget,
    Target,
    ZfsRamTarget,
    kernel_zram_available,
)
from zfs_ram.experiments.workload import MIB, WRITE_ORDERS, WorkloadSpec, build_file_set
from zfs_ram.vocabulary import PAGE_SIZE, mem_total_bytes

DEFAULT_FRACTIONS = "0.25,0.5,0.75,0.9"
DEFAULT_SIZE_MIB = 200  # big enough for hundreds of zspages per class, small enough for minutes
KERNEL_ARM = "kernel"
ALL_ARMS = (*ARMS_BY_NAME, KERNEL_ARM)  # zfs_ram's arms are in arms.py

_N = TypeVar("_N", int, float)


def _fractions(text: str) -> list[float]:
    """ "0.25,0.5" -> [0.25, 0.5]: shares of the files to delete, each from 0 (none) to 1 (all)."""
    out = []
    for part in text.split(","):
        value = _number(part, float)
        if not 0 <= value <= 1:
            hint = f" (for {part.strip()} % write {value / 100:g})" if 1 < value <= 100 else ""
            raise argparse.ArgumentTypeError(f"{part.strip()} is not a fraction in 0..1{hint}")
        if value in out:
            raise argparse.ArgumentTypeError(f"fraction {part.strip()} given twice")
        out.append(value)
    return out


def _arms(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no arm given (use {', '.join(ALL_ARMS)})")
    for i, name in enumerate(names):
        if name not in ALL_ARMS:
            raise argparse.ArgumentTypeError(f"unknown arm {name!r} (use {', '.join(ALL_ARMS)})")
        if name in names[:i]:
            raise argparse.ArgumentTypeError(f"arm {name!r} given twice")
    return names


def _number(text: str, kind: Callable[[str], _N]) -> _N:
    """``text`` as a finite int or float, or the usage error argparse reports in one line."""
    try:
        value = kind(text.strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text.strip()!r} is not {what}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text.strip()} is not a finite number")
    return value


def _size_mib(text: str) -> float:
    """The workload's size: at least one page, and no more than the machine's RAM (the file
    set is built in memory, then stored again on the target)."""
    value = _number(text, float)
    if value * MIB < PAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text.strip()} MiB is less than one page ({PAGE_SIZE / MIB:g} MiB)"
        )
    ram = mem_total_bytes()
    if value * MIB > ram:
        raise argparse.ArgumentTypeError(
            f"{text.strip()} MiB is more than this machine's RAM ({ram // MIB} MiB)"
        )
    return value


def _seconds(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text.strip()} is negative (seconds, 0 or more)")
    return value


def _count(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text.strip()} is negative (a count, 0 or more)")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``experiment`` on the zfs-ram command."""
    p = subparsers.add_parser(
        "experiment",
        help="measure fragmentation: fill, delete a fraction, wait, compact; per allocator",
        description="Fill a fresh filesystem with a seeded mix of real and synthetic files, "
        "delete a random fraction, wait, compact, and compare memory per compressed byte "
        "across zfs_ram's allocators, compressors and tiers and the kernel's zram (as root). "
        "Ctrl-C or SIGTERM stops it with the results so far written and printed.",
    )
    p.add_argument(
        "--fractions",
        type=_fractions,
        default=_fractions(DEFAULT_FRACTIONS),
        help="shares of the files to delete, each in 0..1, comma-separated"
        f" (default {DEFAULT_FRACTIONS})",
    )
    p.add_argument(
        "--size-mib",
        type=_size_mib,
        default=DEFAULT_SIZE_MIB,
        help=f"workload size in MiB (default {DEFAULT_SIZE_MIB})",
    )
    p.add_argument(
        "--arms",
        type=_arms,
        default=list(ALL_ARMS),
        help=f"arms, comma-separated (default {','.join(ALL_ARMS)})",
    )
    p.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    p.add_argument(
        "--wait",
        type=_seconds,
        default=DEFAULT_WAIT,
        help=f"seconds to wait idle after the delete (default {DEFAULT_WAIT:g})",
    )
    p.add_argument(
        "--order",
        choices=WRITE_ORDERS,
        default="shuffled",
        help="page write order during the fill (default shuffled)",
    )
    p.add_argument(
        "--out",
        default="zfs_ram-experiment",
        help="directory for experiment.json and experiment.png",
    )
    p.add_argument(
        "--retries",
        type=_count,
        default=1,
        help="tries more per failed run, each on a fresh target (default 1)",
    )
    p.add_argument("--no-kernel", action="store_true", help="skip the kernel zram arm")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run_experiment_cli)


def _zfs_ram_factory(arm: Arm, size: int, log_dir: str) -> Callable[[float], Target]:
    """A fresh mount per run; the daemon logs to LOG_DIR/ARM-PERCENT.log (kept for failures)."""

    def factory(fraction: float) -> Target:
        os.makedirs(log_dir, exist_ok=True)
        log = os.path.join(log_dir, f"{arm.name}-{fraction * 100:.0f}.log")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log)  # the daemon appends; one run per file
        return ZfsRamTarget(
            arm.pool,
            arm.compact,
            size,
            arm.name,
            extra_options=arm.options,
            log_path=log,
            steps=arm.after_fill,
        )

    return factory


class _StopRequests:
    """SIGINT and SIGTERM while the experiment runs.

    The first one raises Interrupted where the runs are (the runner keeps what it has and
    returns); any later one, or one after the runs, is only remembered, so that the results
    so far are still written and printed. The exit status is then 128 + the first signal.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.raising = True

    def __call__(self, signum: int, frame: object) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if first and self.raising:
            self.raising = False
            raise Interrupted(signum)
        print("experiment: stopping, writing the results so far", file=sys.stderr)


def run_experiment_cli(args: argparse.Namespace) -> int:
    """Build the file set once, run every arm and fraction, print and save the results.

    Ctrl-C and SIGTERM stop it: the current target is still unmounted (or its zram device
    removed), the results so far are written and printed, and the exit status is 128 + the
    signal's number.
    """
    stop = _StopRequests()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = _run_experiment(args, stop)
    except Interrupted as exc:  # before the first run: nothing measured, nothing written
        print(f"experiment: interrupted by {exc} before the first run", file=sys.stderr)
        return exc.exit_status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + stop.signum if stop.signum is not None else status


def _reference_arm(names: list[str]) -> str | None:
    """The first arm storing with lz4 and nothing after the fill: the byte ratios' yardstick."""
    return next((n for n in names if n in ARMS_BY_NAME and ARMS_BY_NAME[n].is_reference), None)


def _run_experiment(args: argparse.Namespace, stop: _StopRequests) -> int:
    progress = Progress(quiet=args.quiet)
    size = round(args.size_mib * MIB)
    log_dir = os.path.join(args.out, "logs")
    arms: list[tuple[str, Callable[[float], Target]]] = []
    skipped: dict[str, str] = {}
    for name in args.arms:
        if name == KERNEL_ARM:
            why = "--no-kernel" if args.no_kernel else kernel_zram_available()
            if why is not None:
                skipped[name] = why
                continue
            arms.append((name, lambda fraction: KernelZramTarget(size)))
        else:
            arms.append((name, _zfs_ram_factory(ARMS_BY_NAME[name], size, log_dir)))
    for name, why in skipped.items():
        print(f"experiment: arm {name} skipped: {why}", file=sys.stderr)
    if not arms:
        print("experiment: no arm to run", file=sys.stderr)
        return 2

    started = time.monotonic()
    progress.start("[workload]")
    file_set = build_file_set(WorkloadSpec(size_bytes=size, seed=args.seed))
    summary = file_set.summary()
    progress.stage(
        f"{summary['files']} files ({summary['real_files']} real, "
        f"{summary['synthetic_files']} synthetic), {summary['total_bytes'] / MIB:.1f} MiB, "
        f"built in {time.monotonic() - started:.1f}s"
    )
    names = [a for a, _ in arms]
    params = {
        "fractions": args.fractions,
        "size_mib": args.size_mib,
        "arms": names,
        "seed": args.seed,
        "wait": args.wait,
        "order": args.order,
        "kernel": os.uname().release,
        "reference_arm": _reference_arm(names),
        "arm_descriptions": {
            n: ARMS_BY_NAME[n].describe() if n in ARMS_BY_NAME else "ext4 on the kernel's zram"
            for n in names
        },
    }
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "experiment.json")
    result = run_experiment(
        file_set,
        arms,
        args.fractions,
        args.wait,
        args.order,
        progress,
        params,
        retries=args.retries,
        on_run=lambda so_far: write_json(so_far, json_path),  # kept if we are killed later
    )
    stop.raising = False  # from here on a signal waits until the results are out
    result.skipped.update(skipped)
    return _write_results(result, args, json_path, log_dir)


def _write_results(
    result: ExperimentResult, args: argparse.Namespace, json_path: str, log_dir: str
) -> int:
    """Print the table, write the JSON and the plot; 1 if a run failed."""
    print(render_table(result, markdown=args.markdown))
    write_json(result, json_path)
    print(f"samples: {json_path}")
    if any(r.error for r in result.runs) and os.path.isdir(log_dir):
        print(f"daemon logs: {log_dir}")
    try:
        png_path = os.path.join(args.out, "experiment.png")
        write_plot(result, png_path)
        print(f"plot:    {png_path}")
    except ImportError:
        print("plot:    skipped (matplotlib is not installed)", file=sys.stderr)
    sys.stdout.flush()
    return 1 if any(r.error for r in result.runs) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m zfs_ram.experiments``: the experiment without the zfs-ram front end."""
    parser = argparse.ArgumentParser(prog="python -m zfs_ram.experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["experiment", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))
