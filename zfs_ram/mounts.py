"""The kernel's mount table, and finding a path in it without asking a FUSE daemon.

A request to a stopped or deadlocked FUSE daemon blocks in the kernel, and only a fatal signal
ends the wait: a ``stat()``, ``realpath()`` or ``os.path.ismount()`` of a path at or below a
zfs_ram mount can hang the caller for good. Everything here therefore works from
/proc/self/mountinfo, and:

* ``locate`` first normalises a path lexically and matches it and its ancestors against the
  table. Only when the path is in no zfs_ram mount are symlinks resolved, by a walk that stats
  one component at a time and never one at or below a zfs_ram mount point.
* ``abort_connection`` ends a FUSE connection through the fusectl filesystem
  (/sys/fs/fuse/connections/MINOR/abort, MINOR being the mount's st_dev minor): every waiting
  request fails at once, the mount becomes dead and can be unmounted, and the daemon, when it
  runs again, finds its /dev/fuse gone and exits.

Pure standard library: no trio, no pyfuse3.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass

from zfs_ram.vocabulary import FSTYPE

__all__ = [
    "Location",
    "MountInfo",
    "abort_connection",
    "find_mount",
    "is_alive",
    "is_stopped",
    "locate",
    "read_mounts",
]

MOUNTINFO = "/proc/self/mountinfo"
FUSECTL_DIR = "/sys/fs/fuse/connections"
FUSECTL_TYPE = "fusectl"
# mount(8) of fusectl is instantaneous; the bound only guards against a wedged mount(8).
FUSECTL_MOUNT_TIMEOUT = 5.0
# The kernel's limit on symlinks followed in one path walk (MAXSYMLINKS).
MAX_SYMLINKS = 40
#: fusermount3 does not talk to the daemon and returns at once when healthy; the bound guards
#: against a wedged system (it hangs only on a mount nobody answers).
FUSERMOUNT_TIMEOUT = 5.0
#: How often wait_for_exit looks at the process.
EXIT_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo, the fields zfs_ram looks at."""

    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    # The st_dev of the mount's files; for FUSE the minor names the fusectl connection.
    major: int = 0
    minor: int = 0
    # Per-mount flags as the kernel shows them: rw, nosuid, nodev, relatime, ...
    mount_options: frozenset[str] = frozenset()

    @property
    def is_zfs_ram(self) -> bool:
        return self.fstype == FSTYPE


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mounts(path: str = MOUNTINFO) -> list[MountInfo]:
    """All mounts, in the kernel's order (a later line is mounted on top of an earlier one)."""
    mounts = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            major, _, minor = fields[2].partition(":")
            mounts.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    mountpoint=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    major=int(major),
                    minor=int(minor),
                    mount_options=frozenset(fields[5].split(",")),
                )
            )
    return mounts


def find_mount(mountpoint: str, mounts: list[MountInfo] | None = None) -> MountInfo | None:
    """The topmost mount on ``mountpoint`` (an absolute path, compared as text), or None."""
    found = None
    for m in read_mounts() if mounts is None else mounts:
        if m.mountpoint == mountpoint:
            found = m
    return found


def _containing(path: str, mounts: list[MountInfo]) -> MountInfo | None:
    """The deepest mount whose mount point is ``path`` or one of its ancestors (lexically)."""
    candidate = path
    while True:
        found = find_mount(candidate, mounts)
        if found is not None:
            return found
        if candidate == "/":
            return None
        candidate = os.path.dirname(candidate)


def _in_zfs_ram(path: str, zfs_ram_points: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in zfs_ram_points)


def _resolve_outside_zfs_ram(path: str, mounts: list[MountInfo]) -> str:
    """realpath(), but components at or below a zfs_ram mount point are taken as written.

    A missing component ends the resolution (the rest is appended as is), as realpath does.
    """
    points = [m.mountpoint for m in mounts if m.is_zfs_ram]
    pending = [part for part in path.split("/") if part][::-1]  # a stack, next part last
    resolved = "/"
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        if _in_zfs_ram(candidate, points):
            resolved = candidate  # never ask a zfs_ram daemon: the rest is lexical
            continue
        try:
            st = os.lstat(candidate)
        except OSError:
            return os.path.join(candidate, *reversed(pending))
        if not stat.S_ISLNK(st.st_mode):
            resolved = candidate
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = "/"
        pending.extend(p for p in target.split("/")[::-1] if p)
    return resolved


@dataclass(frozen=True)
class Location:
    """Where a path is: its absolute form and the mount it is (or is in)."""

    path: str  # absolute; symlinks resolved outside zfs_ram mounts
    mount: MountInfo | None  # the deepest mount at ``path`` or an ancestor

    @property
    def is_mountpoint(self) -> bool:
        return self.mount is not None and self.mount.mountpoint == self.path

    @property
    def zfs_ram(self) -> MountInfo | None:
        """The zfs_ram mount ``path`` is or is inside (the deepest one), else None."""
        return self.mount if self.mount is not None and self.mount.is_zfs_ram else None


def locate(path: str, mounts: list[MountInfo] | None = None) -> Location:
    """Find ``path`` in the mount table without stat()ing inside any zfs_ram mount.

    The path is first normalised lexically; if it or an ancestor is a zfs_ram mount point, or
    it is exactly a mount point of any kind, that is the answer. Otherwise symlinks are resolved
    (outside zfs_ram mounts only) and the table is consulted again.
    """
    table = read_mounts() if mounts is None else mounts
    lexical = os.path.abspath(path)
    mount = _containing(lexical, table)
    if mount is not None and (mount.is_zfs_ram or mount.mountpoint == lexical):
        return Location(lexical, mount)
    resolved = _resolve_outside_zfs_ram(lexical, table)
    return Location(resolved, _containing(resolved, table))


# ---- FUSE connections


def _fusectl_mounted(mounts: list[MountInfo]) -> bool:
    return any(m.fstype == FUSECTL_TYPE and m.mountpoint == FUSECTL_DIR for m in mounts)


def abort_connection(info: MountInfo) -> str | None:
    """Abort the FUSE connection of ``info``; None on success, else why it could not be done.

    Mounts fusectl on /sys/fs/fuse/connections first if it is not mounted and we are root.
    """
    if not _fusectl_mounted(read_mounts()):
        if os.geteuid() != 0:
            return f"{FUSECTL_DIR} is not mounted (root can mount it)"
        try:
            done = subprocess.run(
                ["mount", "-t", FUSECTL_TYPE, FUSECTL_TYPE, FUSECTL_DIR],
                capture_output=True,
                text=True,
                timeout=FUSECTL_MOUNT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"cannot mount {FUSECTL_DIR}: {e}"
        if done.returncode != 0:
            return f"cannot mount {FUSECTL_DIR}: {done.stderr.strip() or 'failed'}"
    abort = os.path.join(FUSECTL_DIR, str(info.minor), "abort")
    try:
        with open(abort, "w", encoding="ascii") as f:
            f.write("1")
    except OSError as e:
        return f"cannot write {abort}: {e.strerror}"
    return None


# ---- processes


def _run_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, T, t, Z, ...), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            proc_stat = f.read()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            return None
        raise
    return proc_stat.rpartition(")")[2].split()[0]  # the name in (...) may contain spaces


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie (exited, not yet reaped) counts as gone."""
    state = _run_state(pid)
    return state is not None and state not in ("Z", "X")


def is_stopped(pid: int) -> bool:
    """True if ``pid`` is stopped by a signal (SIGSTOP, SIGTSTP) or a tracer."""
    return _run_state(pid) in ("T", "t")


def fusermount(
    path: str, *, lazy: bool = False, timeout: float = FUSERMOUNT_TIMEOUT, busy_for: float = 0.0
) -> str | None:
    """``fusermount3 -u [-z] path``, bounded: None once it succeeded, else one line saying why
    not (its last error line, a timeout, or that fusermount3 is missing).

    ``busy_for``: retry a "busy" refusal for that many seconds. After a connection was aborted
    the kernel drops what the failed requests held (a RELEASE in flight keeps its file open)
    moments later, not at once."""
    tool = shutil.which("fusermount3")
    if tool is None:
        return "fusermount3 not found (install the fuse3 package)"
    cmd = [tool, "-u"] + (["-z"] if lazy else []) + [path]
    deadline = time.monotonic() + busy_for
    while True:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"fusermount3 did not return within {timeout:.0f} s"
        if done.returncode == 0:
            return None
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        if "busy" not in reason.lower() or time.monotonic() >= deadline:
            return reason
        time.sleep(EXIT_POLL_SECONDS)


def wait_for_exit(pid: int, timeout: float) -> str:
    """Wait up to ``timeout`` seconds for ``pid`` to end: "gone", "stopped" (it cannot end
    before it is continued, so waiting is no use) or "running" (the time ran out)."""
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if is_stopped(pid):
            return "stopped"
        if time.monotonic() >= deadline:
            return "running"
        time.sleep(EXIT_POLL_SECONDS)
    return "gone"
