"""Faults inside the daemon: a bug in one request must not take the mount down.

The Operations layer is driven directly (as in test_operations.py) with a page-store method
that fails once: any exception becomes EIO for that request only, and the next request works;
a PoolCorruptionError also switches the filesystem to read-only (EROFS for every change,
reads still served). On a real mount: a stopped daemon resumes without losing a byte, and a
killed one leaves ENOTCONN, not a hang (the unmount after SIGKILL and SIGTERM/SIGINT during
writes are in test_cli.py).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pyfuse3
import pytest
import trio

from zfs_ram.daemon.stack import build
from zfs_ram.fs.config import FsConfig
from zfs_ram.fs.operations import ROOT_INODE, ZfsRamOperations
from zfs_ram.pool import PoolCorruptionError
from zfs_ram.testing.ops import Ctx, Fields
from zfs_ram.vocabulary import PAGE_SIZE

CTX = Ctx()
DATA = b"zfs_ram fault test " * 1000  # a few compressible pages


def run(fn: Callable[[ZfsRamOperations], Coroutine[Any, Any, None]]) -> None:
    filesystem = build(FsConfig(xattrs=True))  # xattrs on: setxattr is one of the changes

    async def main() -> None:
        try:
            await fn(filesystem.operations)
        finally:
            filesystem.shutdown()

    trio.run(main)


def fail_once(obj: object, name: str, error: BaseException) -> list[int]:
    """Make obj.name raise `error` on its next call only; returns a list counting calls."""
    real = getattr(obj, name)
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    setattr(obj, name, wrapper)
    return calls


async def errno_of(request: Coroutine[Any, Any, Any]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        await request
    return excinfo.value.errno


async def new_file(ops: ZfsRamOperations, name: bytes = b"f") -> tuple[int, int]:
    info, attrs = await ops.create(ROOT_INODE, name, 0o644, os.O_RDWR, CTX)
    assert await ops.write(info.fh, 0, DATA) == len(DATA)
    return info.fh, attrs.st_ino


async def truncate(ops: ZfsRamOperations, ino: int, size: int) -> None:
    attrs = await ops.getattr(ino, CTX)
    attrs.st_size = size
    await ops.setattr(ino, attrs, Fields(update_size=True), None, CTX)


@pytest.mark.parametrize("method", ["read", "write", "truncate"])
def test_a_bug_in_one_request_is_eio_and_the_next_request_works(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await new_file(ops)
        calls = fail_once(ops.store, method, RuntimeError("injected bug"))
        request = {
            "read": lambda: ops.read(fh, 0, 100),
            "write": lambda: ops.write(fh, 5, b"new"),
            "truncate": lambda: truncate(ops, ino, 7),
        }[method]
        assert await errno_of(request()) == errno.EIO
        assert calls == [1]
        # The failed request changed nothing, and the same request now succeeds.
        assert await ops.read(fh, 0, len(DATA) + 10) == DATA
        before = len(calls)
        await request()
        assert len(calls) == before + 1
        assert ops.namespace.read_only_reason is None
        fh2, _ = await new_file(ops, b"g")  # writes still allowed
        assert await ops.read(fh2, 0, 10) == DATA[:10]
        ops.store.pool.check()

    with caplog.at_level("ERROR"):
        run(body)
    handler = "setattr" if method == "truncate" else method
    assert "injected bug" in caplog.text and f"request {handler} failed" in caplog.text


def test_pool_corruption_makes_the_filesystem_read_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await new_file(ops)
        dir_attrs = await ops.mkdir(ROOT_INODE, b"d", 0o755, CTX)
        fail_once(ops.store, "read", PoolCorruptionError("injected: bad handle"))
        assert await errno_of(ops.read(fh, 0, 100)) == errno.EIO
        assert (
            ops.namespace.read_only_reason is not None
            and "injected: bad handle" in ops.namespace.read_only_reason
        )
        assert (
            ops.control.statistics.stats()["fs"]["read_only_reason"]
            == ops.namespace.read_only_reason
        )
        # Every change is refused from now on ...
        changes: list[Callable[[], Coroutine[Any, Any, Any]]] = [
            lambda: ops.write(fh, 0, b"x"),
            lambda: truncate(ops, ino, 0),
            lambda: ops.create(ROOT_INODE, b"new", 0o644, os.O_RDWR, CTX),
            lambda: ops.mkdir(ROOT_INODE, b"d2", 0o755, CTX),
            lambda: ops.unlink(ROOT_INODE, b"f", CTX),
            lambda: ops.rmdir(ROOT_INODE, b"d", CTX),
            lambda: ops.rename(ROOT_INODE, b"f", ROOT_INODE, b"f2", 0, CTX),
            lambda: ops.link(ino, ROOT_INODE, b"f3", CTX),
            lambda: ops.symlink(ROOT_INODE, b"s", b"f", CTX),
            lambda: ops.setxattr(ino, b"user.a", b"1", CTX),
        ]
        for change in changes:
            assert await errno_of(change()) == errno.EROFS
        # ... and nothing changed; reads still work (the data may still be good).
        assert await ops.read(fh, 0, len(DATA) + 1) == DATA
        assert (await ops.getattr(ino, CTX)).st_size == len(DATA)
        assert (await ops.lookup(ROOT_INODE, b"d", CTX)).st_ino == dir_attrs.st_ino
        assert (await ops.lookup(ROOT_INODE, b"new", CTX)).st_ino == 0  # not created
        await ops.release(fh)

    with caplog.at_level("CRITICAL"):
        run(body)
    assert "read-only" in caplog.text


def test_corruption_seen_while_storing_a_page_also_goes_read_only() -> None:
    """The corruption may surface in a write (the pool fails while storing a page)."""

    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await new_file(ops)
        fail_once(ops.store.pool, "store", PoolCorruptionError("injected in store"))
        assert await errno_of(ops.write(fh, 3 * PAGE_SIZE, os.urandom(PAGE_SIZE))) == errno.EIO
        assert ops.namespace.read_only_reason is not None
        assert await errno_of(ops.write(fh, 0, b"y")) == errno.EROFS
        assert await ops.read(fh, 0, 20) == DATA[:20]

    run(body)


def test_forget_never_raises() -> None:
    async def body(ops: ZfsRamOperations) -> None:
        fh, ino = await new_file(ops)
        await ops.release(fh)
        ops.forget([(ino, 10**9), (999_999, 1), (ROOT_INODE, 5), (ino, 1)])
        fail_once(ops.namespace, "forget", RuntimeError("injected in forget"))
        ops.forget([(ino, 1)])  # logged, not raised: pyfuse3 would end the mount
        assert (await ops.getattr(ROOT_INODE, CTX)).st_mode & stat.S_IFDIR

    run(body)


# ---- real mounts


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_stopped_daemon_resumes_and_loses_nothing(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=64m")
    data = os.urandom(1 << 20) + DATA * 20
    done: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(8):
                (mount.path / f"w{i}").write_bytes(data)
                done.append(i)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=writer)
    thread.start()
    os.kill(mount.pid, signal.SIGSTOP)
    time.sleep(0.5)  # the writer blocks in the kernel meanwhile
    os.kill(mount.pid, signal.SIGCONT)
    thread.join(30)
    assert not thread.is_alive() and not errors, errors
    assert done == list(range(8))
    for i in range(8):
        assert (mount.path / f"w{i}").read_bytes() == data


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_killed_daemon_gives_enotconn_not_a_hang(zfs_ram_mount: Any) -> None:
    mount = zfs_ram_mount("size=64m")
    (mount.path / "f").write_bytes(DATA)
    os.kill(mount.pid, signal.SIGKILL)
    mount.process.wait(10)
    with pytest.raises(OSError) as excinfo:
        (mount.path / "f").read_bytes()
    assert excinfo.value.errno == errno.ENOTCONN
    problems = mount.finish()  # the fixture's teardown, run here to check what it says
    assert any("exited with status -9 while still mounted" in p for p in problems), problems
    assert not os.path.ismount(mount.path)
