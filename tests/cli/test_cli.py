"""The zfs-ram command and the zfs_ram mount helper, run as a user would: by subprocess."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import cli_env, one_error_line, requires_fuse, run_mount8, zfs_ram_cli

from zfs_ram.daemon.lifecycle import find_mount, is_alive
from zfs_ram.testing import MM_STAT_FIELDS

MIB = 1 << 20


def mounted(path: Path) -> bool:
    """From the kernel's table: works for dead mounts, never blocks."""
    return find_mount(os.path.realpath(path)) is not None


def daemon_pid(path: Path) -> int:
    return int((path / ".zfs_ram" / "pid").read_text())


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not is_alive(pid)


def mount_ok(path: Path, *options: str) -> None:
    args = ["mount", str(path)] + (["-o", ",".join(options)] if options else [])
    result = zfs_ram_cli(*args)
    assert result.returncode == 0, result.stderr
    assert mounted(path)


# ---- errors: one line, exit status 2 for usage and 1 otherwise


@pytest.mark.parametrize("args", [[], ["mount"], ["frobnicate"], ["compact"], ["mount", "-x", "d"]])
def test_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    result = zfs_ram_cli(*args)
    assert result.returncode == 2
    one_error_line(result)


def test_missing_mountpoint(tmp_path: Path) -> None:
    result = zfs_ram_cli("mount", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert one_error_line(result) == f"zfs-ram: mountpoint {tmp_path}/nope does not exist"


def test_mountpoint_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = zfs_ram_cli("mount", str(tmp_path / "file"))
    assert result.returncode == 1
    assert one_error_line(result).endswith("is not a directory")


def test_non_empty_mountpoint(tmp_path: Path) -> None:
    (tmp_path / "precious").write_text("x")
    result = zfs_ram_cli("mount", str(tmp_path))
    assert result.returncode == 1
    assert one_error_line(result) == f"zfs-ram: mountpoint {tmp_path} is not empty"
    assert not mounted(tmp_path)


def test_bad_option(mountpoint: Path) -> None:
    result = zfs_ram_cli("mount", str(mountpoint), "-o", "size=12q")
    assert result.returncode == 1
    assert one_error_line(result) == (
        "zfs-ram: bad mount option 'size=12q': expected bytes with k/m/g/t suffix or N%"
    )
    assert not mounted(mountpoint)


def test_unknown_option(mountpoint: Path) -> None:
    result = zfs_ram_cli("mount", str(mountpoint), "-o", "size=1m,turbo")
    assert result.returncode == 1
    assert one_error_line(result) == "zfs-ram: bad mount option 'turbo': unknown option"


@pytest.mark.parametrize("command", ["stat", "compact", "umount"])
def test_commands_on_a_plain_directory_fail(command: str, tmp_path: Path) -> None:
    result = zfs_ram_cli(command, str(tmp_path))
    assert result.returncode == 1
    assert one_error_line(result) == f"zfs-ram: {tmp_path} is not mounted"


def test_umount_refuses_other_filesystems() -> None:
    result = zfs_ram_cli("umount", "/proc")
    assert result.returncode == 1
    assert one_error_line(result) == "zfs-ram: /proc is not a zfs_ram mount (it is proc)"


def test_python_dash_m_and_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zfs_ram", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("zfs-ram ")


def test_help_lists_subcommands() -> None:
    result = zfs_ram_cli("--help")
    assert result.returncode == 0
    for command in ("mount", "umount", "stat", "compact"):
        assert command in result.stdout


# ---- a real mount


@requires_fuse
def test_already_mounted(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=8m")
    result = zfs_ram_cli("mount", str(mountpoint))
    assert result.returncode == 1
    assert one_error_line(result) == (
        f"zfs-ram: {mountpoint} is already a mount point (fuse.zfs_ram);"
        f" unmount it first with 'zfs-ram umount {mountpoint}'"
    )


@requires_fuse
def test_mounting_over_a_dead_mount_says_it_is_dead(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=8m")
    pid = daemon_pid(mountpoint)
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    result = zfs_ram_cli("mount", str(mountpoint))
    assert result.returncode == 1
    assert one_error_line(result) == (
        f"zfs-ram: {mountpoint} is already a mount point (fuse.zfs_ram, its daemon is dead);"
        f" remove it with 'zfs-ram umount {mountpoint}'"
    )


@requires_fuse
def test_a_path_inside_a_mount_is_named_as_such(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=8m")
    (mountpoint / "sub").mkdir()
    for command in ("umount", "stat", "compact"):
        result = zfs_ram_cli(command, str(mountpoint / "sub"))
        assert result.returncode == 1
        assert one_error_line(result) == (
            f"zfs-ram: {mountpoint}/sub is inside the zfs_ram mount {mountpoint};"
            f" name the mount point: zfs-ram {command} {mountpoint}"
        )
    assert mounted(mountpoint)


@requires_fuse
def test_mount_returns_once_ready_and_in_the_background(mountpoint: Path) -> None:
    started = time.monotonic()
    mount_ok(mountpoint, "size=8m,mode=700")
    assert time.monotonic() - started < 10
    # Ready: the control directory answers at once, the daemon is detached from us.
    pid = daemon_pid(mountpoint)
    assert os.getsid(pid) == pid  # setsid: its own session, no terminal signals
    assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert oct(os.stat(mountpoint).st_mode & 0o7777) == oct(0o700)
    info = find_mount(str(mountpoint))
    assert info is not None
    assert (info.fstype, info.source) == ("fuse.zfs_ram", "zfs_ram")


@requires_fuse
def test_stat_compact_umount(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=64m,compact=off")
    # Half-compressible pages (~2 KiB each once compressed) in many files, then every other
    # file deleted: the pool is left with half-empty zspages that only compaction frees.
    half_random = os.urandom(2048) + bytes(2048)
    for i in range(600):
        (mountpoint / f"f{i}").write_bytes(half_random)
    for i in range(0, 600, 2):
        (mountpoint / f"f{i}").unlink()

    result = zfs_ram_cli("stat", "--json", str(mountpoint))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert set(MM_STAT_FIELDS) <= set(stats["mm_stat"])
    assert stats["mm_stat"]["orig_data_size"] == 300 * 4096

    result = zfs_ram_cli("stat", str(mountpoint))
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    columns = dict(zip(header.split(), row.split(), strict=True))
    assert columns["MOUNTPOINT"] == str(mountpoint)
    assert columns["DATA"] == "1.2M"  # 300 pages, human-readable
    assert columns["SIZE"] == "64M"
    assert columns["POOL"] == "zsmalloc"
    for name in ("COMPR", "TOTAL", "MEM-LIMIT", "MEM-USED", "COMPACTED", "COMP-RATIO"):
        assert name in columns

    result = zfs_ram_cli("stat", "--bytes", str(mountpoint))
    columns = dict(zip(*(line.split() for line in result.stdout.splitlines()), strict=True))
    assert columns["DATA"] == str(300 * 4096)

    result = zfs_ram_cli("compact", str(mountpoint))
    assert result.returncode == 0, result.stderr
    freed = int(result.stdout.split()[0])
    assert freed > 0, result.stdout
    after = json.loads(zfs_ram_cli("stat", "--json", str(mountpoint)).stdout)
    assert after["mm_stat"]["pages_compacted"] >= freed

    pid = daemon_pid(mountpoint)
    result = zfs_ram_cli("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not mounted(mountpoint)
    assert not is_alive(pid)  # umount waited for the daemon


@requires_fuse
def test_umount_busy_says_so(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=8m")
    with open(mountpoint / "open", "w") as f:
        f.write("x")
        result = zfs_ram_cli("umount", str(mountpoint))
        assert result.returncode == 1
        assert "is busy" in one_error_line(result)
        assert mounted(mountpoint)
    result = zfs_ram_cli("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not mounted(mountpoint)


@requires_fuse
def test_umount_lazy_while_busy(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=8m")
    pid = daemon_pid(mountpoint)
    f = open(mountpoint / "open", "w")  # noqa: SIM115 - held open across the unmount
    try:
        result = zfs_ram_cli("umount", "-z", str(mountpoint))
        assert result.returncode == 0, result.stderr
        assert not mounted(mountpoint)
    finally:
        f.close()
    assert wait_gone(pid)  # the last reference gone, the daemon ends


@requires_fuse
def test_umount_after_sigkill_then_mount_again(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=8m")
    pid = daemon_pid(mountpoint)
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    with pytest.raises(OSError) as info:
        os.listdir(mountpoint)
    assert info.value.errno == errno.ENOTCONN
    result = zfs_ram_cli("stat", str(mountpoint))
    assert result.returncode == 1
    assert "is gone" in one_error_line(result)

    result = zfs_ram_cli("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not mounted(mountpoint)
    mount_ok(mountpoint, "size=8m")
    (mountpoint / "again").write_text("works")
    assert (mountpoint / "again").read_text() == "works"


@requires_fuse
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_during_writes_unmounts_and_exits_0(mountpoint: Path, signum: int) -> None:
    log = mountpoint.parent / "daemon.log"
    with open(log, "wb") as log_file:
        daemon = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "zfs-ram"),
                "mount",
                "-f",
                str(mountpoint),
                "-o",
                "size=256m",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )
    try:
        deadline = time.monotonic() + 30
        while not (mounted(mountpoint) and os.path.ismount(mountpoint)):
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)

        stop = threading.Event()
        written = [0]

        def writer() -> None:
            block = os.urandom(MIB // 2) + bytes(MIB // 2)
            i = 0
            while not stop.is_set():
                try:
                    with open(mountpoint / f"w{i % 8}", "wb") as f:
                        f.write(block)
                    written[0] += 1
                except OSError:
                    return  # the mount went away under us: expected
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        while written[0] < 3:
            assert thread.is_alive()
            time.sleep(0.01)
        daemon.send_signal(signum)
        status = daemon.wait(30)
        stop.set()
        thread.join(30)
        assert status == 0, log.read_text()
        assert not mounted(mountpoint)
        text = log.read_text()
        assert f"{signal.Signals(signum).name} received" in text
        assert "Traceback" not in text
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


# ---- mount(8) and fstab through mount.fuse3


def _statvfs_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


@requires_fuse
def test_mount_dash_t_fuse_zfs_ram(mountpoint: Path, tmp_path: Path) -> None:
    facts = run_mount8(
        'mount -t fuse.zfs_ram zfs_ram "$MNT" -o size=8m,nr_inodes=1k', mountpoint, tmp_path
    )
    assert facts["fstype"] == "fuse.zfs_ram"
    assert int(facts["blocks"]) * int(facts["bsize"]) == 8 * MIB
    assert facts["files"] == "1024"


@requires_fuse
def test_fstab_line(mountpoint: Path, tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"zfs_ram {mountpoint} fuse.zfs_ram defaults,size=16m,mode=700,noauto,nofail 0 0\n"
    )
    facts = run_mount8(f'mount --fstab "{fstab}" "$MNT"', mountpoint, tmp_path)
    assert facts["fstype"] == "fuse.zfs_ram"
    assert int(facts["blocks"]) * int(facts["bsize"]) == 16 * MIB
    assert facts["mode"] == "700"


@requires_fuse
def test_mount_helper_without_source_and_options_first(mountpoint: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "zfs_ram"), "-o", "size=4m", str(mountpoint)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert _statvfs_size(mountpoint) == 4 * MIB


def test_mount_helper_errors_are_one_line(tmp_path: Path) -> None:
    helper = str(Path(sys.executable).parent / "zfs_ram")
    result = subprocess.run(
        [helper, "zfs_ram", str(tmp_path / "missing"), "-o", "size=1m"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert one_error_line(result).endswith("does not exist")
    result = subprocess.run([helper, "a", "b", "c"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    one_error_line(result)


def _stop_after_writing_the_top_directory(mountpoint: Path) -> int:
    """Mount, write a file into the top directory (so the kernel must ask the daemon about the
    root again), SIGSTOP the daemon; returns its pid."""
    mount_ok(mountpoint, "size=8m")
    pid = daemon_pid(mountpoint)
    (mountpoint / "top").write_text("x")
    os.kill(pid, signal.SIGSTOP)
    return pid


STOPPED_BOUND = 10.0  # seconds any command may take on a stopped daemon


@requires_fuse
@pytest.mark.timeout(90)
def test_stat_and_compact_of_a_stopped_daemon_return_with_one_line(mountpoint: Path) -> None:
    pid = _stop_after_writing_the_top_directory(mountpoint)
    try:
        for args in (["stat", str(mountpoint)], ["stat"], ["compact", str(mountpoint)]):
            started = time.monotonic()
            result = zfs_ram_cli(*args, timeout=STOPPED_BOUND + 5)
            assert time.monotonic() - started < STOPPED_BOUND, args
            assert result.returncode == 1, args
            stopped = [line for line in result.stderr.splitlines() if str(mountpoint) in line]
            assert stopped == [
                f"zfs-ram: the zfs_ram daemon of {mountpoint} does not answer (stopped or hung)"
            ], args
    finally:
        os.kill(pid, signal.SIGCONT)


@requires_fuse
@pytest.mark.timeout(90)
@pytest.mark.parametrize("lazy", [False, True])
def test_umount_of_a_stopped_daemon_frees_the_mountpoint(mountpoint: Path, lazy: bool) -> None:
    pid = _stop_after_writing_the_top_directory(mountpoint)
    try:
        started = time.monotonic()
        result = zfs_ram_cli("umount", *(["-z"] if lazy else []), str(mountpoint), timeout=30)
        assert time.monotonic() - started < STOPPED_BOUND
        assert result.returncode == 0, result.stderr
        assert not mounted(mountpoint)
        if not lazy:
            assert one_error_line(result) == (
                f"zfs-ram: the zfs_ram daemon of {mountpoint} does not answer (stopped or hung);"
                " aborted its connection and unmounted it; the daemon exits once it runs again"
            )
        assert os.listdir(mountpoint) == []  # the plain directory again
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_gone(pid)  # once running again it finds its connection gone and exits
    mount_ok(mountpoint, "size=8m")  # and the directory can be mounted again


@requires_fuse
def test_stat_without_mountpoint_lists_every_zfs_ram_mount(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    try:
        mount_ok(a, "size=8m")
        mount_ok(b, "size=16m,pool=zbud")
        result = zfs_ram_cli("stat")
        # Other zfs_ram mounts on this machine are listed too, and a dead one is an error line.
        assert all(line.startswith("zfs-ram: ") for line in result.stderr.splitlines())
        rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
        assert rows[str(a)][1:4] == ["zsmalloc", "lz4", "8.0M"]
        assert rows[str(b)][1:4] == ["zbud", "lz4", "16M"]
        listed = json.loads(zfs_ram_cli("stat", "--json").stdout)
        by_mountpoint = {entry["mountpoint"]: entry for entry in listed}
        assert by_mountpoint[str(b)]["fs"]["pool"] == "zbud"
        piped = subprocess.run(
            f"'{Path(sys.executable).parent / 'zfs-ram'}' stat --json | head -c 1",
            shell=True,
            capture_output=True,
            text=True,
            check=False,
        )
        assert "Traceback" not in piped.stderr
    finally:
        for path in (a, b):
            zfs_ram_cli("umount", str(path))
    assert not mounted(a)
    assert not mounted(b)


# ---- help and usage messages


def test_a_subcommands_usage_error_points_at_its_own_help(tmp_path: Path) -> None:
    for args, helper in (
        (["mount", str(tmp_path), "--bogus"], "zfs-ram mount"),
        (["stat", "--bogus"], "zfs-ram stat"),
        (["umount", str(tmp_path), "--bogus"], "zfs-ram umount"),
        (["compact", str(tmp_path), "extra"], "zfs-ram compact"),
    ):
        result = zfs_ram_cli(*args)
        assert result.returncode == 2
        assert one_error_line(result).endswith(f"(see '{helper} --help')"), args


def test_mount_help_lists_every_option_with_its_default() -> None:
    from zfs_ram.daemon.options import OPTION_TABLE

    text = zfs_ram_cli("mount", "--help").stdout
    for spelling, default, _ in OPTION_TABLE:
        line = next(line for line in text.splitlines() if line.strip().startswith(spelling))
        assert default in line, line
    assert "nosuid" in text and "1777" in text and "zsmalloc" in text


def test_compact_help_has_a_description() -> None:
    text = zfs_ram_cli("compact", "--help").stdout
    assert "pages freed" in text.split("positional arguments")[0]


def test_mount_helper_usage_names_one_mountpoint() -> None:
    helper = str(Path(sys.executable).parent / "zfs_ram")
    result = subprocess.run([helper, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "usage: zfs_ram [SOURCE] MOUNTPOINT [-o OPTIONS]"


def test_stat_without_any_mount_says_so(tmp_path: Path) -> None:
    # A private mount namespace in which every zfs_ram mount (other tests' too) is detached.
    script = (
        "set -eu\n"
        "awk '$0 ~ / - fuse.zfs_ram / {print $5}' /proc/self/mountinfo | sort -r |"
        ' while read -r m; do umount -l "$(printf \'%b\' "$m")"; done\n'
        f"'{VENV_ZFS_RAM}' stat; echo status=$?\n"
        f"'{VENV_ZFS_RAM}' stat --json\n"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["no zfs_ram mounts", "status=0", "[]"]
    assert result.stderr == ""


VENV_ZFS_RAM = Path(sys.executable).parent / "zfs-ram"


@requires_fuse
def test_stat_json_puts_the_summaries_first_and_classes_last(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=8m")
    text = zfs_ram_cli("stat", "--json", str(mountpoint)).stdout
    keys = list(json.loads(text))
    assert keys[:6] == ["mm_stat", "fs", "engines", "pool", "store", "compactor"]
    assert keys[-1] == "classes"
    assert text.splitlines()[1].startswith('  "mm_stat": {')  # indent=2
    listed = json.loads(zfs_ram_cli("stat", "--json").stdout)
    mine = next(entry for entry in listed if entry["mountpoint"] == str(mountpoint))
    assert list(mine)[:2] == ["mountpoint", "mm_stat"]
    assert list(mine)[-1] == "classes"


@requires_fuse
def test_stat_requests_counts_by_opcode(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=8m")
    for i in range(7):
        (mountpoint / f"f{i}").write_bytes(b"x" * 5000)
    listed = json.loads(zfs_ram_cli("stat", "--requests", "--json", str(mountpoint)).stdout)
    assert listed["mountpoint"] == str(mountpoint)
    requests = listed["requests"]
    assert requests["CREATE"]["count"] == 7 and requests["WRITE"]["count"] >= 7
    assert all(entry["seconds"] >= 0 for entry in requests.values())
    table = zfs_ram_cli("stat", "--requests", str(mountpoint))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"{mountpoint}: ") and " requests, " in lines[0]
    assert lines[1].split() == ["OPCODE", "COUNT", "SHARE", "SECONDS", "US/REQ"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["CREATE"][1] == "7" and int(rows["WRITE"][1]) >= 7
    counts = [int(row[1]) for row in rows.values()]
    assert counts == sorted(counts, reverse=True)  # the commonest first
    every = zfs_ram_cli("stat", "--requests")  # every mount: one block each
    assert f"{mountpoint}: " in every.stdout


# ---- kernel flags: nosuid,nodev by default on every path, suid/dev when asked


def _flags(path: Path) -> frozenset[str]:
    info = find_mount(str(path))
    assert info is not None
    return info.mount_options


@requires_fuse
def test_zfs_ram_mount_is_nosuid_nodev_unless_asked(mountpoint: Path) -> None:
    mount_ok(mountpoint, "size=8m")
    assert {"nosuid", "nodev"} <= _flags(mountpoint)
    assert zfs_ram_cli("umount", str(mountpoint)).returncode == 0
    mount_ok(mountpoint, "size=8m", "suid", "dev")
    assert not {"nosuid", "nodev"} & _flags(mountpoint)


@requires_fuse
def test_mount_dash_t_is_nosuid_nodev_too(mountpoint: Path, tmp_path: Path) -> None:
    facts = run_mount8('mount -t fuse.zfs_ram zfs_ram "$MNT" -o size=8m', mountpoint, tmp_path)
    assert {"nosuid", "nodev"} <= set(facts["flags"].split(","))


@requires_fuse
def test_fstab_nosuid_alone_stays_nodev(mountpoint: Path, tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(f"zfs_ram {mountpoint} fuse.zfs_ram size=8m,nosuid,noauto 0 0\n")
    facts = run_mount8(f'mount --fstab "{fstab}" "$MNT"', mountpoint, tmp_path)
    assert {"nosuid", "nodev"} <= set(facts["flags"].split(","))
