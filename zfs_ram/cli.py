"""The zfs-ram command: mount, umount, stat, compact (and experiment, when installed).

Thin by design: the daemon does the mounting, the control directory MOUNTPOINT/.zfs_ram holds
the numbers; this module parses arguments and renders. Every error is one line
``zfs-ram: ...`` on stderr with exit status 2 for usage errors and 1 for everything else.

``mount_helper_main`` is the ``zfs_ram`` program that mount.fuse3 runs for
``mount -t fuse.zfs_ram`` and fstab lines: ``/bin/sh -c 'zfs_ram SOURCE MOUNTPOINT -o OPTS'``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, cast

from zfs_ram import __version__
from zfs_ram.client import ControlClient, ControlError, NoAnswer
from zfs_ram.mounts import (
    MountInfo,
    abort_connection,
    fusermount,
    locate,
    read_mounts,
    wait_for_exit,
)
from zfs_ram.vocabulary import PAGE_SIZE, SUBTYPE

PROG = "zfs-ram"
# How long umount waits for the daemon to exit after the kernel let go of the mount. The daemon
# only drops its inodes and frees the pool then, which takes well under a second.
DAEMON_EXIT_TIMEOUT = 30.0
# After aborting a connection, how long a "busy" unmount is retried before a lazy one.
ABORTED_BUSY_SECONDS = 2.0
EXIT_USAGE = 2
EXIT_FAILURE = 1
# `zfs-ram stat --json`: the sections a reader looks at first; `classes` (hundreds of size
# classes) goes last, anything else in between.
JSON_FIRST = ("mountpoint", "mm_stat", "fs", "engines", "pool", "store", "compactor")
JSON_LAST = ("classes",)


class CliError(Exception):
    """A failure to report as one line and exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------------
# Helpers shared by the subcommands


def _fusermount(path: str, *, lazy: bool, busy_for: float = 0.0) -> str | None:
    """mounts.fusermount, but a missing fusermount3 is the user's to fix, not a reason."""
    if shutil.which("fusermount3") is None:
        raise CliError("fusermount3 not found (install the fuse3 package)")
    return fusermount(path, lazy=lazy, busy_for=busy_for)


def _zfs_ram_mount(mountpoint: str, command: str) -> MountInfo:
    """The zfs_ram mount at ``mountpoint``, or CliError. Never stats inside a zfs_ram mount, so
    it works for a dead or stopped daemon too."""
    where = locate(mountpoint)
    info = where.mount
    if info is not None and info.is_zfs_ram and not where.is_mountpoint:
        raise CliError(
            f"{mountpoint} is inside the zfs_ram mount {info.mountpoint};"
            f" name the mount point: {PROG} {command} {info.mountpoint}"
        )
    if info is None or not where.is_mountpoint:
        if not os.path.exists(where.path):  # not in a zfs_ram mount: stat() cannot hang
            raise CliError(f"{mountpoint} does not exist")
        raise CliError(f"{mountpoint} is not mounted")
    if not info.is_zfs_ram:
        raise CliError(f"{mountpoint} is not a zfs_ram mount (it is {info.fstype})")
    return info


def _stats(path: str) -> dict[str, Any]:
    try:
        return ControlClient(path).stats()
    except ControlError as e:
        raise CliError(str(e)) from None


def _ordered(stats: dict[str, Any]) -> dict[str, Any]:
    """stats.json's sections in JSON_FIRST order, the rest by name, JSON_LAST at the end."""
    first = [k for k in JSON_FIRST if k in stats]
    last = [k for k in JSON_LAST if k in stats]
    middle = sorted(k for k in stats if k not in first and k not in last)
    return {k: stats[k] for k in first + middle + last}


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
    info = _zfs_ram_mount(args.mountpoint, "umount")
    path = info.mountpoint
    if args.lazy:
        # Returns at once, while files may still be open: nothing to wait for, nothing to ask.
        reason = _fusermount(path, lazy=True)
        if reason is not None:
            raise CliError(f"unmounting {args.mountpoint} failed: {reason}")
        return 0
    pid: int | None = None
    try:
        pid = ControlClient(path).pid()  # before unmounting, to wait for the daemon afterwards
    except NoAnswer:
        return _umount_unanswered(args.mountpoint, info)
    except ControlError:
        pass  # a dead daemon (killed): nothing to wait for, fusermount3 -u still works
    reason = _fusermount(path, lazy=False)
    if reason is not None:
        if "busy" in reason.lower():
            raise CliError(
                f"{args.mountpoint} is busy (open files or a working directory inside);"
                f" close them or use '{PROG} umount -z'"
            )
        raise CliError(f"unmounting {args.mountpoint} failed: {reason}")
    if pid is not None and _is_daemon(pid):
        outcome = wait_for_exit(pid, DAEMON_EXIT_TIMEOUT)
        if outcome == "stopped":
            print(
                f"{PROG}: unmounted {args.mountpoint}; its daemon (pid {pid}) is stopped"
                " and exits once it runs again",
                file=sys.stderr,
            )
        elif outcome == "running":
            raise CliError(f"unmounted, but the daemon (pid {pid}) has not exited")
    return 0


def _umount_unanswered(mountpoint: str, info: MountInfo) -> int:
    """Unmount a mount whose daemon is stopped or hung.

    Our own pid read now waits inside the mount, so a plain unmount would only say "busy".
    Aborting the FUSE connection fails every waiting request (ours included) and leaves a dead
    mount, which unmounts; the daemon exits when it next runs. Without fusectl, a lazy unmount
    still frees the mount point: the kernel lets go once the last waiter is gone.
    """
    problem = abort_connection(info)
    if problem is None:
        reason = _fusermount(info.mountpoint, lazy=False, busy_for=ABORTED_BUSY_SECONDS)
        how = "aborted its connection and unmounted it"
        if reason is not None:  # other processes still hold files in it
            reason = _fusermount(info.mountpoint, lazy=True)
            how = "aborted its connection and detached it (files were still open)"
    else:
        reason = _fusermount(info.mountpoint, lazy=True)
        how = f"detached it lazily ({problem})"
    if reason is not None:
        raise CliError(
            f"the zfs_ram daemon of {mountpoint} does not answer (stopped or hung) and"
            f" unmounting failed: {reason}"
        )
    print(
        f"{PROG}: the zfs_ram daemon of {mountpoint} does not answer (stopped or hung); {how};"
        " the daemon exits once it runs again",
        file=sys.stderr,
    )
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
    ("ALGORITHM", "fs", "comp_algorithm", False),  # zramctl's: the compressor
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


def algorithm_rows(
    mountpoint: str, stats: dict[str, Any], *, raw_bytes: bool
) -> list[dict[str, str]]:
    """stats.json's per-compressor section as rows: the pages each one encoded and keeps,
    their bytes and their ratio."""
    rows = []
    for name, entry in stats.get("algorithms", {}).items():
        pages, compr = int(entry["pages"]), int(entry["compr_data_size"])
        rows.append(
            {
                "MOUNTPOINT": mountpoint,
                "ALGORITHM": name,
                "PAGES": str(pages),
                "COMPR": str(compr) if raw_bytes else human_size(compr),
                "COMP-RATIO": f"{pages * PAGE_SIZE / compr:.2f}" if compr else "-",
            }
        )
    return rows


# What --algorithms prints for a daemon too old to report them.
_NO_ALGORITHMS = {
    "MOUNTPOINT": "-",
    "ALGORITHM": "-",
    "PAGES": "-",
    "COMPR": "-",
    "COMP-RATIO": "-",
}


def cmd_stat(args: argparse.Namespace) -> int:
    """One mount's table or JSON object; without a MOUNTPOINT, every zfs_ram mount (zramctl)."""
    if args.mountpoint is not None:
        path = _zfs_ram_mount(args.mountpoint, "stat").mountpoint
        stats = _stats(path)
        if args.requests:
            _print_requests([(path, stats)], as_json=args.json)
        elif args.algorithms and not args.json:
            _print_table(algorithm_rows(path, stats, raw_bytes=args.bytes) or [_NO_ALGORITHMS])
        elif args.json:
            print(json.dumps(_ordered(stats), indent=2))
        else:
            _print_table([{"MOUNTPOINT": path, **stat_row(stats, raw_bytes=args.bytes)}])
        return 0

    status = 0
    mounts = [info.mountpoint for info in read_mounts() if info.is_zfs_ram]
    found: list[tuple[str, dict[str, Any]]] = []
    for mountpoint in mounts:
        try:
            found.append((mountpoint, _stats(mountpoint)))
        except CliError as e:  # a dead or hung daemon: say so, list the others
            print(f"{PROG}: {e}", file=sys.stderr)
            status = EXIT_FAILURE
    if args.requests and found:
        _print_requests(found, as_json=args.json)
    elif args.algorithms and found and not args.json:
        rows = [r for m, s in found for r in algorithm_rows(m, s, raw_bytes=args.bytes)]
        _print_table(rows or [_NO_ALGORITHMS])
    elif args.json:
        print(json.dumps([_ordered({"mountpoint": m, **s}) for m, s in found], indent=2))
    elif found:
        _print_table([{"MOUNTPOINT": m, **stat_row(s, raw_bytes=args.bytes)} for m, s in found])
    elif not mounts:
        print(f"no {SUBTYPE} mounts")
    return status


def request_rows(requests: dict[str, Any]) -> list[dict[str, str]]:
    """stats.json's per-opcode requests as nfsstat-like rows, the commonest first."""
    total = sum(int(entry["count"]) for entry in requests.values()) or 1
    rows = []
    for opcode, entry in sorted(requests.items(), key=lambda item: -int(item[1]["count"])):
        count, seconds = int(entry["count"]), float(entry["seconds"])
        rows.append(
            {
                "OPCODE": opcode,
                "COUNT": str(count),
                "SHARE": f"{100 * count / total:.1f}%",
                "SECONDS": f"{seconds:.3f}",
                "US/REQ": f"{1e6 * seconds / count:.1f}" if count else "-",
            }
        )
    return rows


def _print_requests(found: list[tuple[str, dict[str, Any]]], *, as_json: bool) -> None:
    """`zfs-ram stat --requests`: the FUSE requests each mount has served, by opcode."""
    if as_json:
        listed = [{"mountpoint": m, "requests": s.get("requests", {})} for m, s in found]
        print(json.dumps(listed[0] if len(listed) == 1 else listed, indent=2))
        return
    for index, (mountpoint, stats) in enumerate(found):
        requests = stats.get("requests", {})
        count = sum(int(entry["count"]) for entry in requests.values())
        seconds = sum(float(entry["seconds"]) for entry in requests.values())
        if index:
            print()
        print(f"{mountpoint}: {count} requests, {seconds:.3f} s in handlers")
        if requests:
            _print_table(request_rows(requests))


def _print_table(rows: list[dict[str, str]]) -> None:
    """Columns as wide as their widest cell; text left-aligned, numbers right, as zramctl."""
    header = {k: k for k in rows[0]}
    widths = {k: max(len(row[k]) for row in [header, *rows]) for k in header}
    for row in [header, *rows]:
        print(
            " ".join(
                v.ljust(widths[k])
                if k in ("MOUNTPOINT", "POOL", "ALGORITHM", "OPCODE")
                else v.rjust(widths[k])
                for k, v in row.items()
            ).rstrip()
        )


def cmd_compact(args: argparse.Namespace) -> int:
    path = _zfs_ram_mount(args.mountpoint, "compact").mountpoint
    try:
        freed = ControlClient(path).compact()
    except ControlError as e:
        raise CliError(str(e)) from None
    print(f"{freed} pages freed ({human_size(freed * PAGE_SIZE)})")
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
        help="comma-separated mount options (listed below); may be repeated",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "-d", "--debug", action="store_true", help="log every request (implies --foreground)"
    )


def _mount_parser_settings() -> dict[str, Any]:
    from zfs_ram.daemon.options import options_help

    return {
        "epilog": options_help(),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="A compressed tmpfs in FUSE: zsmalloc-backed lz4 pages in RAM."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "mount",
        help="mount zfs_ram on a directory (returns once ready)",
        description="Mount zfs_ram on an empty directory. Returns once the mount is ready;"
        " the daemon stays in the background (with -f, in the foreground).",
        **_mount_parser_settings(),
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    _add_mount_arguments(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser(
        "umount",
        aliases=["unmount"],
        help="unmount and wait for the daemon",
        description="Unmount a zfs_ram mount and wait for its daemon to exit. A daemon that"
        " does not answer (stopped or hung) has its FUSE connection aborted first.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-z", "--lazy", action="store_true", help="lazy unmount (fusermount3 -z)")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser(
        "stat",
        help="memory statistics, like zramctl",
        description="Memory statistics of one zfs_ram mount, or of all of them, like zramctl.",
    )
    p.add_argument(
        "mountpoint", metavar="MOUNTPOINT", nargs="?", help="default: every zfs_ram mount"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print .zfs_ram/stats.json (a list of them, with mountpoint, for all mounts)",
    )
    p.add_argument("-b", "--bytes", action="store_true", help="sizes in bytes")
    p.add_argument(
        "--requests",
        action="store_true",
        help="the FUSE requests served, by opcode, with the time spent on them (like nfsstat);"
        " with --json, stats.json's requests section",
    )
    p.add_argument(
        "--algorithms",
        action="store_true",
        help="per compressor: the pages it encoded that are stored, their bytes and ratio"
        " (stats.json's algorithms section)",
    )
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser(
        "compact",
        help="compact the pool now and print the pages freed",
        description="Compact the pool of a zfs_ram mount now, as zram's compact does: move"
        " objects out of sparsely used zspages and give the emptied pages back to the system."
        " Prints the pages freed; returns when the pass is done.",
    )
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


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown argument after a subcommand is that subcommand's usage error
    (pointing to ``zfs-ram mount --help``, not ``zfs-ram --help``)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        culprit: argparse.ArgumentParser = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                culprit = action.choices.get(args.command, parser)
        culprit.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


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
    args = _parse(build_parser(), argv)
    return _run(args.func, args)


# mount.fuse3 appends these to the options of every mount root makes without nodev/nosuid,
# so that mount(8)'s kernel default (dev, suid) applies; it cannot tell a user's explicit
# "suid" from none. zfs_ram's default is nosuid,nodev on every path (OPTION_TABLE), so the
# helper drops what mount.fuse3 added; `zfs-ram mount -o suid,dev` asks for them.
_MOUNT_FUSE_ADDITIONS = ("dev", "suid")
# mount.fuse3 execs /bin/sh, which execs us: our parent is then mount(8) itself.
_MOUNT_FUSE_NAMES = frozenset({"mount", "mount.fuse3", "mount.fuse"})
_SHELLS = frozenset({"sh", "dash", "bash"})


def _run_by_mount_fuse() -> bool:
    """Was this process started by mount(8) through mount.fuse3 (maybe via a shell)?"""
    pid = os.getppid()
    for _ in range(2):
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read()
        except OSError:
            return False
        name = fields[fields.index("(") + 1 : fields.rindex(")")]
        if name in _MOUNT_FUSE_NAMES:
            return True
        if name not in _SHELLS:
            return False
        pid = int(fields.rpartition(")")[2].split()[1])
    return False


def _without_mount_fuse_additions(options: list[str]) -> list[str]:
    """The -o strings without the trailing dev/suid that mount.fuse3 appended."""
    if not options:
        return options
    words = options[-1].split(",")
    for added in reversed(_MOUNT_FUSE_ADDITIONS):
        if words and words[-1] == added:
            words.pop()
    return [*options[:-1], ",".join(words)]


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``zfs_ram [SOURCE] MOUNTPOINT [-o OPTIONS]``: the program mount.fuse3 and fstab run.

    SOURCE (the first fstab field, e.g. "zfs_ram") is ignored, as for tmpfs; the fsname=
    option names the mount instead.
    """
    parser = _Parser(
        prog="zfs_ram",
        usage="%(prog)s [SOURCE] MOUNTPOINT [-o OPTIONS]",
        description="Mount zfs_ram (for mount -t fuse.zfs_ram and fstab).",
        **_mount_parser_settings(),
    )
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT", help=argparse.SUPPRESS)
    _add_mount_arguments(parser)
    # mount(8)'s helper flags (-n no mtab, -s sloppy, -v verbose): accepted, meaningless here.
    for flag in ("-n", "-s", "-v"):
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    if len(args.paths) > 2:
        parser.error("expected [SOURCE] MOUNTPOINT")
    args.mountpoint = args.paths[-1]
    if _run_by_mount_fuse():
        args.options = _without_mount_fuse_additions(args.options)
    return _run(cmd_mount, args)
