"""The one client of a mount's control directory, MOUNTPOINT/.zfs_ram.

The CLI, the pytest plugin, fsx, the experiment and the benchmarks all read statistics and send
commands through this class, so the file names, the parsing of mm_stat and the bounded waits
exist once. Pure standard library: no trio, no pyfuse3.

Every call is bounded: a request to a stopped or deadlocked daemon blocks in the kernel, so each
read and write runs in a daemon thread and gives up after ``timeout`` seconds (NoAnswer). A
thread left blocked there does not keep the process from exiting, but it does keep a file of
the mount open until the daemon answers or the connection is aborted.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from zfs_ram.vocabulary import CONTROL_DIR, ControlFile, parse_mm_stat

__all__ = ["ControlClient", "ControlError", "DaemonGone", "NoAnswer"]

# A healthy daemon renders any control file in well under a millisecond; a second of silence
# already means it is stopped or wedged, three leave room for a loaded machine.
DEFAULT_TIMEOUT = 3.0
# `echo 1 > compact` returns when the pass is done: 50 MiB moves in a fraction of a second, a
# full pool of many GiB in seconds.
COMPACT_TIMEOUT = 120.0

_T = TypeVar("_T")


class ControlError(Exception):
    """A control file could not be read or written. ``str()`` is one line for the user."""


class NoAnswer(ControlError):
    """The daemon did not answer within the timeout: it is stopped or hung."""


class DaemonGone(ControlError):
    """The mount's daemon is dead ("Transport endpoint is not connected")."""


def bounded(action: Callable[[], _T], timeout: float, what: str) -> _T:
    """Run ``action`` in a daemon thread; its result, its exception, or NoAnswer(what)."""
    result: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            result.append((True, action()))
        except BaseException as e:  # handed to the caller's thread
            result.append((False, e))

    worker = threading.Thread(target=run, name=f"zfs_ram control: {what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise NoAnswer(what)
    ok, value = result[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class ControlClient:
    """Reads and writes the control files of the zfs_ram mount at ``mountpoint``."""

    def __init__(self, mountpoint: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT):
        self.mountpoint = Path(mountpoint)
        self.directory = self.mountpoint / CONTROL_DIR
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ControlClient({str(self.mountpoint)!r})"

    # -- raw access ----------------------------------------------------------------------------

    def read(self, name: str, timeout: float | None = None) -> str:
        """The text of one control file, freshly rendered by the daemon."""
        path = self.directory / name
        return self._call(path.read_text, name, "read", timeout)

    def write(self, name: str, text: str, timeout: float | None = None) -> None:
        """Send one command; returns when the daemon has carried it out."""
        path = self.directory / name

        def write() -> None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)

        self._call(write, name, "write", timeout)

    def _call(self, action: Callable[[], _T], name: str, verb: str, timeout: float | None) -> _T:
        where = f"{CONTROL_DIR}/{name} of {self.mountpoint}"
        try:
            return bounded(action, self.timeout if timeout is None else timeout, where)
        except NoAnswer:
            raise NoAnswer(
                f"the zfs_ram daemon of {self.mountpoint} does not answer (stopped or hung)"
            ) from None
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise DaemonGone(
                    f"the zfs_ram daemon of {self.mountpoint} is gone (use 'zfs-ram umount')"
                ) from None
            raise ControlError(f"cannot {verb} {where}: {e.strerror}") from None

    # -- what the files mean -------------------------------------------------------------------

    def mm_stat(self) -> dict[str, int]:
        """zram's mm_stat columns by name."""
        try:
            return parse_mm_stat(self.read(ControlFile.MM_STAT))
        except ValueError:
            raise ControlError(f"{CONTROL_DIR}/mm_stat of {self.mountpoint} is malformed") from None

    def stats(self) -> dict[str, Any]:
        """The whole stats.json object."""
        text = self.read(ControlFile.STATS_JSON)
        try:
            stats = json.loads(text)
        except json.JSONDecodeError as e:
            raise ControlError(
                f"{CONTROL_DIR}/stats.json of {self.mountpoint} is not JSON: {e}"
            ) from None
        if not isinstance(stats, dict):
            raise ControlError(f"{CONTROL_DIR}/stats.json of {self.mountpoint} is not an object")
        return stats

    def pid(self) -> int:
        """The daemon's process id."""
        text = self.read(ControlFile.PID).strip()
        if not text.isdigit():
            raise ControlError(f"{CONTROL_DIR}/pid of {self.mountpoint} is malformed")
        return int(text)

    def compact(self, timeout: float = COMPACT_TIMEOUT) -> int:
        """Compact now; returns the pages this pass freed."""
        before = self.mm_stat()["pages_compacted"]
        self.write(ControlFile.COMPACT, "1\n", timeout=timeout)
        return max(0, self.mm_stat()["pages_compacted"] - before)

    def mem_limit(self) -> int:
        """The pool's physical limit in bytes (0: none)."""
        return int(self.read(ControlFile.MEM_LIMIT).strip())

    def set_mem_limit(self, size: str) -> None:
        """Change the limit at run time: bytes, k/m/g/t suffixes or N% of RAM; 0 = none."""
        self.write(ControlFile.MEM_LIMIT, f"{size}\n")

    def reset_mem_used_max(self) -> None:
        """Reset the high-water mark to the memory used now."""
        self.write(ControlFile.MEM_USED_MAX, "0\n")
