"""Mount options: one ``-o`` string -> what the filesystem, libfuse and the daemon each need.

A zfs_ram mount is reached three ways: ``zfs-ram mount -o ...``, ``mount -t fuse.zfs_ram`` and
fstab. The last two go through mount.fuse3, which hands us whatever the user wrote plus mount(8)'s
generic options (``rw``, ``defaults``, ``dev``, ``suid``, ...). So the parser has three kinds of
option:

* filesystem options (tmpfs's ``size=``, ``nr_inodes=``, ``mode=``, ``uid=``, ``gid=`` and
  zfs_ram's own) become one ``FsConfig``;
* options libfuse 3.14's mount code understands go to ``pyfuse3.init`` unchanged. libfuse >= 3.15
  rejects any option it does not know, and 3.14 already rejects several generic ones (probed:
  ``relatime``, ``defaults``, ``nofail``, ``x-*``, ...), so nothing else may reach it;
* mount(8)/fstab options that make no sense for a FUSE daemon are accepted and dropped.

Anything else is an error whose message is one line naming the option and the reason.
Parsing is pure: the RAM size and the user/group databases are injectable for tests.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from zfs_ram.codec import ALGORITHMS
from zfs_ram.fs.config import FsConfig
from zfs_ram.vocabulary import (
    DEFAULT_FSNAME,
    PAGE_SIZE,
    SIZE_SYNTAX,
    SUBTYPE,
    mem_total_bytes,
    parse_size,
    round_up_pages,
)

__all__ = [
    "OPTION_TABLE",
    "MountOptions",
    "OptionError",
    "mem_total_bytes",
    "parse_bytes",
    "parse_count",
    "parse_options",
]

# Options passed to libfuse as they are. This is exactly the set libfuse 3.14 (Debian 12) accepts
# among the generic mount(8) flags, checked by mounting with each one.
FUSE_FLAGS = frozenset(
    (
        "rw ro suid nosuid dev nodev exec noexec async sync atime noatime dirsync allow_other "
        "allow_root"
    ).split()
)

# Generic mount(8) and fstab options that libfuse would refuse: the kernel's FUSE mount either
# has no use for them (relatime is the kernel default anyway) or they are meant for mount(8)
# and systemd only (auto, nofail, _netdev, x-*). tmpfs accepts them, so zfs_ram does too.
IGNORED_FLAGS = frozenset(
    (
        "defaults auto noauto user nouser users nofail _netdev relatime norelatime "
        "strictatime nostrictatime diratime nodiratime lazytime nolazytime silent loud"
    ).split()
)

# Added to every mount.
ALWAYS_FUSE_OPTIONS = frozenset({f"subtype={SUBTYPE}"})
# The kernel checks modes and owners itself, so that the filesystem does not have to (libfuse's
# advice for filesystems without their own checks). It is left out of one kind of mount only:
# root's without allow_other or allow_root, which the kernel lets only processes with root's
# uids and gids enter, and root passes every mode check but the execute bit of a regular
# file, which the kernel checks either way. Without it, the kernel no longer reads a
# directory's attributes again after every create, unlink or rename in it, before the next
# path lookup there (benchmarks/ci_job.py: 351,800 requests instead of 407,700).
KERNEL_PERMISSIONS = "default_permissions"

DEFAULT_SIZE_PERCENT = 50  # tmpfs: "The default is half of your physical RAM without swap"
POOLS = ("zsmalloc", "zbud")
COMPACT_MODES = ("auto", "off")
WRITEBACK_MODES = ("auto", "off")
# Sequential reads come as READ requests of read_ahead_kb: the kernel's 128 KiB default makes
# a 1 MiB read(2) eight requests, 1024 (FUSE's largest request, max_pages 256) makes it one.
DEFAULT_READ_AHEAD_KB = 1024
MAX_READ_AHEAD_KB = 65536
MODE_MASK = 0o7777  # tmpfs keeps permission and set-id/sticky bits of mode=, nothing else
# FUSE has no remount with new filesystem options: the daemon read them once, at mount time.
REMOUNT_REASON = (
    "remount is not supported (unmount and mount again; mem_limit can be changed while"
    " mounted: echo 1g > MOUNTPOINT/.zfs_ram/mem_limit)"
)

# nr_inodes= takes tmpfs's binary suffixes, without t and without %.
_SUFFIX_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30}
_COUNT_RE = re.compile(r"(\d+)([kmg]?)", re.IGNORECASE)


class OptionError(ValueError):
    """A mount option that cannot be used. ``str()`` is one line for the user."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"bad mount option '{option}': {reason}")
        self.option = option
        self.reason = reason


@dataclass(frozen=True)
class MountOptions:
    """Everything one ``-o`` string says, split by who needs it."""

    config: FsConfig
    # What pyfuse3.init gets: only options libfuse accepts.
    fuse_options: frozenset[str]
    # Daemon-side settings that are neither filesystem nor libfuse options.
    log_path: str | None = None
    # The kernel's read-ahead for the mount (its bdi's read_ahead_kb), set after mounting.
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB
    # Generic options that were accepted and dropped, kept for the debug log.
    ignored: tuple[str, ...] = field(default=())


def parse_bytes(option: str, value: str, mem_total: int) -> int:
    """``1g``, ``512M``, ``4096``, ``25%`` -> bytes, rounded up to whole pages.

    vocabulary.parse_size is the one syntax; it also accepts the spaces a shell's ``echo``
    leaves in a control file, which a mount option never has."""
    if any(c.isspace() for c in value):
        raise OptionError(option, SIZE_SYNTAX)
    try:
        return parse_size(value, mem_total)
    except ValueError as e:
        raise OptionError(option, str(e)) from None


def parse_count(option: str, value: str) -> int:
    """``10k`` -> 10240: tmpfs's nr_inodes= takes binary k/m/g suffixes."""
    m = _COUNT_RE.fullmatch(value)
    if not m:
        raise OptionError(option, "expected a number with optional k/m/g suffix")
    return int(m.group(1)) << _SUFFIX_SHIFT[m.group(2).lower()]


def _parse_int(option: str, value: str, *, minimum: int) -> int:
    if not value.isdigit() or int(value) < minimum:
        raise OptionError(option, f"expected an integer >= {minimum}")
    return int(value)


def _parse_algorithm(option: str, value: str) -> str:
    """A compressor's name, as zram's comp_algorithm takes it."""
    if value not in ALGORITHMS:
        raise OptionError(
            option, f"unknown compression algorithm (choose from {', '.join(ALGORITHMS)})"
        )
    return value


def _check_recompression(settings: dict[str, object]) -> None:
    """recomp_algorithm must differ from comp_algorithm; idle_recompress needs it."""
    recomp = settings.get("recomp_algorithm", "")
    if recomp and recomp == settings.get("comp_algorithm", FsConfig.comp_algorithm):
        raise OptionError(f"recomp_algorithm={recomp}", "is the comp_algorithm already")
    if settings.get("idle_recompress") and not recomp:
        raise OptionError(
            f"idle_recompress={settings['idle_recompress']}", "needs recomp_algorithm="
        )


def _check_backing(settings: dict[str, object]) -> None:
    """writeback=auto needs a backing_file to write to."""
    if settings.get("writeback") == "auto" and not settings.get("backing_file"):
        raise OptionError("writeback=auto", "needs backing_file=")


def _parse_id(option: str, value: str, lookup: Callable[[str], int], what: str) -> int:
    """A uid/gid given as a number or a name."""
    if value.isdigit():
        return int(value)
    if not value:
        raise OptionError(option, f"expected a {what} name or number")
    try:
        return lookup(value)
    except KeyError:
        raise OptionError(option, f"no such {what}") from None


def _uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid_of(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def parse_options(
    text: str,
    *,
    mem_total: int | None = None,
    uid_of: Callable[[str], int] = _uid_of,
    gid_of: Callable[[str], int] = _gid_of,
    euid: int | None = None,
) -> MountOptions:
    """Parse a comma-separated mount option string (may be empty). Raises OptionError.

    Later options override earlier ones, as with mount(8) (fstab options come before the
    command line's); that includes opposite flags such as ``rw``/``ro``.
    """
    total = mem_total_bytes() if mem_total is None else mem_total
    settings: dict[str, object] = {}
    fuse: set[str] = set()
    ignored: list[str] = []
    log_path: str | None = None
    read_ahead_kb = DEFAULT_READ_AHEAD_KB
    size_given = inodes_given = False

    for opt in (o for o in text.split(",") if o):
        key, eq, value = opt.partition("=")
        if not eq:
            if opt in _ATIME_FLAGS:
                settings["noatime"] = opt == "noatime"
                fuse.discard("atime" if opt == "noatime" else "noatime")
            if opt in ("xattr", "noxattr"):
                settings["xattrs"] = opt == "xattr"
            elif opt in FUSE_FLAGS:
                fuse.discard(_OPPOSITE.get(opt, ""))  # the later of two opposites wins
                fuse.add(opt)
            elif opt in IGNORED_FLAGS or opt.startswith("x-"):
                ignored.append(opt)
            elif key in _VALUED:
                raise OptionError(opt, "needs a value")
            elif opt == "remount":
                raise OptionError(opt, REMOUNT_REASON)
            else:
                raise OptionError(opt, "unknown option")
            continue
        if key == "size":
            settings["size_bytes"] = parse_bytes(opt, value, total)
            size_given = True
        elif key == "nr_inodes":
            settings["nr_inodes"] = parse_count(opt, value)
            inodes_given = True
        elif key == "mode":
            if not re.fullmatch(r"[0-7]{1,5}", value) or int(value, 8) > MODE_MASK:
                raise OptionError(opt, "expected octal permissions up to 7777")
            settings["mode"] = int(value, 8)
        elif key == "uid":
            settings["uid"] = _parse_id(opt, value, uid_of, "user")
        elif key == "gid":
            settings["gid"] = _parse_id(opt, value, gid_of, "group")
        elif key == "mem_limit":
            settings["mem_limit_bytes"] = parse_bytes(opt, value, total)
        elif key == "pool":
            if value not in POOLS:
                raise OptionError(opt, f"expected one of {', '.join(POOLS)}")
            settings["pool"] = value
        elif key == "compact":
            if value not in COMPACT_MODES:
                raise OptionError(opt, f"expected one of {', '.join(COMPACT_MODES)}")
            settings["compact"] = value
        elif key == "compact_min_pages":
            settings["compact_min_pages"] = _parse_int(opt, value, minimum=1)
        elif key == "compact_batch":
            settings["compact_batch"] = _parse_int(opt, value, minimum=1)
        elif key == "read_ahead_kb":
            read_ahead_kb = _parse_int(opt, value, minimum=0)
            if read_ahead_kb > MAX_READ_AHEAD_KB:
                raise OptionError(opt, f"expected KiB up to {MAX_READ_AHEAD_KB}")
        elif key == "comp_algorithm":
            settings["comp_algorithm"] = _parse_algorithm(opt, value)
        elif key == "recomp_algorithm":
            settings["recomp_algorithm"] = _parse_algorithm(opt, value)
        elif key == "idle_recompress":
            settings["idle_recompress"] = _parse_int(opt, value, minimum=0)
        elif key == "backing_file":
            if not value:
                raise OptionError(opt, "expected a file path")
            # Absolute: the daemon leaves the caller's directory before it first writes back.
            settings["backing_file"] = os.path.abspath(value)
        elif key == "writeback":
            if value not in WRITEBACK_MODES:
                raise OptionError(opt, f"expected one of {', '.join(WRITEBACK_MODES)}")
            settings["writeback"] = value
        elif key == "fsname":
            if not value:
                raise OptionError(opt, "expected a non-empty name")
            settings["fsname"] = value
        elif key == "subtype":
            # mount.fuse3 never adds it, but a user copying libfuse docs might: only ours fits.
            if value != SUBTYPE:
                raise OptionError(opt, f"the subtype is always {SUBTYPE}")
        elif key == "log":
            if not value:
                raise OptionError(opt, "expected a file path")
            log_path = value
        elif key == "comment" or key.startswith("x-"):
            ignored.append(opt)  # fstab annotations for mount(8)/systemd
        else:
            raise OptionError(opt, "unknown option")

    _check_recompression(settings)
    _check_backing(settings)
    if {"allow_other", "allow_root"} <= fuse:
        raise OptionError("allow_root", "cannot be combined with allow_other")
    if not size_given:
        settings["size_bytes"] = round_up_pages(total * DEFAULT_SIZE_PERCENT // 100)
    if not inodes_given:
        # tmpfs: "half the number of physical RAM pages"
        settings["nr_inodes"] = total // PAGE_SIZE // 2

    config = FsConfig(**settings)  # type: ignore[arg-type]
    fuse |= ALWAYS_FUSE_OPTIONS
    mounter = os.geteuid() if euid is None else euid
    if mounter != 0 or fuse & {"allow_other", "allow_root"}:
        fuse.add(KERNEL_PERMISSIONS)
    fuse.add(f"fsname={config.fsname}")
    return MountOptions(
        config=config,
        fuse_options=frozenset(fuse),
        log_path=log_path,
        read_ahead_kb=read_ahead_kb,
        ignored=tuple(ignored),
    )


# Flag pairs of which only the later may reach libfuse: it gets an unordered set.
_PAIRS = (
    ("rw", "ro"),
    ("suid", "nosuid"),
    ("dev", "nodev"),
    ("exec", "noexec"),
    ("async", "sync"),
    ("atime", "noatime"),
)
_OPPOSITE = {a: b for a, b in _PAIRS} | {b: a for a, b in _PAIRS}
# The atime policy the filesystem applies itself (FsConfig.noatime); the last one given wins.
_ATIME_FLAGS = frozenset({"atime", "noatime", "relatime", "norelatime", "strictatime"})

# Keys that only make sense with "=value": a bare "size" is a missing value, not an unknown option.
_VALUED = frozenset(
    (
        "size nr_inodes mode uid gid mem_limit pool compact compact_min_pages compact_batch "
        "read_ahead_kb fsname subtype log comp_algorithm recomp_algorithm idle_recompress "
        "backing_file writeback"
    ).split()
)


# Every option `zfs-ram mount --help` lists: (spelling, default, meaning). The defaults come from
# the constants and FsConfig above, so the help cannot drift from what parse_options does;
# tests/cli/test_options.py checks that every option the parser knows is listed here.
_DEFAULTS = FsConfig()
OPTION_TABLE: tuple[tuple[str, str, str], ...] = (
    ("size=BYTES|N%", f"{DEFAULT_SIZE_PERCENT}% of RAM", "cap on the data stored; 0: none"),
    ("nr_inodes=N", "RAM pages / 2", "cap on files and directories; 0: none"),
    ("mode=OCTAL", f"{_DEFAULTS.mode:o}", "permissions of the root directory"),
    ("uid=USER", "the caller", "owner of the root directory"),
    ("gid=GROUP", "the caller's", "group of the root directory"),
    ("mem_limit=BYTES|N%", "0 (none)", "cap on the pool's RAM (zram's mem_limit)"),
    ("pool=" + "|".join(POOLS), _DEFAULTS.pool, "allocator of the compressed pages"),
    ("compact=" + "|".join(COMPACT_MODES), _DEFAULTS.compact, "background compaction"),
    ("compact_min_pages=N", str(_DEFAULTS.compact_min_pages), "reclaimable pages that wake it"),
    ("compact_batch=N", str(_DEFAULTS.compact_batch), "objects moved per compaction step"),
    ("read_ahead_kb=N", str(DEFAULT_READ_AHEAD_KB), "kernel read-ahead (as root); 0: kernel's"),
    ("comp_algorithm=" + "|".join(ALGORITHMS), _DEFAULTS.comp_algorithm, "compressor (zram's)"),
    ("recomp_algorithm=" + "|".join(ALGORITHMS), "none", "recompresses idle/huge pages"),
    ("idle_recompress=SECONDS", "0 (off)", "recompress pages idle this long on its own"),
    ("backing_file=PATH", "none", "file that writeback moves pages to (zram's backing_dev)"),
    ("writeback=" + "|".join(WRITEBACK_MODES), _DEFAULTS.writeback, "write back at mem_limit/PSI"),
    ("fsname=NAME", DEFAULT_FSNAME, "first field of /proc/mounts and df"),
    ("log=PATH", "none", "the daemon's log file"),
    ("xattr|noxattr", "noxattr", "extended attributes (cost: a request per write(2))"),
    ("[no]atime|[no]relatime|strictatime", "relatime", "when reads update atime"),
    ("allow_other|allow_root", "neither", "let other users (or root) in"),
    ("suid|nosuid", "nosuid", "honour set-user-id bits"),
    ("dev|nodev", "nodev", "honour device files"),
    ("exec|noexec", "exec", "allow running programs"),
    ("rw|ro", "rw", "read-write or read-only"),
    ("async|sync|dirsync", "async", "synchronous writes (passed to the kernel)"),
)


def options_help() -> str:
    """The option table as text, for ``zfs-ram mount --help``."""
    rows = [("OPTION", "DEFAULT", "MEANING"), *OPTION_TABLE]
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    lines = ["mount options (-o, comma-separated; of two opposites the later wins):"]
    lines += [f"  {a:<{w1}}  {b:<{w2}}  {c}" for a, b, c in rows]
    lines.append("  mount(8)'s generic options (defaults, noauto, nofail, x-*, ...) are ignored")
    return "\n".join(lines)
