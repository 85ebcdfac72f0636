"""``python -m zfs_ram.testing.fsx [OPTIONS]``: see zfs_ram.testing.fsx.cli."""

from zfs_ram.testing.fsx.cli import main

raise SystemExit(main())
