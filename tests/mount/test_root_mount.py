"""A mount made by root without allow_other: the kernel leaves mode checks to zfs_ram.

Only root's processes can enter such a mount, and root passes every mode check but the
execute bit, so zfs_ram mounts it without default_permissions (daemon/options.py): the kernel
then stops reading a directory's attributes again after each change in it. These tests hold it
to what root sees on tmpfs, side by side, and show the requests it saves.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import counter_since

pytestmark = [
    pytest.mark.mount,
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="a mount made by root"),
]

OTHER_UID = 4242  # owns some files, so that root acts on files that are not its own


def super_options(path: Path) -> set[str]:
    """The options the kernel holds for the filesystem mounted at `path` (mountinfo's last
    field), e.g. user_id=0, default_permissions."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return set(fields[-1].split(","))
    raise AssertionError(f"{path} is not mounted")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def lay_out(root: Path) -> None:
    """Files and directories whose modes would stop anyone but root."""
    (root / "ro").write_bytes(b"read-only\n")
    (root / "ro").chmod(0o444)
    (root / "none").write_bytes(b"no bits\n")
    (root / "none").chmod(0)
    (root / "script").write_text("#!/bin/sh\necho ran\n")
    (root / "script").chmod(0o644)
    (root / "others_exec").write_text("#!/bin/sh\necho ran\n")
    (root / "others_exec").chmod(0o701)
    os.chown(root / "others_exec", OTHER_UID, OTHER_UID)
    for name, mode in (("locked", 0), ("readonly_dir", 0o555), ("sticky", 0o1777)):
        (root / name).mkdir()
        (root / name / "inside").write_bytes(b"x")
        (root / name).chmod(mode)
    os.chown(root / "sticky" / "inside", OTHER_UID, OTHER_UID)


def outcome(action: Callable[[], Any]) -> Any:
    try:
        result = action()
    except OSError as e:
        return errno.errorcode[e.errno or 0]
    return "OK" if result is None else result


def probe(root: Path) -> dict[str, Any]:
    """What root gets for each action under `root`."""

    def run(name: str) -> str:
        done = subprocess.run([str(root / name)], capture_output=True, text=True, check=False)
        return done.stdout.strip() or f"exit {done.returncode}"

    actions: dict[str, Callable[[], Any]] = {
        "write a 0444 file": lambda: (root / "ro").write_bytes(b"root writes\n"),
        "read a 0000 file": lambda: (root / "none").read_bytes(),
        "access R|W on 0000": lambda: os.access(root / "none", os.R_OK | os.W_OK),
        "access X on 0644": lambda: os.access(root / "script", os.X_OK),
        "access X on 0701": lambda: os.access(root / "others_exec", os.X_OK),
        "access X on a 0000 dir": lambda: os.access(root / "locked", os.X_OK),
        "access of the missing": lambda: os.access(root / "missing", os.F_OK),
        "exec a 0644 script": lambda: run("script"),
        "exec another's 0701": lambda: run("others_exec"),
        "list a 0000 dir": lambda: sorted(os.listdir(root / "locked")),
        "read in a 0000 dir": lambda: (root / "locked" / "inside").read_bytes(),
        "create in a 0555 dir": lambda: (root / "readonly_dir" / "new").write_bytes(b"n"),
        "rename in a 0555 dir": lambda: os.rename(
            root / "readonly_dir" / "new", root / "readonly_dir" / "renamed"
        ),
        "unlink another's in sticky": lambda: os.unlink(root / "sticky" / "inside"),
        "chmod another's": lambda: os.chmod(root / "others_exec", 0o4755),
        "mode after": lambda: oct(os.stat(root / "others_exec").st_mode),
        "chown another's": lambda: os.chown(root / "others_exec", 0, 0),
        "utime another's": lambda: os.utime(root / "ro", (1, 2)),
        "times after": lambda: os.stat(root / "ro").st_mtime_ns,
        "chdir into a 0000 dir": lambda: os.chdir(root / "locked"),
    }
    cwd = os.getcwd()
    try:
        return {name: outcome(action) for name, action in actions.items()}
    finally:
        os.chdir(cwd)


def test_root_gets_what_it_gets_on_tmpfs(zfs_ram_mount: Any, tmpfs: Path) -> None:
    mount = zfs_ram_mount("size=16m")
    ours = Path(mount.path)
    assert "default_permissions" not in super_options(ours)
    for root in (tmpfs, ours):
        lay_out(root)
    expected = probe(tmpfs)
    assert expected["access X on 0644"] is False and expected["exec a 0644 script"] == "EACCES"
    assert probe(ours) == expected


def test_a_directory_is_not_read_again_after_each_change(zfs_ram_mount: Any) -> None:
    """Creating files one after another in one directory: with default_permissions (here
    forced by allow_other) the kernel asks for the directory's attributes before each next
    lookup; without, the attributes it has stay good."""

    def getattrs_for_creates(options: str) -> int:
        mount = zfs_ram_mount(options)
        directory = Path(mount.path) / "d"
        directory.mkdir()
        getattrs = counter_since(
            lambda: int(mount.stats()["requests"].get("GETATTR", {"count": 0})["count"])
        )
        for i in range(100):
            fd = os.open(directory / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
        return getattrs()

    assert "default_permissions" in super_options(Path(zfs_ram_mount("allow_other").path))
    assert getattrs_for_creates("size=16m,allow_other") >= 90
    assert getattrs_for_creates("size=16m") <= 5
