"""fsx's command line: one seeded run, or N churn processes, on a mount given or made for it.

A mount made for the run (``--new-mount OPTIONS``) is owned by the run, so the run also checks
mm_stat's accounting against the model, and removed after it::

    python -m zfs_ram.testing.fsx --new-mount pool=zbud,compact_min_pages=1,compact_batch=4 \\
        --ops 200000 --seed 1

or ``--mount DIR`` for a mount that already exists (the run works in DIR/fsx-SEED). The soak
used by the integrity tests is the same with a larger ``--ops``; ``--churn N`` instead starts N
processes that publish, read, rename and delete checksummed files in one shared directory
(see ``zfs_ram.testing.fsx.churn``). On a failure the whole operation log goes to ``--log``.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from zfs_ram.testing.fsx.churn import verify_churn_tree
from zfs_ram.testing.fsx.driver import Fsx, FsxConfig, FsxFailure

__all__ = ["build_parser", "main", "new_mount"]

# How long --new-mount waits for the daemon; mounting takes well under a second.
MOUNT_TIMEOUT = 30.0


@contextlib.contextmanager
def new_mount(options: str) -> Iterator[Path]:
    """A fresh zfs_ram on a temporary directory, unmounted afterwards (through the CLI)."""
    with tempfile.TemporaryDirectory(prefix="zfs_ram-fsx-") as tmp:
        where = Path(tmp) / "mnt"
        where.mkdir()
        cmd = [sys.executable, "-m", "zfs_ram", "mount", str(where)]
        if options:
            cmd += ["-o", options]
        subprocess.run(cmd, check=True, timeout=MOUNT_TIMEOUT)
        try:
            yield where
        finally:
            done = subprocess.run(
                [sys.executable, "-m", "zfs_ram", "umount", str(where)],
                check=False,
                timeout=MOUNT_TIMEOUT,
            )
            if done.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(where)], check=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zfs_ram.testing.fsx",
        description="Seeded random file operations on a zfs_ram mount, checked against a model.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mount", type=Path, help="an existing mount; works in DIR/fsx-SEED")
    where.add_argument(
        "--new-mount",
        metavar="OPTIONS",
        help="mount zfs_ram with these -o options for the run, then unmount",
    )
    p.add_argument("--ops", type=int, default=10000, help="operations per run (default 10000)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    p.add_argument("--files", type=int, default=4, help="paths per directory (3 directories)")
    p.add_argument("--max-len", type=int, default=256 << 10, help="writes and truncates below")
    p.add_argument("--compact-every", type=int, default=25, help="0: no forced compaction")
    p.add_argument("--no-mmap", action="store_true")
    p.add_argument("--keep", action="store_true", help="leave the files (no final clean-up)")
    p.add_argument(
        "--churn",
        type=int,
        metavar="N",
        default=0,
        help="instead: N processes churning a shared directory, --ops each",
    )
    p.add_argument("--log", type=Path, help="where to write the operation log on failure")
    return p


def _run(args: argparse.Namespace, mount_dir: Path, owns_mount: bool) -> int:
    seed = args.seed
    if args.churn:
        return _run_churn_cli(mount_dir / f"churn-{seed}", args.churn, seed, args.ops)
    cfg = FsxConfig(
        root=mount_dir / f"fsx-{seed}",
        seed=seed,
        ops=args.ops,
        files_per_dir=args.files,
        max_len=args.max_len,
        compact_every=args.compact_every,
        use_mmap=not args.no_mmap,
        cleanup=not args.keep,
        check_accounting=owns_mount,
    )
    fsx = Fsx(cfg)
    try:
        result = fsx.run()
    except FsxFailure as failure:
        log_path = args.log or Path(tempfile.gettempdir()) / f"zfs_ram-fsx-{seed}.log"
        log_path.write_text("\n".join(fsx.log) + "\n")
        print(failure, file=sys.stderr)
        print(f"full operation log: {log_path}", file=sys.stderr)
        return 1
    print(
        f"fsx seed={seed}: {result.ops} operations, {result.compactions} forced compactions,"
        f" {result.pages_compacted} pages compacted, {result.bytes_written} bytes written,"
        f" {result.bytes_verified} verified, {result.seconds:.1f} s"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in result.op_counts.items()))
    return 0


def _run_churn_cli(root: Path, workers: int, seed: int, ops: int) -> int:
    cmd = [
        sys.executable,
        "-c",
        "import sys; from pathlib import Path; from zfs_ram.testing.fsx.churn import run_churn;"
        "print(run_churn(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),"
        " int(sys.argv[4])))",
    ]
    procs = [
        subprocess.Popen([*cmd, str(root), str(w), str(seed), str(ops)]) for w in range(workers)
    ]
    status = max(p.wait() for p in procs)
    count = verify_churn_tree(root)
    print(f"churn seed={seed}: {workers} workers x {ops} operations, {count} files verified")
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time()) % 100000
    if args.mount is not None:
        return _run(args, args.mount, owns_mount=False)
    with new_mount(args.new_mount) as where:
        return _run(args, where, owns_mount=True)
