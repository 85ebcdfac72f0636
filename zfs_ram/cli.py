"""The zfs-ram command: mount, umount, stat, compact (and experiment, when installed).

Thin by design: the daemon does the mounting, the control directory MOUNTPOINT/.zfs_ram holds
the numbers; this module parses arguments and renders. Every error is one line
``zfs-ram: ...`` on stderr with exit status 2 for usage errors and 1 for everything else.

``mount_helper_main`` is the ``zfs_ram`` program that mount.fuse3 runs for
``mount -t fuse.zfs_ram`` and fstab lines: ``/bin/sh -c 'zfs_ram SOURCE MOUNTPOINT -o OPTS'``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn, cast

from zfs_ram import __version__

PROG = "zfs-ram"
CONTROL_DIR = ".zfs_ram"
FSTYPE = "fuse.zfs_ram"
# How long umount waits for the daemon to exit after the kernel let go of the mount. The daemon
# only drops its inodes and frees the pool then, which takes well under a second.
DAEMON_EXIT_TIMEOUT = 30.0
# Reading a control file of a hung (stopped, deadlocked) daemon blocks; give up after this.
CONTROL_READ_TIMEOUT = 3.0
EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """A failure to report as one line and exit status 1."""


class _NoAnswer(CliError):
    """A control file read that did not return: the daemon is stopped or hung."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------------
# Helpers shared by the subcommands


def _fusermount() -> str:
    tool = shutil.which("fusermount3")
    if tool is None:
        raise CliError("fusermount3 not found (install the fuse3 package)")
    return tool


def _zfs_ram_mount(mountpoint: str) -> str:
    """The resolved path of a zfs_ram mount, or CliError. Works for a dead mount too."""
    from zfs_ram.daemon.lifecycle import find_mount, resolve

    path = resolve(mountpoint)
    info = find_mount(path)
    if info is None:
        if not os.path.exists(path):
            raise CliError(f"{mountpoint} does not exist")
        raise CliError(f"{mountpoint} is not mounted")
    if info.fstype != FSTYPE:
        raise CliError(f"{mountpoint} is not a zfs_ram mount (it is {info.fstype})")
    return path


def _read_control(path: str, name: str, timeout: float = CONTROL_READ_TIMEOUT) -> str:
    """Read MOUNTPOINT/.zfs_ram/NAME; CliError if the daemon is dead or does not answer."""
    result: list[str | BaseException] = []

    def read() -> None:
        try:
            with open(os.path.join(path, CONTROL_DIR, name), encoding="utf-8") as f:
                result.append(f.read())
        except BaseException as e:  # handed to the caller's thread
            result.append(e)

    # A thread, because a request to a stopped daemon blocks in the kernel; a daemon thread
    # stuck there does not keep this process from exiting.
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise _NoAnswer(f"the zfs_ram daemon of {path} does not answer (stopped or hung)")
    value = result[0]
    if isinstance(value, OSError):
        if value.errno == errno.ENOTCONN:
            raise CliError(f"the zfs_ram daemon of {path} is gone (use 'zfs-ram umount')")
        raise CliError(f"cannot read {CONTROL_DIR}/{name} of {path}: {value.strerror}")
    if isinstance(value, BaseException):
        raise value
    return value


def _write_control(path: str, name: str, data: str) -> None:
    try:
        with open(os.path.join(path, CONTROL_DIR, name), "w", encoding="utf-8") as f:
            f.write(data)
    except OSError as e:
        raise CliError(f"cannot write {CONTROL_DIR}/{name} of {path}: {e.strerror}") from None


def _read_stats(path: str) -> dict[str, Any]:
    text = _read_control(path, "stats.json")
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"{CONTROL_DIR}/stats.json of {path} is not JSON: {e}") from None
    if not isinstance(stats, dict):
        raise CliError(f"{CONTROL_DIR}/stats.json of {path} is not a JSON object")
    return stats


def human_size(n: float) -> str:
    """zramctl's style: 1023B, 4K, 1.5M, 12.3G (binary units, one decimal below 10)."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.1f}{unit}" if abs(n) < 10 else f"{n:.0f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Subcommands


def cmd_mount(args: argparse.Namespace) -> int:
    from zfs_ram.daemon.lifecycle import MountError, mount

    try:
        return mount(
            args.mountpoint, ",".join(args.options), foreground=args.foreground, debug=args.debug
        )
    except MountError as e:
        raise CliError(str(e)) from None


def cmd_umount(args: argparse.Namespace) -> int:
    from zfs_ram.daemon.lifecycle import is_alive

    path = _zfs_ram_mount(args.mountpoint)
    pid: int | None = None
    try:
        # Read before unmounting, to wait for the daemon afterwards. A lazy unmount returns
        # at once, while files may still be open, so there is nothing to wait for.
        if not args.lazy:
            pid = int(_read_control(path, "pid").strip())
    except _NoAnswer:
        # Our own read is stuck in the mount now, so a plain unmount would only say "busy".
        raise CliError(
            f"the zfs_ram daemon of {args.mountpoint} does not answer (stopped or hung);"
            " 'zfs-ram umount -z' detaches the mount"
        ) from None
    except (CliError, ValueError):
        pass  # a dead daemon (killed): nothing to wait for, fusermount3 -u still works
    cmd = [_fusermount(), "-u"] + (["-z"] if args.lazy else []) + [path]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        if "busy" in reason.lower():
            raise CliError(
                f"{args.mountpoint} is busy (open files or a working directory inside);"
                " close them or use 'zfs-ram umount -z'"
            )
        raise CliError(f"unmounting {args.mountpoint} failed: {reason}")
    if pid is not None:
        deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
        while _is_daemon(pid) and is_alive(pid):
            if time.monotonic() > deadline:
                raise CliError(f"unmounted, but the daemon (pid {pid}) has not exited")
            time.sleep(0.05)
    return 0


def _is_daemon(pid: int) -> bool:
    """Is ``pid`` still a zfs_ram process (and not a new process that reused the number)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"zfs_ram" in cmdline or b"zfs-ram" in cmdline


# Columns of `zfs-ram stat`, zramctl's where zram has the same thing:
# (header, section of stats.json, field, is a byte count).
STAT_COLUMNS: tuple[tuple[str, str, str, bool], ...] = (
    ("POOL", "fs", "pool", False),
    ("SIZE", "fs", "size_bytes", True),  # zramctl's DISKSIZE: the logical limit, size=
    ("DATA", "mm_stat", "orig_data_size", True),
    ("COMPR", "mm_stat", "compr_data_size", True),
    ("TOTAL", "mm_stat", "mem_used_total", True),
    ("MEM-LIMIT", "mm_stat", "mem_limit", True),
    ("MEM-USED", "mm_stat", "mem_used_max", True),
    ("COMPACTED", "mm_stat", "pages_compacted", False),  # zramctl's MIGRATED, in pages
    ("COMP-RATIO", "", "comp_ratio", False),
    ("SAME", "mm_stat", "same_pages", False),
    ("HUGE", "mm_stat", "huge_pages", False),
    ("FILES", "fs", "inodes_used", False),
)


def stat_row(stats: dict[str, Any], *, raw_bytes: bool) -> dict[str, str]:
    """The zramctl-like columns of one mount, rendered as text; "-" where a field is missing."""
    mm = stats.get("mm_stat", {})
    row: dict[str, str] = {}
    for header, section, key, is_bytes in STAT_COLUMNS:
        if key == "comp_ratio":
            data, compr = mm.get("orig_data_size"), mm.get("compr_data_size")
            row[header] = f"{data / compr:.2f}" if data and compr else "-"
            continue
        value = stats.get(section, {}).get(key)
        if value is None:
            row[header] = "-"
        elif is_bytes and not raw_bytes:
            row[header] = human_size(value)
        else:
            row[header] = str(value)
    return row


def cmd_stat(args: argparse.Namespace) -> int:
    """One mount's table or JSON object; without a MOUNTPOINT, every zfs_ram mount (zramctl)."""
    if args.mountpoint is not None:
        path = _zfs_ram_mount(args.mountpoint)
        stats = _read_stats(path)
        if args.json:
            print(json.dumps(stats, indent=1, sort_keys=True))
        else:
            _print_table([{"MOUNTPOINT": path, **stat_row(stats, raw_bytes=args.bytes)}])
        return 0

    from zfs_ram.daemon.lifecycle import read_mounts

    status = 0
    found: list[tuple[str, dict[str, Any]]] = []
    for info in read_mounts():
        if info.fstype != FSTYPE:
            continue
        try:
            found.append((info.mountpoint, _read_stats(info.mountpoint)))
        except CliError as e:  # a dead or hung daemon: say so, list the others
            print(f"{PROG}: {e}", file=sys.stderr)
            status = EXIT_FAILURE
    if args.json:
        print(json.dumps([{"mountpoint": m, **s} for m, s in found], indent=1, sort_keys=True))
    elif found:
        _print_table([{"MOUNTPOINT": m, **stat_row(s, raw_bytes=args.bytes)} for m, s in found])
    return status


def _print_table(rows: list[dict[str, str]]) -> None:
    """Columns as wide as their widest cell; text left-aligned, numbers right, as zramctl."""
    header = {k: k for k in rows[0]}
    widths = {k: max(len(row[k]) for row in [header, *rows]) for k in header}
    for row in [header, *rows]:
        print(
            " ".join(
                v.ljust(widths[k]) if k in ("MOUNTPOINT", "POOL") else v.rjust(widths[k])
                for k, v in row.items()
            ).rstrip()
        )


def cmd_compact(args: argparse.Namespace) -> int:
    path = _zfs_ram_mount(args.mountpoint)
    before = _read_stats(path).get("mm_stat", {}).get("pages_compacted", 0)
    _write_control(path, "compact", "1")
    after = _read_stats(path).get("mm_stat", {}).get("pages_compacted", 0)
    freed = max(0, after - before)
    print(f"{freed} pages freed ({human_size(freed * 4096)})")
    return 0


# --------------------------------------------------------------------------------------------
# Parsers and entry points


def _add_mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated mount options (size=, nr_inodes=, mode=, uid=, gid=, mem_limit=,"
        " pool=, compact=, allow_other, fsname=, ...); may be repeated",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "-d", "--debug", action="store_true", help="log every request (implies --foreground)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="A compressed tmpfs in FUSE: zsmalloc-backed lz4 pages in RAM."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("mount", help="mount zfs_ram on a directory (returns once ready)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    _add_mount_arguments(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", aliases=["unmount"], help="unmount and wait for the daemon")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-z", "--lazy", action="store_true", help="lazy unmount (fusermount3 -z)")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("stat", help="memory statistics, like zramctl")
    p.add_argument(
        "mountpoint", metavar="MOUNTPOINT", nargs="?", help="default: every zfs_ram mount"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print .zfs_ram/stats.json as is (a list of them, with mountpoint, for all mounts)",
    )
    p.add_argument("-b", "--bytes", action="store_true", help="sizes in bytes")
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser("compact", help="compact the pool now and print the pages freed")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_compact)

    try:  # written separately; the rest of the CLI must work without it
        from zfs_ram.experiments.cli import add_parser as add_experiment_parser
    except ImportError:
        pass
    else:
        # The cast: argparse's subparser action is invariant in its parser class.
        add_experiment_parser(cast("argparse._SubParsersAction[argparse.ArgumentParser]", sub))
    return parser


def _run(func: Any, args: argparse.Namespace) -> int:
    try:
        status = func(args)
    except CliError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # `zfs-ram stat --json | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit-time flush does not fail again
        return EXIT_FAILURE
    return int(status or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """``zfs-ram COMMAND ...``"""
    args = build_parser().parse_args(argv)
    return _run(args.func, args)


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``zfs_ram [SOURCE] MOUNTPOINT [-o OPTIONS]``: the program mount.fuse3 and fstab run.

    SOURCE (the first fstab field, e.g. "zfs_ram") is ignored, as for tmpfs; the fsname=
    option names the mount instead.
    """
    parser = _Parser(
        prog="zfs_ram",
        description="Mount zfs_ram (for mount -t fuse.zfs_ram and fstab).",
    )
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    _add_mount_arguments(parser)
    # mount(8)'s helper flags (-n no mtab, -s sloppy, -v verbose): accepted, meaningless here.
    for flag in ("-n", "-s", "-v"):
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    if len(args.paths) > 2:
        parser.error("expected [SOURCE] MOUNTPOINT")
    args.mountpoint = args.paths[-1]
    return _run(cmd_mount, args)
