"""``python -m zfs_ram.experiments [OPTIONS]``: same as ``zfs-ram experiment``."""

import sys

from zfs_ram.experiments.cli import main

sys.exit(main())
