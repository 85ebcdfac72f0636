"""Requests per FUSE opcode, and the time spent answering them: cheap enough to stay on.

A FUSE request costs 30-45 µs of pyfuse3 and trio round trip here before a handler runs; the
counting costs two clock reads and two dict updates, about half a microsecond.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# The FUSE opcode each pyfuse3 handler answers, named as the kernel's fuse_opcode (without the
# FUSE_ prefix), as `-d` logs them. pyfuse3 lists directories with READDIRPLUS.
OPCODES = {
    "lookup": "LOOKUP",
    "forget": "FORGET",
    "getattr": "GETATTR",
    "setattr": "SETATTR",
    "readlink": "READLINK",
    "mknod": "MKNOD",
    "mkdir": "MKDIR",
    "symlink": "SYMLINK",
    "link": "LINK",
    "unlink": "UNLINK",
    "rmdir": "RMDIR",
    "rename": "RENAME",
    "create": "CREATE",
    "open": "OPEN",
    "read": "READ",
    "write": "WRITE",
    "release": "RELEASE",
    "opendir": "OPENDIR",
    "readdir": "READDIRPLUS",
    "releasedir": "RELEASEDIR",
    "statfs": "STATFS",
    "setxattr": "SETXATTR",
    "getxattr": "GETXATTR",
    "listxattr": "LISTXATTR",
    "removexattr": "REMOVEXATTR",
    "access": "ACCESS",
}


@dataclass(frozen=True, slots=True)
class OpcodeStats:
    count: int
    seconds: float


class RequestMeter:
    """Counts requests by opcode; `total` (all but FORGET) tells the compactor whether anyone
    came by."""

    __slots__ = ("_counts", "_nanoseconds", "total")

    def __init__(self) -> None:
        self.total = 0
        self._counts: dict[str, int] = {}
        self._nanoseconds: dict[str, int] = {}

    @staticmethod
    def clock() -> int:
        return time.perf_counter_ns()

    def record(self, opcode: str, started_ns: int) -> None:
        """One request of `opcode` answered."""
        self.total += 1
        self.forgotten(opcode, started_ns)

    def forgotten(self, opcode: str, started_ns: int) -> None:
        """Count a request by opcode only, not in `total`: FORGET, which the kernel sends on
        its own schedule (its cache shrinking), is no sign of a user waiting, and must neither
        keep the compactor resting nor show in the request total."""
        self._counts[opcode] = self._counts.get(opcode, 0) + 1
        self._nanoseconds[opcode] = (
            self._nanoseconds.get(opcode, 0) + time.perf_counter_ns() - started_ns
        )

    def statistics(self) -> dict[str, OpcodeStats]:
        """Per opcode seen so far, by opcode name."""
        return {
            opcode: OpcodeStats(count, self._nanoseconds[opcode] / 1e9)
            for opcode, count in sorted(self._counts.items())
        }
