"""pytest plugin: real zfs_ram mounts as fixtures (loaded through the ``pytest11`` entry point).

Fixtures:
    zfs_ram_mount    a factory: ``zfs_ram_mount("size=64m", pool="zbud") -> Mount``
    zfs_ram_scratch  a mounted ``pathlib.Path`` with default options

The daemon runs in the foreground as a child process (``python -m zfs_ram mount -f``), its
stdout and stderr in a log file under ``tmp_path``. A mount is ready once the directory is a
mount point; a daemon that dies first fails the test with the log's tail.

Teardown always removes the mount, whatever the test did: ``fusermount3 -u``; if that fails
(busy) ``fusermount3 -u -z``; a daemon that then does not exit is killed. A stopped daemon is
killed as soon as the mount cannot go without it: its FUSE connection ends with it, so every
request waiting in the mount fails and the mount point comes free. No step stats inside the
mount (mounts are found in /proc/self/mountinfo) and every wait is bounded. Teardown also fails
the test if the daemon logged a Traceback (unless ``allow_traceback=True``) or did not exit 0
after a clean unmount. The daemon gets SIGTERM if pytest dies (PR_SET_PDEATHSIG), so even a run
killed by pytest-timeout's thread method leaves no mount behind.

Tests that use the fixtures are marked ``mount``, skip when /dev/fuse or fusermount3 is missing,
and get a timeout when pytest-timeout is installed but none is configured.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zfs_ram.client import ControlClient, ControlError, NoAnswer, bounded
from zfs_ram.mounts import (
    MountInfo,
    abort_connection,
    fusermount,
    is_stopped,
    locate,
    wait_for_exit,
)
from zfs_ram.vocabulary import CONTROL_DIR, FSTYPE, MM_STAT_FIELDS

__all__ = [
    "MM_STAT_FIELDS",
    "Mount",
    "MountFactory",
    "force_unmount",
    "fuse_unavailable_reason",
    "start_mount",
]

# Mounting takes well under a second; 30 s is pyfuse3's and sshfs's wait_for_mount budget.
MOUNT_TIMEOUT = 30.0
# fusermount3 itself and the daemon's exit after unmount: both sub-second when healthy.
UNMOUNT_TIMEOUT = 5.0
# After a lazy unmount the daemon serves the files still open until they are closed; the test
# is over, so it gets this long to finish before it is killed (without blame).
LAZY_GRACE = 1.0
# Lines of the daemon's log shown when a mount fails.
LOG_TAIL_LINES = 30
# Applied to mount tests when pytest-timeout is installed but no timeout is configured.
DEFAULT_TEST_TIMEOUT = 120
POLL_INTERVAL = 0.05
# After a daemon was killed or its connection aborted, how long a "busy" unmount is retried.
ABORTED_BUSY_SECONDS = 2.0
# A healthy daemon answers its pid file at once; force_unmount asks only to find the daemon.
PID_READ_TIMEOUT = 2.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def fuse_unavailable_reason() -> str | None:
    """Why real mounts cannot work here, or None if they can."""
    if shutil.which("fusermount3") is None:
        return "fusermount3 not found (install fuse3)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        return f"/dev/fuse unusable: {e.strerror}"
    os.close(fd)
    return None


def _parent_death_signal() -> Callable[[], None]:
    """A preexec_fn that makes the child get SIGTERM when this (main) thread dies.

    libc is looked up before fork, so the child only makes one system call.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


def _mounted(path: str | os.PathLike[str]) -> MountInfo | None:
    """What is mounted exactly on ``path``, from the mount table: never blocks on a daemon."""
    where = locate(os.fspath(path))
    return where.mount if where.is_mountpoint else None


def _kill(pid: int) -> None:
    """SIGKILL, which also ends a stopped process; its FUSE connection is aborted with it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pid: int, timeout: float) -> bool:
    return wait_for_exit(pid, timeout) == "gone"


def force_unmount(path: str | os.PathLike[str], pid: int | None = None) -> list[str]:
    """Remove whatever is mounted on ``path`` and end its daemon. Returns what went wrong.

    For clean-up of mounts made outside the fixtures (e.g. by ``zfs-ram mount``). Never raises
    for a mount that refuses to go and never hangs on a stopped daemon: a stopped daemon is
    killed, one that does not answer has its connection aborted, then -u, then -z.
    """
    problems: list[str] = []
    info = _mounted(path)
    if info is None:
        return problems
    where = info.mountpoint
    unanswered = False
    if pid is None:
        try:
            pid = ControlClient(where, timeout=PID_READ_TIMEOUT).pid()
        except NoAnswer:
            unanswered = True
        except ControlError:
            pass  # dead: fusermount3 -u works
    busy_for = 0.0  # a connection that ends by force frees its files moments later
    if pid is not None and is_stopped(pid):
        problems.append(f"daemon {pid} was stopped; killed")
        _kill(pid)
        _wait_gone(pid, UNMOUNT_TIMEOUT)
        busy_for = ABORTED_BUSY_SECONDS
    elif unanswered:
        reason = abort_connection(info)
        if reason is not None:
            problems.append(f"daemon of {where} does not answer; cannot abort it: {reason}")
        busy_for = ABORTED_BUSY_SECONDS
    if fusermount(where, timeout=UNMOUNT_TIMEOUT, busy_for=busy_for) is not None:
        problems.append(f"fusermount3 -u {where} failed; unmounted lazily")
        fusermount(where, lazy=True, timeout=UNMOUNT_TIMEOUT)
    if pid is not None and not _wait_gone(pid, UNMOUNT_TIMEOUT):
        problems.append(f"daemon {pid} did not exit after unmount; killed")
        _kill(pid)
    if _mounted(where) is not None:
        problems.append(f"{where} is still mounted")
    return problems


class Mount:
    """One running zfs_ram daemon (a foreground child process) and its mount."""

    def __init__(
        self,
        path: Path,
        process: subprocess.Popen[bytes],
        log_path: Path,
        *,
        allow_traceback: bool = False,
    ) -> None:
        self.path = path
        self.process = process
        self.log_path = log_path
        self.allow_traceback = allow_traceback
        self._unmounted_cleanly = False
        self._finished = False

    def __repr__(self) -> str:
        return f"<Mount {self.path} pid={self.pid}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def control(self) -> Path:
        """The control directory, MOUNTPOINT/.zfs_ram."""
        return self.path / CONTROL_DIR

    @property
    def client(self) -> ControlClient:
        """The bounded client of the control directory (zfs_ram.client)."""
        return ControlClient(self.path)

    def mm_stat(self) -> dict[str, int]:
        """The mm_stat line as a dict of zram's field names."""
        return self.client.mm_stat()

    def stats(self) -> dict[str, Any]:
        """Everything, from .zfs_ram/stats.json."""
        return self.client.stats()

    def compact(self) -> int:
        """Compact now; returns the pages given back (growth of pages_compacted)."""
        return self.client.compact()

    def log(self) -> str:
        """The daemon's stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT) -> int:
        """Unmount cleanly (fusermount3 -u), wait for the daemon and return its exit status.

        Raises AssertionError, within about ``timeout`` seconds, if either does not happen."""
        reason = fusermount(str(self.path), timeout=UNMOUNT_TIMEOUT)
        if reason is not None:
            raise AssertionError(f"fusermount3 -u {self.path} failed: {reason}")
        if is_stopped(self.pid):
            raise AssertionError(f"zfs_ram daemon {self.pid} is stopped: unmounted, not exited")
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"zfs_ram daemon {self.pid} did not exit {timeout:.0f} s after unmount;"
                f" log tail:\n{self.log_tail()}"
            ) from None
        self._unmounted_cleanly = True
        return status

    def finish(self) -> list[str]:
        """Teardown: make sure the mount is gone and the daemon ended; return the problems."""
        if self._finished:
            return []
        self._finished = True
        problems: list[str] = []
        path = str(self.path)
        clean = self._unmounted_cleanly
        if self.process.poll() is None:
            if _mounted(path) is None:
                clean = True  # the test unmounted it some other way (zfs-ram umount, umount)
            else:
                failed = fusermount(path, timeout=UNMOUNT_TIMEOUT)
                clean = failed is None
                if not clean and is_stopped(self.pid):
                    # Requests wait in the mount for a daemon that cannot answer: end it, which
                    # aborts the connection, then the dead mount unmounts.
                    problems.append(f"zfs_ram daemon {self.pid} was stopped; killed to unmount")
                    self._kill()
                    failed = fusermount(
                        path, timeout=UNMOUNT_TIMEOUT, busy_for=ABORTED_BUSY_SECONDS
                    )
                if failed is not None:  # busy, or fusermount3 hung: detach it
                    fusermount(path, lazy=True, timeout=UNMOUNT_TIMEOUT)
            if self.process.poll() is None and is_stopped(self.pid):
                if clean:
                    problems.append(f"zfs_ram daemon {self.pid} hung after unmount; killed")
                self._kill()
                clean = False
            try:
                self.process.wait(UNMOUNT_TIMEOUT if clean else LAZY_GRACE)
            except subprocess.TimeoutExpired:
                if clean:
                    problems.append(f"zfs_ram daemon {self.pid} hung after unmount; killed")
                self._kill()
                clean = False
        elif not clean:
            if _mounted(path) is None:
                clean = True  # unmounted some other way, and the daemon already ended
            else:
                problems.append(
                    f"zfs_ram daemon exited with status {self.process.returncode}"
                    " while still mounted"
                )
        if _mounted(path) is not None:  # a dead mount left by a crash
            fusermount(path, lazy=True, timeout=UNMOUNT_TIMEOUT)
        status = self.process.returncode
        if clean and status != 0:
            problems.append(f"zfs_ram daemon exited with status {status} after a clean unmount")
        if not self.allow_traceback and "Traceback" in self.log():
            problems.append("zfs_ram daemon logged a Traceback")
        if problems:
            problems.append(f"daemon log ({self.log_path}), tail:\n{self.log_tail()}")
        return problems

    def _kill(self) -> None:
        """SIGKILL the daemon and reap it (bounded: a killed process ends at once)."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(UNMOUNT_TIMEOUT)


def start_mount(
    mountpoint: Path,
    options: str = "",
    *,
    log_path: Path,
    allow_traceback: bool = False,
    timeout: float = MOUNT_TIMEOUT,
) -> Mount:
    """Start a foreground daemon on ``mountpoint`` and wait until it is mounted.

    Raises pytest's Failed with the log's tail if the daemon dies or is not ready in time.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "zfs_ram", "mount", "-f", str(mountpoint)]
    if options:
        cmd += ["-o", options]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_parent_death_signal(),
        )
    mount = Mount(mountpoint, process, log_path, allow_traceback=allow_traceback)
    where = locate(str(mountpoint)).path
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            mount.finish()
            pytest.fail(
                f"zfs_ram daemon exited with status {process.returncode} before mounting"
                f" {mountpoint}; log tail:\n{mount.log_tail()}",
                pytrace=False,
            )
        info = _mounted(where)
        # ismount() stats the root, which waits until the daemon has answered FUSE_INIT;
        # bounded, as a daemon that never answers would keep it waiting for good.
        if info is not None and info.fstype == FSTYPE and _answers(where, deadline):
            return mount
        if time.monotonic() > deadline:
            problems = mount.finish()
            pytest.fail(
                f"zfs_ram did not mount {mountpoint} within {timeout:.0f} s; log tail:\n"
                f"{mount.log_tail()}" + ("\n" + "\n".join(problems) if problems else ""),
                pytrace=False,
            )
        time.sleep(POLL_INTERVAL)


def _answers(path: str, deadline: float) -> bool:
    """Does the mount's root answer a stat before ``deadline``?"""
    try:
        return bounded(
            lambda: os.path.ismount(path), max(0.0, deadline - time.monotonic()), "ismount"
        )
    except NoAnswer:
        return False


class MountFactory:
    """The ``zfs_ram_mount`` fixture's value: call it to get a new Mount."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self.mounts: list[Mount] = []

    def __call__(
        self,
        options: str = "",
        *,
        pool: str | None = None,
        allow_traceback: bool = False,
        timeout: float = MOUNT_TIMEOUT,
    ) -> Mount:
        n = len(self.mounts)
        if pool is not None:
            options = f"{options},pool={pool}" if options else f"pool={pool}"
        mount = start_mount(
            self._tmp_path / f"mnt{n}",
            options,
            log_path=self._tmp_path / f"zfs_ram{n}.log",
            allow_traceback=allow_traceback,
            timeout=timeout,
        )
        self.mounts.append(mount)
        return mount

    def finish(self) -> list[str]:
        """Tear down every mount, newest first, and collect the problems."""
        problems: list[str] = []
        for mount in reversed(self.mounts):
            problems += mount.finish()
        return problems


@pytest.fixture
def zfs_ram_mount(tmp_path: Path) -> Iterator[MountFactory]:
    """A factory of real zfs_ram mounts; all are unmounted at teardown."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(f"zfs_ram mount tests need FUSE: {reason}")
    factory = MountFactory(tmp_path)
    try:
        yield factory
    finally:
        problems = factory.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def zfs_ram_scratch(zfs_ram_mount: MountFactory) -> Path:
    """A zfs_ram mount with default options, as a directory path."""
    return zfs_ram_mount().path


_MOUNT_FIXTURES = frozenset({"zfs_ram_mount", "zfs_ram_scratch"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "mount: the test mounts a real zfs_ram filesystem (needs /dev/fuse)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark mount tests, and give them a timeout if pytest-timeout has none configured."""
    add_timeout = config.pluginmanager.hasplugin("timeout") and not _timeout_configured(config)
    for item in items:
        if not _MOUNT_FIXTURES & set(getattr(item, "fixturenames", ())):
            continue
        item.add_marker(pytest.mark.mount)
        if add_timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


def _timeout_configured(config: pytest.Config) -> bool:
    with contextlib.suppress(ValueError, AttributeError):
        if config.getoption("timeout", None):
            return True
        if config.getini("timeout"):
            return float(config.getini("timeout")) > 0
    return bool(os.environ.get("PYTEST_TIMEOUT"))
