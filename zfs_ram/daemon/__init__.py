"""The daemon: mount options, the mount lifecycle (mount, go to the background once ready,
signals, unmount). The lifecycle imports pyfuse3 and trio only when it mounts, so the option
parser is usable (and testable) without them."""

from zfs_ram.daemon.options import MountOptions, OptionError, parse_options

__all__ = ["MountOptions", "OptionError", "parse_options"]
