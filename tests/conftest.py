"""Shared test helpers. The mount fixtures (zfs_ram_mount, zfs_ram_scratch) come from the
zfs_ram.testing.plugin pytest plugin, registered through the package's pytest11 entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from zfs_ram.testing import force_unmount, fuse_unavailable_reason

# The venv's bin directory: zfs-ram, and zfs_ram for mount.fuse3, which finds it through PATH.
VENV_BIN = Path(sys.executable).parent
# A generous bound for one CLI call; a mount or unmount takes well under a second.
CLI_TIMEOUT = 60.0

_FUSE_REASON = fuse_unavailable_reason()
_F = TypeVar("_F", bound=Callable[..., object])


def requires_fuse(test: _F) -> _F:
    """Mark a test that mounts through the CLI (not the plugin's fixtures): ``mount``, and
    skipped with the reason when FUSE is unusable here."""
    skip = pytest.mark.skipif(_FUSE_REASON is not None, reason=f"needs FUSE: {_FUSE_REASON}")
    marked: _F = pytest.mark.mount(skip(test))
    return marked


def cli_env() -> dict[str, str]:
    """The environment with the venv's bin first on PATH, as after activating the venv."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def zfs_ram_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run the installed ``zfs-ram`` command and capture its output."""
    return subprocess.run(
        [str(VENV_BIN / "zfs-ram"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``zfs-ram: ...`` line a failing command must print (asserted)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {result.stderr!r}"
    assert lines[0].startswith("zfs-ram: "), lines[0]
    return lines[0]


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty directory; whatever is mounted on it at teardown is removed."""
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        problems = force_unmount(path)
    assert not problems, problems


# mount(8) runs its helpers with PATH removed from the environment, so mount.fuse3's
# `/bin/sh -c 'zfs_ram ...'` searches only the shell's default PATH (/usr/local/sbin, ...).
# Rather than install zfs_ram there, the test runs mount(8) in a private mount namespace in which
# a directory holding only a zfs_ram symlink is bind-mounted over /usr/local/sbin. The FUSE mount
# is then visible only inside, so the script checks, prints and unmounts it there; its trap
# removes it if anything fails.
NAMESPACE_SCRIPT = """
set -eu
trap 'fusermount3 -u -z "$MNT" 2>/dev/null || true' EXIT
mount --bind "$BIN" /usr/local/sbin
{mount_command}
stat -f -c 'blocks=%b bsize=%S files=%c' "$MNT"
stat -c 'mode=%a' "$MNT"
grep " $MNT " /proc/self/mountinfo | sed 's/.* - /fstype=/'
grep " $MNT " /proc/self/mountinfo | cut -d' ' -f6 | sed 's/^/flags=/'
pid=$(cat "$MNT/.zfs_ram/pid")
umount "$MNT"
i=0
while kill -0 "$pid" 2>/dev/null; do i=$((i+1)); [ $i -lt 200 ] || exit 3; sleep 0.05; done
echo daemon-exited
"""


def run_mount8(mount_command: str, mountpoint: Path, tmp_path: Path) -> dict[str, str]:
    """Run a mount(8) command as described above; return the key=value facts it printed."""
    bindir = tmp_path / "sbin"
    bindir.mkdir()
    (bindir / "zfs_ram").symlink_to(Path(sys.executable).parent / "zfs_ram")
    env = dict(os.environ, MNT=str(mountpoint), BIN=str(bindir))
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            NAMESPACE_SCRIPT.format(mount_command=mount_command),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "daemon-exited"
    facts: dict[str, str] = {}
    for word in result.stdout.split():
        key, _, value = word.partition("=")
        facts.setdefault(key, value)
    return facts


def counter_since(served: Callable[[], int]) -> Callable[[], int]:
    """A function that gives how far ``served()`` (a count the daemon keeps, read from
    stats.json) moved since its previous call, less what reading stats.json moves it itself."""
    served()  # the first look may still see a FLUSH or lookup of its own
    first = served()
    own = served() - first
    last = served()

    def since() -> int:
        nonlocal last
        now = served()
        count, last = now - last - own, now
        return count

    return since
