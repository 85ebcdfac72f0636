"""Driving ZfsRamOperations directly, without a mount (as s3ql's t3_fs_api tests do).

pyfuse3's RequestContext and SetattrFields have read-only attributes, so tests pass these
duck-typed stand-ins; the handlers only read the fields named here.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import trio

from zfs_ram.daemon.stack import build
from zfs_ram.fs.config import FsConfig
from zfs_ram.fs.operations import ZfsRamOperations


@dataclass
class Ctx:
    """A request context: who asks."""

    uid: int = 1000
    gid: int = 1000
    pid: int = 1
    umask: int = 0o022


@dataclass
class Fields:
    """Which attributes a setattr changes."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def run_ops(
    fn: Callable[[ZfsRamOperations], Coroutine[Any, Any, None]], config: FsConfig | None = None
) -> None:
    """Run fn against a fresh filesystem, wired as the daemon wires it, in trio; check the
    pool after it, then shut down."""
    filesystem = build(config or FsConfig())

    async def main() -> None:
        try:
            await fn(filesystem.operations)
            filesystem.pool.check()
        finally:
            filesystem.shutdown()

    trio.run(main)
