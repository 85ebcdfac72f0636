"""fsx for zfs_ram: seeded random file operations checked against an in-memory model.

Three parts, imported one way (cli -> churn -> driver):

- ``driver``: the model of what every file must hold (FileModel), the bytes it writes
  (make_data), and the seeded run that drives a mount and compares (Fsx, FsxConfig, FsxResult,
  FsxFailure);
- ``churn``: several processes sharing one directory of self-checking files (run_churn,
  verify_churn_tree);
- ``cli``: ``python -m zfs_ram.testing.fsx``, on a mount given (``--mount DIR``) or made for the
  run (``--new-mount OPTIONS``), e.g.::

    python -m zfs_ram.testing.fsx --new-mount pool=zbud,compact_min_pages=1,compact_batch=4 \\
        --ops 200000 --seed 1
"""

from zfs_ram.testing.fsx.churn import (
    ChurnResult,
    check_churn_content,
    churn_content,
    run_churn,
    verify_churn_tree,
)
from zfs_ram.testing.fsx.cli import build_parser, main, new_mount
from zfs_ram.testing.fsx.driver import FileModel, Fsx, FsxConfig, FsxFailure, FsxResult, make_data

__all__ = [
    "ChurnResult",
    "FileModel",
    "Fsx",
    "FsxConfig",
    "FsxFailure",
    "FsxResult",
    "build_parser",
    "check_churn_content",
    "churn_content",
    "main",
    "make_data",
    "new_mount",
    "run_churn",
    "verify_churn_tree",
]
