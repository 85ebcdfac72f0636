"""Who may do what on a mount made by root, seen by an unprivileged user.

The user (``zfsramtest<pid>``, created with useradd for this run and removed with userdel at
the end, also after a failure) runs small Python snippets through ``setpriv`` with the system
interpreter, which needs nothing from the venv. The name carries the pid so that two runs at
once on one machine neither share nor delete each other's user. The mounts live
under a directory everyone may traverse (pytest's tmp_path is private to root), made by the
plugin's MountFactory with the same guaranteed unmount as the ``zfs_ram_mount`` fixture.

Not covered: a mount made by the unprivileged user itself. On this machine /dev/fuse is 0600
and the venv's interpreter lives under /root, so only root can mount.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zfs_ram.testing import MountFactory

pytestmark = [pytest.mark.mount, pytest.mark.timeout(60)]

USER = f"zfsramtest{os.getpid()}"
USER_TOOL_TIMEOUT = 30
# The system interpreter: the venv's is under /root, which the user cannot enter.
USER_PYTHON = "/usr/bin/python3"
SNIPPET_TIMEOUT = 30

# Runs as the user: performs each named action and prints {name: "OK" | result | errno name}.
PROBE = r"""
import errno, json, os, sys
actions = json.loads(sys.argv[1])
out = {}
for name, (call, args) in actions.items():
    try:
        if call == "read":
            result = open(args[0], "rb").read().decode(errors="replace")
        elif call == "write":
            fd = os.open(args[0], os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                result = os.write(fd, args[1].encode())
            finally:
                os.close(fd)
        elif call == "setxattr":
            result = os.setxattr(args[0], args[1], args[2].encode())
        else:
            result = getattr(os, call)(*args)
        out[name] = "OK" if result is None else result
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


@contextlib.contextmanager
def temporary_user(name: str) -> Iterator[pwd.struct_passwd]:
    """A system user without home directory that exists only inside the ``with`` block."""
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        timeout=USER_TOOL_TIMEOUT,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        # useradd also made a group of the same name; userdel removes it with the user.
        subprocess.run(["userdel", name], check=True, timeout=USER_TOOL_TIMEOUT)


def _needs_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create the test user and switch to it")
    if not os.path.exists(USER_PYTHON) or shutil.which("setpriv") is None:
        pytest.skip(f"needs {USER_PYTHON} and setpriv")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd and userdel")


@pytest.fixture(scope="module")
def user() -> Iterator[pwd.struct_passwd]:
    _needs_root_and_tools()
    with temporary_user(USER) as who:
        yield who


def test_the_temporary_user_is_removed_even_after_a_failure() -> None:
    _needs_root_and_tools()
    name = f"zfsramgone{os.getpid()}"
    with pytest.raises(RuntimeError), temporary_user(name) as who:
        assert pwd.getpwnam(name).pw_uid == who.pw_uid
        raise RuntimeError("the test failed")
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    with pytest.raises(KeyError):
        grp.getgrnam(name)


def as_user(who: pwd.struct_passwd, actions: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    """Run the actions as the user; each result is "OK", a value or an errno name."""
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={who.pw_uid}",
            f"--regid={who.pw_gid}",
            "--clear-groups",
            USER_PYTHON,
            "-c",
            PROBE,
            json.dumps(actions),
        ],
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT,
        check=False,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def public_mounts(zfs_ram_mount: Any) -> Iterator[MountFactory]:
    """Like zfs_ram_mount, but under a directory every user may traverse."""
    base = Path(tempfile.mkdtemp(prefix="zfs_ram-perm-"))
    base.chmod(0o755)
    factory = MountFactory(base)
    try:
        yield factory
    finally:
        problems = factory.finish()
        for mount in factory.mounts:  # only empty directories and logs: never into a mount
            if not os.path.ismount(mount.path):
                mount.path.rmdir()
            mount.log_path.unlink(missing_ok=True)
        base.rmdir()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_without_allow_other_the_user_is_locked_out(
    public_mounts: MountFactory, user: pwd.struct_passwd
) -> None:
    mount = public_mounts("size=8m")
    (mount.path / "f").write_text("root's")
    got = as_user(
        user,
        {
            "stat": ("stat", [str(mount.path)]),
            "list": ("listdir", [str(mount.path)]),
            "read": ("read", [str(mount.path / "f")]),
            "stats": ("read", [str(mount.control / "mm_stat")]),
        },
    )
    assert got == {"stat": "EACCES", "list": "EACCES", "read": "EACCES", "stats": "EACCES"}


def test_with_allow_other_the_kernel_enforces_modes_and_the_sticky_bit(
    public_mounts: MountFactory, user: pwd.struct_passwd
) -> None:
    mount = public_mounts("size=8m,allow_other,xattr")
    mnt = mount.path
    assert stat.S_IMODE(mnt.stat().st_mode) == 0o1777  # tmpfs's default root
    (mnt / "rootfile").write_text("root's")
    (mnt / "rootfile").chmod(0o644)
    (mnt / "private").mkdir(mode=0o700)
    (mnt / "shared").mkdir(mode=0o755)
    (mnt / "open").write_text("anyone")
    (mnt / "open").chmod(0o666)
    got = as_user(
        user,
        {
            "read": ("read", [str(mnt / "rootfile")]),
            "write": ("write", [str(mnt / "rootfile"), "x"]),
            "unlink": ("unlink", [str(mnt / "rootfile")]),
            "rename": ("rename", [str(mnt / "rootfile"), str(mnt / "taken")]),
            "chmod": ("chmod", [str(mnt / "rootfile"), 0o666]),
            "chown": ("chown", [str(mnt / "rootfile"), user.pw_uid, -1]),
            "utime": ("utime", [str(mnt / "rootfile")]),
            "setxattr": ("setxattr", [str(mnt / "rootfile"), "user.x", "1"]),
            "private": ("listdir", [str(mnt / "private")]),
            "in_755_dir": ("write", [str(mnt / "shared" / "x"), "x"]),
            "write_666": ("write", [str(mnt / "open"), "mine"]),
            "unlink_666": ("unlink", [str(mnt / "open")]),  # sticky: not the owner
            "create": ("write", [str(mnt / "mine"), "mine"]),
            "chmod_own": ("chmod", [str(mnt / "mine"), 0o600]),
        },
    )
    assert got == {
        "read": "root's",
        "write": "EACCES",
        "unlink": "EPERM",
        "rename": "EPERM",
        "chmod": "EPERM",
        "chown": "EPERM",
        "utime": "EACCES",
        "setxattr": "EACCES",
        "private": "EACCES",
        "in_755_dir": "EACCES",
        "write_666": 4,
        "unlink_666": "EPERM",
        "create": 4,
        "chmod_own": "OK",
    }
    assert (mnt / "rootfile").read_text() == "root's"
    assert (mnt / "open").read_text() == "minene"  # four bytes over "anyone"
    assert not (mnt / "shared" / "x").exists() and not (mnt / "taken").exists()
    mine = (mnt / "mine").stat()
    assert (mine.st_uid, mine.st_gid) == (user.pw_uid, user.pw_gid)
    assert stat.S_IMODE(mine.st_mode) == 0o600
    # The owner may delete in the sticky directory; so may root.
    assert as_user(user, {"unlink": ("unlink", [str(mnt / "mine")])}) == {"unlink": "OK"}
    os.unlink(mnt / "open")


def test_a_write_by_another_user_clears_setuid_and_group_exec_setgid(
    public_mounts: MountFactory, user: pwd.struct_passwd
) -> None:
    mount = public_mounts("size=8m,allow_other")
    mnt = mount.path
    modes = {
        "suid": 0o4777,
        "sgid": 0o2777,
        "both": 0o6777,
        "trunc": 0o4777,
        "plain": 0o777,
        "sgid_noexec": 0o2666,
    }
    for name, mode in modes.items():
        (mnt / name).write_text("data")
        (mnt / name).chmod(mode)
    got = as_user(
        user,
        {
            "suid": ("write", [str(mnt / "suid"), "x"]),
            "sgid": ("write", [str(mnt / "sgid"), "x"]),
            "both": ("write", [str(mnt / "both"), "x"]),
            "trunc": ("truncate", [str(mnt / "trunc"), 0]),
            "plain": ("write", [str(mnt / "plain"), "x"]),
            # Not group-executable: tmpfs still clears setgid for a writer outside the group.
            "sgid_noexec": ("write", [str(mnt / "sgid_noexec"), "x"]),
        },
    )
    assert got == {"suid": 1, "sgid": 1, "both": 1, "trunc": "OK", "plain": 1, "sgid_noexec": 1}
    after = {name: stat.S_IMODE((mnt / name).stat().st_mode) for name in modes}
    assert after == {
        "suid": 0o777,
        "sgid": 0o777,
        "both": 0o777,
        "trunc": 0o777,
        "plain": 0o777,
        "sgid_noexec": 0o666,
    }
    # Root's own write keeps the bits (CAP_FSETID), as on tmpfs.
    (mnt / "rootsuid").write_text("data")
    (mnt / "rootsuid").chmod(0o4755)
    with open(mnt / "rootsuid", "a") as f:
        f.write("more")
    assert stat.S_IMODE((mnt / "rootsuid").stat().st_mode) == 0o4755


def test_only_the_mount_owner_may_write_control_files_but_anyone_may_read(
    public_mounts: MountFactory, user: pwd.struct_passwd
) -> None:
    mount = public_mounts("size=8m,mem_limit=16m,allow_other")
    ctl = mount.control
    got = as_user(
        user,
        {
            "mm_stat": ("read", [str(ctl / "mm_stat")]),
            "stats": ("read", [str(ctl / "stats.json")]),
            "classes": ("read", [str(ctl / "classes")]),
            "mem_limit": ("read", [str(ctl / "mem_limit")]),
            "pid": ("read", [str(ctl / "pid")]),
            "compact": ("write", [str(ctl / "compact"), "1"]),
            "set_limit": ("write", [str(ctl / "mem_limit"), "0"]),
            "reset_max": ("write", [str(ctl / "mem_used_max"), "0"]),
        },
    )
    assert len(got["mm_stat"].split()) == 9
    assert json.loads(got["stats"])["pid"] == mount.pid
    assert "obj_allocated" in got["classes"]
    assert got["mem_limit"].strip() == str(16 << 20)
    assert int(got["pid"]) == mount.pid
    assert (got["compact"], got["set_limit"], got["reset_max"]) == ("EACCES",) * 3
    assert (ctl / "mem_limit").read_text().strip() == str(16 << 20)  # unchanged
    runs = mount.stats()["compactor"]["runs"]
    (ctl / "compact").write_text("1")  # the owner (root) may
    assert mount.stats()["compactor"]["runs"] == runs + 1
