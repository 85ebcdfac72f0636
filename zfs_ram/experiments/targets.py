"""Where the workload runs: a zfs_ram mount, or the kernel's zram with ext4 on top.

A Target is a context manager: entering creates a fresh, empty filesystem (mount or zram
device) and leaves ``root`` pointing at it; leaving always tears it down, whatever happened.
While it is up, ``mm_stat()`` reads zram's nine-column memory statistics, ``compact()`` asks
for compaction now, ``after_delete()`` makes deletions visible to the allocator (fstrim on
ext4), ``run_step()`` carries out one of the arm's steps after the fill (``steps``: zram's
idle, recompress, writeback), and ``rss_bytes()`` gives the memory the process holding the data
really uses.

The kernel arm only ever touches the zram device it created with hot_add.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from types import TracebackType
from typing import Any

from zfs_ram.client import COMPACT_TIMEOUT, ControlClient
from zfs_ram.experiments.arms import Step
from zfs_ram.mounts import locate
from zfs_ram.vocabulary import MM_STAT_FIELDS, ControlFile, parse_mm_stat

MIB = 1 << 20

ZRAM_CONTROL = "/sys/class/zram-control"
# Time allowed for one mount, unmount or mkfs before we call it hung.
COMMAND_TIMEOUT = 60.0
# The kernel arm's device: room for the data, ext4's metadata and the journal.
KERNEL_DISK_FACTOR = 3
KERNEL_DISK_MIN = 256 * MIB
# A zfs_ram mount's size= limit, relative to the workload (the fill must never hit ENOSPC).
ZFS_RAM_SIZE_FACTOR = 2
ZFS_RAM_SIZE_MIN = 64 * MIB
# How long a sample waits for the RELEASEs of the files just closed (ZfsRamTarget.after_delete).
PENDING_WAIT_SECONDS = 2.0
# An arm's step after the fill (recompressing or writing back every page) may take minutes on
# the pure-Python engine at the default 200 MiB: far longer than a compaction.
STEP_TIMEOUT = 600.0
# Replaced in an arm's mount options by the run's temporary directory (see arms.py).
TMPDIR_PLACEHOLDER = "{tmpdir}"


@dataclass(frozen=True)
class MmStat:
    """zram's mm_stat columns (the first five in bytes, the rest counts), typed.

    The attributes are vocabulary.MM_STAT_FIELDS, in its order (checked below): the columns are
    matched to names there, never here.
    """

    orig_data_size: int
    compr_data_size: int
    mem_used_total: int
    mem_limit: int
    mem_used_max: int
    same_pages: int
    pages_compacted: int
    huge_pages: int
    huge_pages_since: int

    @classmethod
    def parse(cls, line: str) -> MmStat:
        """Parse one mm_stat line; older kernels print fewer columns (missing ones are 0)."""
        return cls.from_dict(parse_mm_stat(line, exact=False))

    @classmethod
    def from_dict(cls, columns: dict[str, int]) -> MmStat:
        """From columns by name (ControlClient.mm_stat()); missing ones are 0."""
        return cls(**{name: columns.get(name, 0) for name in MM_STAT_FIELDS})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


if tuple(f.name for f in fields(MmStat)) != MM_STAT_FIELDS:
    raise RuntimeError("MmStat's attributes are not vocabulary.MM_STAT_FIELDS in order")


# Signals that stop the experiment; held back while a target is taken down (see below).
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block is done, then let them through.

    A teardown cut short by Ctrl-C (its umount killed half-way) would leave a mount or a zram
    device behind. The signals are blocked in this thread, which the commands the block runs
    inherit (Ctrl-C reaches every process of the terminal's group), and a signal that another
    thread takes meanwhile is caught by a handler that only notes it; after the block it is
    raised again for the handler that was there before. Only teardown runs under it: a daemon
    started with the signals blocked would inherit the mask.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: noted.append(signum)) for sig in STOP_SIGNALS
    }
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a blocked one is noted now, or
        for sig, handler in previous.items():  # handled by its own handler once it is back
            if handler is not None:  # None: not set from Python, cannot be put back
                signal.signal(sig, handler)
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)


def _run(cmd: list[str], timeout: float = COMMAND_TIMEOUT) -> None:
    """Run a command, raising with its stderr if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _write_sys(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_rss(pid: int) -> int | None:
    """VmRSS of a process in bytes, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Target:
    """A fresh filesystem for one run of the workload."""

    name: str = "target"
    direct_io: bool = False  # open files O_DIRECT during the fill
    root: str = ""
    steps: tuple[Step, ...] = ()  # control-file writes after the fill (runner's "tier" stage)

    def __enter__(self) -> Target:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with stop_signals_deferred():
            self._teardown()

    def _teardown(self) -> None:
        """Take the filesystem down; also called when __enter__ fails half-way."""
        raise NotImplementedError

    def mm_stat(self) -> MmStat:
        raise NotImplementedError

    def compact(self) -> None:
        raise NotImplementedError

    def after_delete(self) -> None:
        """Make deletions reach the allocator (sync; subclasses add fstrim)."""
        os.sync()

    def run_step(self, step: Step) -> None:
        """Carry out one of ``steps``; only targets that have steps need to."""
        raise NotImplementedError(f"{self.name} has no control files for {step}")

    def rss_bytes(self) -> int | None:
        """Resident memory of the process holding the data (None: kernel memory)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def _unmount_fuse(mountpoint: str) -> None:
    """Unmount a zfs_ram mount: zfs-ram umount, then fusermount3 -u, then lazily (-z)."""
    attempts = [
        [sys.executable, "-m", "zfs_ram", "umount", mountpoint],
        ["fusermount3", "-u", mountpoint],
        ["fusermount3", "-u", "-z", mountpoint],
    ]
    for cmd in attempts:
        if not _is_mounted(mountpoint):
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(cmd, capture_output=True, timeout=COMMAND_TIMEOUT)


def _is_mounted(path: str) -> bool:
    """Whether something is mounted on ``path``, from the mount table: the mountpoint itself
    is answered by the daemon, which may hang."""
    return locate(path).is_mountpoint


class ZfsRamTarget(Target):
    """A zfs_ram mount on a temporary directory, via ``python -m zfs_ram mount``."""

    def __init__(
        self,
        pool: str = "zsmalloc",
        compact: str = "auto",
        size_bytes: int = 0,
        name: str | None = None,
        extra_options: str = "",
        log_path: str | None = None,
        steps: tuple[Step, ...] = (),
    ) -> None:
        self.pool = pool
        self.compact_mode = compact
        self.size_bytes = size_bytes
        self.name = name or f"{pool}-{compact}"
        self.extra_options = extra_options
        self.steps = steps
        self.log_path = log_path  # the daemon's log (-o log=), kept after the run
        self.tmpdir = ""
        self.pid: int | None = None
        self.client: ControlClient | None = None

    def options(self) -> str:
        size = max(ZFS_RAM_SIZE_MIN, ZFS_RAM_SIZE_FACTOR * self.size_bytes)
        opts = f"size={size},pool={self.pool},compact={self.compact_mode}"
        if self.log_path is not None:
            opts += f",log={os.path.abspath(self.log_path)}"
        extra = self.extra_options.replace(TMPDIR_PLACEHOLDER, self.tmpdir or TMPDIR_PLACEHOLDER)
        return f"{opts},{extra}" if extra else opts

    def __enter__(self) -> ZfsRamTarget:
        self.tmpdir = tempfile.mkdtemp(prefix="zfs_ram-exp-")
        self.root = os.path.join(self.tmpdir, "mnt")
        os.mkdir(self.root)
        try:
            cmd = [sys.executable, "-m", "zfs_ram", "mount", self.root, "-o", self.options()]
            _run(cmd)
            self.client = ControlClient(self.root)
            self.pid = self.client.pid()
        except BaseException:
            with stop_signals_deferred():
                self._teardown()
            raise
        return self

    def _teardown(self) -> None:
        self.client = None
        if self.root:
            _unmount_fuse(self.root)
        if self.tmpdir and not _is_mounted(self.root):
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _client(self) -> ControlClient:
        if self.client is None:
            raise RuntimeError(f"{self.name} is not mounted")
        return self.client

    def mm_stat(self) -> MmStat:
        return MmStat.from_dict(self._client().mm_stat())

    def compact(self) -> None:
        # The write alone (not ControlClient.compact(), which also reads mm_stat before and
        # after): the compact stage times exactly the compaction.
        self._client().write(ControlFile.COMPACT, "1\n", timeout=COMPACT_TIMEOUT)

    def run_step(self, step: Step) -> None:
        self._client().write(step.control_file, step.text, timeout=STEP_TIMEOUT)

    def after_delete(self) -> None:
        """Also wait (up to PENDING_WAIT_SECONDS) for the pages left pending to be stored: the
        kernel sends a closed file's RELEASE without waiting for it, so the RELEASEs of the
        last files written may come after the next request, and their unfinished last pages
        would then be missing from a sample taken at once."""
        super().after_delete()
        deadline = time.monotonic() + PENDING_WAIT_SECONDS
        while self._client().stats()["store"]["pending_pages"] and time.monotonic() < deadline:
            time.sleep(0.01)

    def rss_bytes(self) -> int | None:
        return None if self.pid is None else _read_rss(self.pid)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "zfs_ram",
            "options": self.options(),
            "steps": [str(s) for s in self.steps],
        }


def kernel_zram_available() -> str | None:
    """None if the kernel arm can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists(os.path.join(ZRAM_CONTROL, "hot_add")):
        return f"no {ZRAM_CONTROL}/hot_add (zram module not loaded?)"
    for tool in ("mkfs.ext4", "fstrim", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


class KernelZramTarget(Target):
    """A zram device of our own (hot_add), lz4, ext4 mounted with -o discard.

    Mirrors the research measurement (zsmalloc-kernel.md 2.1): O_DIRECT writes, and
    sync + fstrim after deleting so zram frees the deleted blocks.
    """

    direct_io = True

    def __init__(self, size_bytes: int, name: str = "kernel-zram") -> None:
        self.name = name
        self.disksize = max(KERNEL_DISK_MIN, KERNEL_DISK_FACTOR * size_bytes)
        self.disksize = -(-self.disksize // MIB) * MIB
        self.device: int | None = None
        self.tmpdir = ""

    @property
    def sysdir(self) -> str:
        return f"/sys/block/zram{self.device}"

    def __enter__(self) -> KernelZramTarget:
        reason = kernel_zram_available()
        if reason is not None:
            raise RuntimeError(f"kernel zram arm unavailable: {reason}")
        with open(os.path.join(ZRAM_CONTROL, "hot_add")) as f:
            self.device = int(f.read().strip())
        try:
            _write_sys(f"{self.sysdir}/comp_algorithm", "lz4")
            _write_sys(f"{self.sysdir}/disksize", str(self.disksize))
            dev = f"/dev/zram{self.device}"
            for _ in range(50):  # udev may take a moment to create the node
                if os.path.exists(dev):
                    break
                time.sleep(0.1)
            _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
            self.tmpdir = tempfile.mkdtemp(prefix="zfs_ram-exp-zram-")
            self.root = os.path.join(self.tmpdir, "mnt")
            os.mkdir(self.root)
            _run(["mount", "-o", "discard", dev, self.root])
        except BaseException:
            with stop_signals_deferred():
                self._teardown()
            raise
        return self

    def _teardown(self) -> None:
        """Unmount, reset and remove our device; every step runs even if one fails."""
        if self.root and _is_mounted(self.root):
            for cmd in (["umount", self.root], ["umount", "-l", self.root]):
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    subprocess.run(cmd, capture_output=True, timeout=COMMAND_TIMEOUT)
                if not _is_mounted(self.root):
                    break
        if self.tmpdir and not (self.root and _is_mounted(self.root)):
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.device is not None:
            with contextlib.suppress(OSError):
                _write_sys(f"{self.sysdir}/reset", "1")
            for _ in range(20):  # a lazy unmount may hold the device a little longer
                try:
                    _write_sys(os.path.join(ZRAM_CONTROL, "hot_remove"), str(self.device))
                    break
                except OSError:
                    time.sleep(0.25)
            self.device = None

    def mm_stat(self) -> MmStat:
        with open(f"{self.sysdir}/mm_stat") as f:
            return MmStat.parse(f.read())

    def compact(self) -> None:
        _write_sys(f"{self.sysdir}/compact", "1")

    def after_delete(self) -> None:
        os.sync()
        _run(["fstrim", self.root])
        os.sync()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "kernel",
            "device": f"zram{self.device}" if self.device is not None else None,
            "disksize": self.disksize,
            "kernel": os.uname().release,
        }


def read_vmstat(
    keys: tuple[str, ...] = ("drop_slab", "pgscan_kswapd", "pgscan_direct"),
) -> dict[str, int]:
    """Counters that reveal a shrinker run (which compacts every zram pool behind our back)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/vmstat") as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name in keys:
                out[name] = int(value)
    return out
