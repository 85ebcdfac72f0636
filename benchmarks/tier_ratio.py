"""Bytes, not times: one real tree stored on zfs_ram with each compressor (and tier), compared.

For each arm a fresh mount gets a copy of the same tree (default: a few hundred MiB of /usr);
then mm_stat is read, the arm's commands run (for example marking every page idle and
recompressing it with the secondary algorithm), mm_stat is read again, the kernel's caches are
dropped (echo 3 > /proc/sys/vm/drop_caches, so every read reaches the daemon) and the copy is
compared byte for byte with the tree. Prints one row per arm: compr_data_size and
mem_used_total, and their ratio to the first arm (lz4) in the same run.

    sudo .venv/bin/python benchmarks/tier_ratio.py [--tree DIR ...] [--arms lz4,zstd,...]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from zfs_ram.vocabulary import CONTROL_DIR, parse_mm_stat

TREES = ["/usr/lib/python3.11", "/usr/share/doc", "/usr/include", "/usr/lib/gcc"]
# arm -> (mount options, control-file commands after the copy, in order)
ARMS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "lz4": ("comp_algorithm=lz4", []),
    "lz4hc": ("comp_algorithm=lz4hc", []),
    "zstd": ("comp_algorithm=zstd", []),
    "lz4+idle->zstd": (
        "comp_algorithm=lz4,recomp_algorithm=zstd",
        [("idle", "all"), ("recompress", "type=idle")],
    ),
    "lz4+huge->zstd": ("comp_algorithm=lz4,recomp_algorithm=zstd", [("recompress", "type=huge")]),
    "lz4+idle->lz4hc": (
        "comp_algorithm=lz4,recomp_algorithm=lz4hc",
        [("idle", "all"), ("recompress", "type=idle")],
    ),
}


def zfs_ram(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "zfs-ram"), *args], check=True)


def mm_stat(mountpoint: Path) -> dict[str, int]:
    return parse_mm_stat((mountpoint / CONTROL_DIR / "mm_stat").read_text())


def trees_equal(left: Path, right: Path) -> bool:
    """Every file and directory of left is in right with the same bytes, and nothing more."""
    compare = filecmp.dircmp(left, right)
    if compare.left_only or compare.right_only or compare.funny_files:
        return False
    _match, mismatch, errors = filecmp.cmpfiles(left, right, compare.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(trees_equal(left / d, right / d) for d in compare.common_dirs)


def run_arm(name: str, trees: list[Path], work: Path) -> dict[str, object]:
    options, commands = ARMS[name]
    mountpoint = work / name.replace(">", "")
    mountpoint.mkdir()
    zfs_ram("mount", str(mountpoint), "-o", f"size=0,{options}")
    try:
        for tree in trees:
            shutil.copytree(tree, mountpoint / tree.name, symlinks=True)
        filled = mm_stat(mountpoint)
        for file, text in commands:
            (mountpoint / CONTROL_DIR / file).write_text(text + "\n")
        after = mm_stat(mountpoint)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        intact = all(trees_equal(tree, mountpoint / tree.name) for tree in trees)
        stats = json.loads((mountpoint / CONTROL_DIR / "stats.json").read_text())
    finally:
        zfs_ram("umount", str(mountpoint))
    return {
        "arm": name,
        "orig_data_size": after["orig_data_size"],
        "compr_filled": filled["compr_data_size"],
        "compr_data_size": after["compr_data_size"],
        "mem_used_total": after["mem_used_total"],
        "algorithms": stats.get("algorithms"),
        "intact": intact,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", help="a directory to copy (repeatable)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, first is 1.0x")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    trees = [Path(t) for t in (args.tree or TREES) if os.path.isdir(t)]
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r} (choose from {', '.join(ARMS)})")
    with tempfile.TemporaryDirectory(prefix="tier_ratio.") as work:
        rows = [run_arm(arm, trees, Path(work)) for arm in arms]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    base = rows[0]
    print(f"tree: {', '.join(map(str, trees))}; {base['orig_data_size'] / 2**20:.1f} MiB stored")
    print(f"{'arm':<16} {'compr MiB':>10} {'x first':>8} {'mem MiB':>9} {'x first':>8} intact")
    for row in rows:
        compr, mem = int(row["compr_data_size"]), int(row["mem_used_total"])  # type: ignore[call-overload]
        print(
            f"{row['arm']:<16} {compr / 2**20:10.1f} {compr / int(base['compr_data_size']):8.3f}"  # type: ignore[call-overload]
            f" {mem / 2**20:9.1f} {mem / int(base['mem_used_total']):8.3f} {row['intact']}"  # type: ignore[call-overload]
        )
    return 0 if all(row["intact"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
