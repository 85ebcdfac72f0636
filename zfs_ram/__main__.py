"""``python -m zfs_ram``: the same as the zfs-ram command."""

from zfs_ram.cli import main

raise SystemExit(main())
