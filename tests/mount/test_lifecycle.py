"""Mount lifecycle pieces (checks, mount table, readiness handshake) and the pytest plugin."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from conftest import requires_fuse

from zfs_ram.daemon import lifecycle
from zfs_ram.daemon.lifecycle import (
    MountError,
    check_fuse_device,
    check_mountpoint,
    find_mount,
    is_alive,
    read_mounts,
)
from zfs_ram.mounts import MountInfo, locate
from zfs_ram.testing import MM_STAT_FIELDS, Mount, MountFactory

# ---- checks before mounting


def test_check_mountpoint_accepts_an_empty_directory_and_resolves_it(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert check_mountpoint(str(tmp_path / "link")) == str(tmp_path / "real")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "mountpoint {p} does not exist"),
        ("file", "mountpoint {p} is not a directory"),
        ("full", "mountpoint {p} is not empty"),
    ],
)
def test_check_mountpoint_refuses(tmp_path: Path, setup: str, message: str) -> None:
    p = tmp_path / "mp"
    if setup == "file":
        p.write_text("")
    elif setup == "full":
        p.mkdir()
        (p / ".hidden").write_text("")  # hidden files count, as for mount(8) users' data
    with pytest.raises(MountError) as info:
        check_mountpoint(str(p))
    assert str(info.value) == message.format(p=p)


def test_check_mountpoint_refuses_a_mount_point() -> None:
    with pytest.raises(MountError) as info:
        check_mountpoint("/proc")
    assert str(info.value) == "/proc is already a mount point (proc)"


def test_check_fuse_device(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="does not exist"):
        check_fuse_device(str(tmp_path / "fuse"))
    with pytest.raises(MountError, match="cannot open .*: Is a directory"):
        check_fuse_device(str(tmp_path))


def test_mount_table_unescapes_paths(tmp_path: Path) -> None:
    fake = tmp_path / "mountinfo"
    fake.write_text(
        "36 25 0:32 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "99 36 0:50 / /mnt/with\\040space\\134x rw - fuse.zfs_ram my\\040fs rw,user_id=0\n"
    )
    mounts = read_mounts(str(fake))
    assert [m.mountpoint for m in mounts] == ["/", "/mnt/with space\\x"]
    assert (mounts[1].mount_id, mounts[1].fstype, mounts[1].source) == (99, "fuse.zfs_ram", "my fs")


def test_find_mount_sees_real_mounts() -> None:
    root = find_mount("/")
    assert root is not None
    assert find_mount("/proc") is not None
    assert find_mount("/definitely/not/mounted") is None


def test_is_alive_treats_zombies_as_gone() -> None:
    assert is_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while is_alive(child.pid) and time.monotonic() < deadline:  # exits, stays a zombie
        time.sleep(0.01)
    assert not is_alive(child.pid)
    child.wait()
    assert not is_alive(child.pid)


# ---- the readiness handshake, parent side


def _forked(body_bytes: bytes | None, *, sleep: float = 0.0) -> tuple[int, int]:
    """A child that writes ``body_bytes`` (if any) on a pipe, then sleeps and exits."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() with threads running (pytest-timeout's timer);
        # this child only writes to a pipe and exits, it takes no locks.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        if body_bytes is not None:
            os.write(write_fd, body_bytes)
        time.sleep(sleep)
        os._exit(0)
    os.close(write_fd)
    return pid, read_fd


def test_wait_ready_ok(tmp_path: Path) -> None:
    pid, fd = _forked(b"ok\n")
    assert lifecycle._wait_ready(pid, fd, str(tmp_path), None) == 0
    os.waitpid(pid, 0)


def test_wait_ready_reports_the_childs_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pid, fd = _forked(b"MemoryError: pool too big\n")
    assert lifecycle._wait_ready(pid, fd, str(tmp_path), None) == 1
    assert capsys.readouterr().err == (
        f"zfs-ram: mounting {tmp_path} failed: MemoryError: pool too big\n"
    )


def test_wait_ready_notices_a_silent_death(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pid, fd = _forked(None)
    assert lifecycle._wait_ready(pid, fd, str(tmp_path), None) == 1
    assert "exited before the mount was ready" in capsys.readouterr().err


def test_wait_ready_times_out_and_kills(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle, "READY_TIMEOUT", 0.3)
    pid, fd = _forked(None, sleep=60)
    started = time.monotonic()
    assert lifecycle._wait_ready(pid, fd, str(tmp_path), None) == 1
    assert time.monotonic() - started < 10
    assert "did not answer FUSE_INIT" in capsys.readouterr().err
    assert not is_alive(pid)


# ---- the daemon in the foreground


def _foreground(mountpoint: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "zfs_ram", "mount", "-f", str(mountpoint), *args],
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _wait_mounted(proc: subprocess.Popen[bytes], mountpoint: Path, log: Path) -> None:
    deadline = time.monotonic() + 30
    while find_mount(str(mountpoint)) is None or not os.path.ismount(mountpoint):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@requires_fuse
def test_external_fusermount_ends_the_daemon_with_0(mountpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    proc = _foreground(mountpoint, log, "-o", "size=8m")
    try:
        _wait_mounted(proc, mountpoint, log)
        (mountpoint / "f").write_bytes(b"x" * 10000)
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        assert proc.wait(30) == 0
        text = log.read_text()
        assert "mounted" in text
        assert "unmounted" in text
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@requires_fuse
def test_debug_logs_requests_and_sigusr1_dumps_stacks(mountpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    proc = _foreground(mountpoint, log, "-d")
    try:
        _wait_mounted(proc, mountpoint, log)
        os.listdir(mountpoint)
        proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack, daemon goes on
        time.sleep(0.3)
        assert os.listdir(mountpoint) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = log.read_text()
        assert "INIT" in text  # libfuse's own request log
        assert " DEBUG " in text  # zfs_ram's logging at debug level
        assert 'File "' in text and "most recent call first" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@requires_fuse
def test_log_option_in_the_background(mountpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    result = subprocess.run(
        [sys.executable, "-m", "zfs_ram", "mount", str(mountpoint), "-o", f"log={log}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    pid = int((mountpoint / ".zfs_ram" / "pid").read_text())
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    deadline = time.monotonic() + 10
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log.read_text()
    assert f"mounted {mountpoint} (pid {pid})" in text
    assert f"unmounted {mountpoint}" in text


# ---- the pytest plugin


def test_scratch_fixture_is_a_marked_mount(
    zfs_ram_scratch: Path, request: pytest.FixtureRequest
) -> None:
    assert request.node.get_closest_marker("mount") is not None
    assert find_mount(str(zfs_ram_scratch)) is not None
    (zfs_ram_scratch / "hello").write_text("hi")
    assert os.listdir(zfs_ram_scratch) == ["hello"]  # the control directory stays hidden


def test_mount_object(zfs_ram_mount: MountFactory) -> None:
    m = zfs_ram_mount("size=32m", pool="zbud")
    assert isinstance(m, Mount)
    assert m.stats()["fs"]["pool"] == "zbud"
    assert m.stats()["pid"] == m.pid
    (m.path / "data").write_bytes(bytes(range(256)) * 64)
    mm = m.mm_stat()
    assert list(mm) == list(MM_STAT_FIELDS)
    assert mm["orig_data_size"] == 16384
    assert m.compact() >= 0
    assert m.unmount() == 0
    assert find_mount(str(m.path)) is None


def test_two_mounts_side_by_side(zfs_ram_mount: MountFactory) -> None:
    a, b = zfs_ram_mount("size=8m"), zfs_ram_mount("size=16m")
    assert a.path != b.path
    assert os.statvfs(a.path).f_blocks * 2 == os.statvfs(b.path).f_blocks


def test_failed_mount_fails_with_the_log(zfs_ram_mount: MountFactory) -> None:
    with pytest.raises(pytest.fail.Exception) as info:
        zfs_ram_mount("size=12q")
    assert "bad mount option 'size=12q'" in str(info.value)


@requires_fuse
def test_teardown_survives_busy_hung_and_crashed_daemons(tmp_path: Path) -> None:
    factory = MountFactory(tmp_path)
    busy, hung, killed, noisy = (factory("size=8m") for _ in range(4))
    held = open(busy.path / "held", "w")  # noqa: SIM115 - keeps the mount busy through teardown
    os.kill(hung.pid, signal.SIGSTOP)
    os.kill(killed.pid, signal.SIGKILL)
    killed.process.wait()
    with open(noisy.log_path, "a") as log:
        log.write("Traceback (most recent call last):\n")
    started = time.monotonic()
    try:
        problems = "\n".join(factory.finish())
    finally:
        with contextlib.suppress(OSError):  # its daemon is gone: ENOTCONN
            held.close()
    assert time.monotonic() - started < 30
    for m in (busy, hung, killed, noisy):
        assert find_mount(str(m.path)) is None, m
        assert m.process.poll() is not None, m
    assert f"daemon {hung.pid} hung after unmount; killed" in problems
    assert "exited with status -9 while still mounted" in problems
    assert "logged a Traceback" in problems
    assert factory.finish() == []  # idempotent


@requires_fuse
def test_daemon_unmounts_when_the_test_process_dies(tmp_path: Path) -> None:
    # What happens when pytest-timeout's thread method os._exit()s pytest: no teardown runs,
    # but the daemon gets SIGTERM (parent-death signal) and unmounts cleanly.
    mnt = tmp_path / "mnt"
    script = (
        "import os, sys; from pathlib import Path\n"
        "from zfs_ram.testing import start_mount\n"
        f"m = start_mount(Path({str(mnt)!r}), 'size=8m', log_path=Path({str(tmp_path)!r}) / 'l')\n"
        "print(m.pid, flush=True)\n"
        "os._exit(1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stderr
    pid = int(result.stdout)
    deadline = time.monotonic() + 10
    while (is_alive(pid) or find_mount(str(mnt))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert find_mount(str(mnt)) is None
    assert not is_alive(pid)
    assert "SIGTERM received: unmounting" in (tmp_path / "l").read_text()


@requires_fuse
def test_systemd_notify_ready_and_stopping(mountpoint: Path, tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    log = tmp_path / "log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zfs_ram", "mount", "-f", str(mountpoint)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")),
        )
    try:
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready.splitlines()
        assert f"MAINPID={proc.pid}" in ready.splitlines()
        assert os.path.ismount(mountpoint)  # READY=1 means usable
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(30) == 0, log.read_text()
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_teardown_after_the_test_unmounted_with_the_cli(zfs_ram_mount: MountFactory) -> None:
    m = zfs_ram_mount("size=8m")
    subprocess.run([sys.executable, "-m", "zfs_ram", "umount", str(m.path)], check=True)
    assert m.finish() == []  # the daemon's exit status 0 is checked; no complaints
    assert m.process.returncode == 0


# ---- a stopped daemon: teardown and force_unmount return in bounded time, mount point free


def _stuck_reader(path: Path) -> threading.Thread:
    """A thread whose stat of the root waits for the (stopped) daemon, as a test's might."""
    started = threading.Event()

    def read() -> None:
        started.set()
        with contextlib.suppress(OSError):  # ECONNABORTED once the connection is aborted
            os.stat(path)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started.wait(5)
    time.sleep(0.2)  # into the kernel, waiting for the daemon
    assert reader.is_alive(), "the stat did not wait for the stopped daemon"
    return reader


@requires_fuse
@pytest.mark.timeout(60)
def test_teardown_of_a_stopped_daemon_frees_the_mountpoint(tmp_path: Path) -> None:
    factory = MountFactory(tmp_path)
    m = factory("size=8m")
    (m.path / "top").write_text("x")  # the root's attributes must now come from the daemon
    os.kill(m.pid, signal.SIGSTOP)
    try:
        reader = _stuck_reader(m.path)
        started = time.monotonic()
        problems = "\n".join(factory.finish())
        assert time.monotonic() - started < 10
        assert find_mount(str(m.path)) is None
        assert m.process.poll() is not None
        assert f"daemon {m.pid} was stopped; killed to unmount" in problems
        reader.join(10)
        assert not reader.is_alive()  # its request failed with the connection
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGCONT)
        factory.finish()


@requires_fuse
@pytest.mark.timeout(60)
def test_mount_unmount_of_a_stopped_daemon_is_bounded(tmp_path: Path) -> None:
    factory = MountFactory(tmp_path)
    m = factory("size=8m")
    (m.path / "top").write_text("x")
    os.kill(m.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(AssertionError, match="is stopped"):
            m.unmount()
        assert time.monotonic() - started < 10
        assert find_mount(str(m.path)) is None
    finally:
        factory.finish()
    assert m.process.poll() is not None


@requires_fuse
@pytest.mark.timeout(60)
def test_force_unmount_of_a_stopped_daemon_frees_the_mountpoint(mountpoint: Path) -> None:
    from zfs_ram.testing import force_unmount

    result = subprocess.run(
        [sys.executable, "-m", "zfs_ram", "mount", str(mountpoint), "-o", "size=8m"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pid = int((mountpoint / ".zfs_ram" / "pid").read_text())
    (mountpoint / "top").write_text("x")
    os.kill(pid, signal.SIGSTOP)
    try:
        reader = _stuck_reader(mountpoint)
        started = time.monotonic()
        problems = force_unmount(mountpoint)
        assert time.monotonic() - started < 10
        assert find_mount(str(mountpoint)) is None, problems
        reader.join(10)
        assert not reader.is_alive()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(pid)  # continued, it finds its connection aborted and exits


# ---- locating paths without asking a daemon


def _table(tmp_path: Path, *lines: str) -> list[MountInfo]:
    fake = tmp_path / "mountinfo"
    fake.write_text("".join(line + "\n" for line in lines))
    return read_mounts(str(fake))


def test_mount_table_has_the_device_and_the_flags(tmp_path: Path) -> None:
    [m] = _table(tmp_path, "99 36 0:50 / /mnt rw,nosuid,nodev - fuse.zfs_ram zfs_ram rw")
    assert (m.major, m.minor) == (0, 50)
    assert {"nosuid", "nodev"} <= m.mount_options
    assert m.is_zfs_ram


def test_locate_a_path_inside_a_zfs_ram_mount_lexically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mnt = tmp_path / "m"
    table = _table(
        tmp_path,
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw",
        f"99 1 0:50 / {mnt} rw - fuse.zfs_ram zfs_ram rw",
    )

    def no_stat(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"stat of {args}")

    monkeypatch.setattr(os, "lstat", no_stat)
    monkeypatch.setattr(os, "stat", no_stat)
    where = locate(f"{mnt}/sub/../sub/x", table)
    assert (where.path, where.is_mountpoint) == (f"{mnt}/sub/x", False)
    assert where.zfs_ram is not None and where.zfs_ram.mountpoint == str(mnt)
    assert locate(str(mnt), table).is_mountpoint


def test_locate_resolves_symlinks_outside_but_never_stats_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    (tmp_path / "link").symlink_to(mnt)
    table = _table(
        tmp_path,
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw",
        f"99 1 0:50 / {mnt} rw - fuse.zfs_ram zfs_ram rw",
    )
    real_lstat = os.lstat

    def guarded(path: str, *args: object, **kwargs: object) -> os.stat_result:
        assert not str(path).startswith(str(mnt)), f"stat inside the mount: {path}"
        return real_lstat(path)

    monkeypatch.setattr(os, "lstat", guarded)
    where = locate(str(tmp_path / "link" / "sub"), table)
    assert where.path == f"{mnt}/sub"
    assert where.zfs_ram is not None and not where.is_mountpoint
    assert locate(str(tmp_path / "link"), table).is_mountpoint


@pytest.mark.parametrize("engine", ["native", "python"])
def test_the_daemon_says_which_engine_runs(
    zfs_ram_mount: MountFactory, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    """stats.json and the daemon's log name the engine of every component that has a compiled
    twin; ZFS_RAM_ENGINE=python in the daemon's environment selects the reference engine."""
    monkeypatch.setenv("ZFS_RAM_ENGINE", engine)
    mount = zfs_ram_mount("size=16m")
    (mount.path / "f").write_bytes(b"x" * 100_000)
    engines = mount.stats()["engines"]
    if engine == "python":
        assert set(engines.values()) <= {"python"}
    else:
        assert set(engines.values()) <= {"native", "python"}
    log = mount.log_tail()
    for component, used in engines.items():
        assert f"{component} engine: {used}" in log
