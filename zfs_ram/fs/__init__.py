"""The filesystem: inodes and namespace over the page store, and the pyfuse3 Operations."""

from zfs_ram.fs.config import FsConfig

__all__ = ["FsConfig"]
