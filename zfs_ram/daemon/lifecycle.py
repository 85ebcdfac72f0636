"""Mount lifecycle: check, mount, go to the background once ready, serve, unmount.

The order is s3ql's (mount first, then daemonize, so mount errors reach the terminal) plus the
readiness handshake of libfuse 3.19's fuse_daemonize_early_*:

1. Check what can be checked without mounting: options, the mountpoint (missing, not a
   directory, not empty, already a mount point), /dev/fuse. Each failure is one MountError line.
2. Block SIGINT, SIGTERM and SIGHUP. A signal arriving between the mount and the moment trio's
   signal receiver exists would otherwise kill the process and leave a dead mount ("Transport
   endpoint is not connected"); blocked, it stays pending and is delivered to the receiver.
3. ``pyfuse3.init`` mounts. The kernel queues FUSE_INIT; nobody can use the mount until the
   main loop answers it.
4. Background mode forks. The parent waits on a pipe until the child writes ``ok`` (FUSE_INIT
   handled, ``operations.ready`` set) and exits 0, or prints the child's error line and exits 1 if
   the child reports an error, dies or stays silent for READY_TIMEOUT. The child calls setsid,
   points stdio at /dev/null (or ``-o log=PATH``) and serves.
5. Serving is one trio nursery: a signal watcher that turns SIGINT/SIGTERM/SIGHUP into
   ``pyfuse3.terminate()``, the background compactor, the readiness notifier, and
   ``pyfuse3.main()``. An unmount from outside (fusermount3 -u, umount) also ends main().
6. After main() returns: cancel the nursery, ``Filesystem.shutdown()``, unmount if still mounted,
   exit 0.

Under systemd (Type=notify, ``zfs-ram mount -f``) readiness and stopping are also announced
through $NOTIFY_SOCKET.

If the filesystem crashes (main() raises) after the mount was ready, the mount is left in place,
dead, as borg and s3ql do: an empty directory in its place could make a running rsync or backup
conclude that every file was deleted. ``zfs-ram umount`` (fusermount3 -u) removes it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from zfs_ram import native
from zfs_ram.daemon.options import MountOptions, OptionError, parse_options
from zfs_ram.fs.config import FsConfig
from zfs_ram.mounts import MountInfo, find_mount, fusermount, is_alive, locate, read_mounts

__all__ = [
    "MountError",
    "MountInfo",
    "check_fuse_device",
    "check_mountpoint",
    "find_mount",
    "is_alive",
    "mount",
    "read_mounts",
    "resolve",
]

log = logging.getLogger(__name__)

# How long the background parent waits for the child to answer FUSE_INIT. Building the pool and
# answering INIT takes milliseconds; 30 s only guards against a wedged child.
READY_TIMEOUT = 30.0
# The signals that end the daemon cleanly (unmount, exit 0). SIGHUP too: a foreground daemon
# whose terminal closes should not leave a dead mount (in the background, setsid shields it).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Written by the child on the readiness pipe once FUSE_INIT was handled.
READY_WORD = b"ok\n"
FUSE_DEVICE = "/dev/fuse"
# A mountpoint inside another zfs_ram mount is looked at through that mount's daemon, which
# may be stopped: its stat and listing are given this long.
INSIDE_MOUNT_TIMEOUT = 3.0
BDI_DIR = "/sys/class/bdi"  # one directory per backing device, FUSE mounts included
LOG_FORMAT = "%(asctime)s zfs_ram[%(process)d] %(levelname)s %(name)s: %(message)s"


class MountError(Exception):
    """Mounting cannot go ahead. ``str()`` is one line for the user."""


class Served(Protocol):
    """What the lifecycle serves (zfs_ram.daemon.stack.Filesystem): the pyfuse3 Operations,
    whose ``ready`` event is set once FUSE_INIT was handled, and the mount's background work."""

    @property
    def operations(self) -> Any: ...

    async def run_background(self) -> None: ...

    def shutdown(self) -> None: ...


def resolve(mountpoint: str) -> str:
    """Absolute path, symlinks resolved outside zfs_ram mounts. Never stats inside one."""
    return locate(mountpoint).path


def check_mountpoint(mountpoint: str) -> str:
    """Return the resolved mountpoint, or raise MountError saying why it cannot be used."""
    where = locate(mountpoint)
    path = where.path
    if where.is_mountpoint:
        assert where.mount is not None
        raise MountError(_already_mounted(mountpoint, where.mount))
    if where.zfs_ram is not None:  # inside a zfs_ram mount: its daemon may not answer
        from zfs_ram.client import NoAnswer, bounded

        try:
            bounded(lambda: os.listdir(path), INSIDE_MOUNT_TIMEOUT, path)
        except NoAnswer:
            raise MountError(
                f"cannot use mountpoint {mountpoint}: the zfs_ram daemon of"
                f" {where.zfs_ram.mountpoint} does not answer (stopped or hung)"
            ) from None
        except OSError:
            pass  # said below, with the reason
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as e:
        raise MountError(f"cannot use mountpoint {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    try:
        entries = os.listdir(path)
    except OSError as e:
        raise MountError(f"cannot read mountpoint {mountpoint}: {e.strerror}") from None
    if entries:
        raise MountError(f"mountpoint {mountpoint} is not empty")
    return path


# A live daemon answers its pid file at once; this only tells dead from alive for a message.
_PROBE_TIMEOUT = 1.0


def _already_mounted(mountpoint: str, existing: MountInfo) -> str:
    """The "already a mount point" line, with what to do about a zfs_ram mount there."""
    if not existing.is_zfs_ram:
        return f"{mountpoint} is already a mount point ({existing.fstype})"
    from zfs_ram.client import ControlClient, ControlError, DaemonGone, NoAnswer

    try:
        ControlClient(existing.mountpoint, timeout=_PROBE_TIMEOUT).pid()
    except DaemonGone:
        return (
            f"{mountpoint} is already a mount point ({existing.fstype}, its daemon is dead);"
            f" remove it with 'zfs-ram umount {mountpoint}'"
        )
    except NoAnswer:
        return (
            f"{mountpoint} is already a mount point ({existing.fstype}, its daemon does not"
            f" answer); remove it with 'zfs-ram umount {mountpoint}'"
        )
    except ControlError:
        pass
    return (
        f"{mountpoint} is already a mount point ({existing.fstype});"
        f" unmount it first with 'zfs-ram umount {mountpoint}'"
    )


def check_fuse_device(device: str = FUSE_DEVICE) -> None:
    """Raise MountError if the FUSE device cannot be opened (missing module, container)."""
    try:
        fd = os.open(device, os.O_RDWR)
    except FileNotFoundError:
        raise MountError(
            f"{device} does not exist (load the fuse module; containers need --device {device})"
        ) from None
    except OSError as e:
        raise MountError(f"cannot open {device}: {e.strerror}") from None
    os.close(fd)


def _build_filesystem(config: FsConfig) -> Served:
    from zfs_ram.daemon.stack import build

    return build(config)


def setup_logging(debug: bool) -> None:
    """Log to stderr: the terminal in the foreground, the log file or /dev/null in the back."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format=LOG_FORMAT, force=True
    )


def mount(
    mountpoint: str,
    options: str = "",
    *,
    foreground: bool = False,
    debug: bool = False,
    build_filesystem: Callable[[FsConfig], Served] = _build_filesystem,
) -> int:
    """Mount zfs_ram and serve it until unmounted. Returns the exit status.

    In the background the calling process exits (os._exit) once the mount is ready or failed;
    only the daemon returns from here. Raises MountError for anything found before mounting.
    """
    import pyfuse3  # imported here so option parsing and the CLI work without libfuse

    foreground = foreground or debug
    try:
        parsed = parse_options(options)
    except OptionError as e:
        raise MountError(str(e)) from None
    path = check_mountpoint(mountpoint)
    check_fuse_device()
    fuse_options = set(parsed.fuse_options)
    if debug:
        fuse_options.add("debug")  # libfuse prints every request and reply to stderr
    log_fd = _open_log(parsed)

    setup_logging(debug)
    faulthandler.enable()
    with contextlib.suppress(ValueError, RuntimeError):  # not on the main thread (tests)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # dump stacks of a hung daemon
    log.debug("options: fuse=%s ignored=%s", sorted(fuse_options), parsed.ignored)

    try:
        served = build_filesystem(parsed.config)
    except Exception as e:
        log.debug("setting up the file system failed", exc_info=True)  # shown with -d
        raise MountError(f"cannot set up the file system: {type(e).__name__}: {e}") from None
    assert isinstance(served.operations, pyfuse3.Operations), "needs pyfuse3.Operations"
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pyfuse3.init(served.operations, path, fuse_options)
    except RuntimeError as e:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        raise MountError(f"mounting {mountpoint} failed: {e}") from None
    mounted = find_mount(path)
    mount_id = mounted.mount_id if mounted is not None else None

    if foreground:
        if log_fd is not None:
            _redirect_stdio(log_fd, keep_stdin=True)
        return _serve_mounted(served, path, mount_id, parsed, notify_fd=None)

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:  # the parent: wait for the child's word, then leave without touching the mount
        os.close(write_fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        status = _wait_ready(pid, read_fd, path, mount_id)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    os.close(read_fd)
    os.setsid()  # leave the terminal's session: no SIGHUP/SIGINT from the shell
    os.chdir("/")  # do not keep the caller's directory (maybe another mount) busy
    _redirect_stdio(log_fd if log_fd is not None else os.open(os.devnull, os.O_WRONLY))
    return _serve_mounted(served, path, mount_id, parsed, notify_fd=write_fd)


def set_read_ahead(mounted: MountInfo, kib: int) -> bool:
    """Raise the kernel's read-ahead for the new mount to `kib`, if this process may.

    FUSE's INIT reply can only lower it below the kernel's 128 KiB default, and the kernel
    applies the reply when INIT is answered, so this runs after. Only root can raise it,
    through the mount's backing device (/sys/class/bdi/MAJOR:MINOR, as for a block device).
    Without that right the mount works as before, with eight READ requests where one would
    do, and the log says so.
    """
    knob = os.path.join(BDI_DIR, f"{mounted.major}:{mounted.minor}", "read_ahead_kb")
    try:
        with open(knob, "w") as f:
            f.write(f"{kib}\n")
    except OSError as e:
        log.info("read-ahead stays the kernel's: cannot write %s: %s", knob, e.strerror)
        return False
    log.debug("read-ahead set to %d KiB (%s)", kib, knob)
    return True


def _open_log(parsed: MountOptions) -> int | None:
    """Open ``-o log=PATH`` now, so a bad path is reported before mounting."""
    if parsed.log_path is None:
        return None
    try:
        return os.open(parsed.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise MountError(f"cannot open log file {parsed.log_path}: {e.strerror}") from None


def _redirect_stdio(out_fd: int, *, keep_stdin: bool = False) -> None:
    """Point stdout and stderr (and stdin, unless kept) away from the caller's terminal or pipe.

    A daemon that kept the caller's stdout open would make ``$(zfs-ram mount ...)`` or a
    subprocess reading its output wait until unmount.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if not keep_stdin:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)


def _wait_ready(pid: int, read_fd: int, path: str, mount_id: int | None) -> int:
    """Parent side of the handshake: 0 once the child says ok, else report and clean up."""
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        readable, _, _ = select.select([read_fd], [], [], remaining)
        if not readable:
            break
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break  # the child closed the pipe: it died or exited
        data += chunk
    os.close(read_fd)
    if data == READY_WORD:
        return 0
    if data:
        message = data.decode(errors="replace").strip()
    elif time.monotonic() >= deadline:
        message = f"the daemon did not answer FUSE_INIT within {READY_TIMEOUT:.0f} s"
    else:
        message = "the daemon exited before the mount was ready"
    print(f"zfs-ram: mounting {path} failed: {message}", file=sys.stderr)
    _reap_or_kill(pid, timeout=0.0 if not data and time.monotonic() >= deadline else 5.0)
    _unmount_if_ours(path, mount_id, lazy=True)
    return 1


def _reap_or_kill(pid: int, timeout: float) -> None:
    """Wait for a failed child briefly, then kill it: it must not keep a half-made mount."""
    deadline = time.monotonic() + timeout
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _unmount_if_ours(path: str, mount_id: int | None, *, lazy: bool) -> None:
    """fusermount3 -u only the mount this process made, never one mounted there since."""
    current = find_mount(path)
    if current is None or mount_id is None or current.mount_id != mount_id:
        return
    fusermount(path, lazy=lazy)  # a failure leaves nothing to do here: the caller exits


def _serve_mounted(
    served: Served, path: str, mount_id: int | None, parsed: MountOptions, notify_fd: int | None
) -> int:
    """Run the FUSE main loop until unmount or signal; then shut down. Returns the exit status."""
    import pyfuse3
    import trio

    state = _ServeState(notify_fd, parsed.read_ahead_kb)
    try:
        trio.run(_serve, served, path, state)
    except BaseException as exc:  # the filesystem crashed: whatever it is, report and exit 1
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if not state.ready:  # failed before the mount was ready: nobody used it, remove it
            state.report(f"{type(exc).__name__}: {exc}".splitlines()[0])
            log.critical("the file system failed before it was ready", exc_info=True)
            current = find_mount(path)
            pyfuse3.close(unmount=current is not None and current.mount_id == mount_id)
        else:
            log.critical(
                "the file system crashed; %s stays mounted (dead) until 'zfs-ram umount'",
                path,
                exc_info=True,
            )
            pyfuse3.close(unmount=False)
        return 1
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # no KeyboardInterrupt from here on
    sd_notify("STOPPING=1")
    try:
        served.shutdown()
    except Exception:
        log.exception("dropping the inodes failed; unmounting anyway")
        status = 1
    else:
        status = 0
    current = find_mount(path)
    still_ours = current is not None and current.mount_id == mount_id
    pyfuse3.close(unmount=still_ours)
    log.info("unmounted %s", path)
    return status


class _ServeState:
    """The readiness pipe, written exactly once (ok or an error line), then closed."""

    def __init__(self, notify_fd: int | None, read_ahead_kb: int) -> None:
        self.notify_fd = notify_fd
        self.read_ahead_kb = read_ahead_kb
        self.ready = False  # FUSE_INIT was handled: from now on a crash leaves the mount

    def report(self, message: str) -> None:
        if self.notify_fd is None:
            return
        with contextlib.suppress(OSError):  # the parent died or gave up: nobody to tell
            os.write(self.notify_fd, message.encode(errors="replace") + b"\n")
        os.close(self.notify_fd)
        self.notify_fd = None


async def _serve(served: Served, path: str, state: _ServeState) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals)
        nursery.start_soon(served.run_background)
        nursery.start_soon(_announce_ready, served, path, state)
        await pyfuse3.main()
        log.debug("FUSE main loop returned")
        nursery.cancel_scope.cancel()


async def _watch_signals(task_status: Any) -> None:
    """SIGINT/SIGTERM/SIGHUP end the main loop gracefully; the mount is then removed."""
    import pyfuse3
    import trio

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        # Signals that arrived while blocked are delivered now, to this receiver.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        task_status.started()
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()


async def _announce_ready(served: Served, path: str, state: _ServeState) -> None:
    await served.operations.ready.wait()
    log.info("mounted %s (pid %d)", path, os.getpid())
    mounted = find_mount(path)
    if state.read_ahead_kb and mounted is not None:
        set_read_ahead(mounted, state.read_ahead_kb)
    for component, reason in native.reasons().items():
        log.info("%s engine: %s (%s)", component, native.engines()[component], reason)
    state.ready = True
    state.report(READY_WORD.decode().strip())
    sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=mounted {path}")


def sd_notify(message: str) -> None:
    """Tell systemd about readiness and stopping (units with Type=notify running ``-f``).

    The protocol is one datagram to $NOTIFY_SOCKET ('@' = abstract namespace); without that
    variable this does nothing, and a failure to send never disturbs the filesystem.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", address, e)
