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
