"""Helpers for testing with real zfs_ram mounts; the pytest fixtures live in ``plugin``.

Installed packages register ``zfs_ram.testing.plugin`` as a pytest plugin (entry point
``pytest11``), so ``zfs_ram_mount`` and ``zfs_ram_scratch`` are available in any test suite.
"""

from zfs_ram.testing.plugin import (
    Mount,
    MountFactory,
    force_unmount,
    fuse_unavailable_reason,
    start_mount,
)
from zfs_ram.vocabulary import MM_STAT_FIELDS

__all__ = [
    "MM_STAT_FIELDS",
    "Mount",
    "MountFactory",
    "force_unmount",
    "fuse_unavailable_reason",
    "start_mount",
]
