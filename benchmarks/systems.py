"""The systems the benchmarks mount, and the helpers they share (fs_bench.py, ci_job.py).

Each System mounts one filesystem on a given empty directory and unmounts it again; the
benchmarks call unmount() in a finally block, so it must work on a half-done mount too and never
raise for a mount that is already gone. Which filesystem each one is:

  Tmpfs      kernel tmpfs (mount -t tmpfs), what zfs_ram stands in for
  ZfsRam     zfs_ram through `zfs-ram mount`, with extra mount options if given
  NullFs     benchmarks/nullfs.py, the do-nothing pyfuse3 filesystem (the ceiling)
  Lz4NullFs  nullfs.py --lz4, the ceiling plus zfs_ram's codec (the pure-Python bound)
  ZramExt4   ext4 on a zram device of its own (hot_add, lz4), mounted -o discard: the kernel's
             compressed scratch filesystem

Tmpfs and ZramExt4 need root. Nothing here measures anything: the workloads and the reports
stay in the benchmark scripts.
"""

from __future__ import annotations

import contextlib
import datetime
import mmap
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zfs_ram.client import ControlClient
from zfs_ram.daemon.lifecycle import set_read_ahead
from zfs_ram.daemon.options import DEFAULT_READ_AHEAD_KB
from zfs_ram.mounts import find_mount, locate
from zfs_ram.vocabulary import PAGE_SIZE

KIB = 1024
MIB = 1024 * KIB
HERE = Path(__file__).resolve().parent
# Inputs the benchmarks build once from this machine's files (data, tarballs) live here.
CACHE_DIR = Path(os.environ.get("ZFS_RAM_BENCH_CACHE", "/tmp/zfs_ram_bench"))
SETTLE_TIMEOUT = 15.0  # wait this long at most for zfs_ram's compactor between workloads
UNMOUNT_TRIES = 20  # fusermount3 -u retries (0.25 s apart) while a dying fio holds the mount
MADV_POPULATE_WRITE = 23  # Linux 5.14+; the mmap module of Python 3.11 does not name it
ZRAM_CONTROL = Path("/sys/class/zram-control")
ZRAM_DEVICE_WAIT = 5.0  # seconds for /dev/zramN to appear after hot_add (devtmpfs: at once)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str] | str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def is_mounted(path: Path) -> bool:
    """Whether something is mounted on ``path``, from the mount table (zfs_ram.mounts)."""
    return locate(str(path)).is_mountpoint


def command_output(*args: str) -> str:
    """A command's stripped stdout, run in benchmarks/; "" if it cannot run."""
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        return ""


def describe_run(script: str, argv: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """The machine and the commit a run was made on, then `extra`, then the command line."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "cpu": f"{cpu} x{os.cpu_count()}",
        "mem_gib": round(int(mem) / MIB, 1),
        "python": platform.python_version(),
        "commit": command_output("git", "rev-parse", "--short", "HEAD"),
        **extra,
        "command": " ".join([script, *argv]),
    }


def kernel_unmount(path: Path) -> None:
    """umount(8), or a lazy unmount if the mount is busy."""
    if subprocess.run(["umount", str(path)], check=False).returncode:
        subprocess.run(["umount", "-l", str(path)], check=False)


def warm_memory(size: int) -> None:
    """Make `size` bytes of guest memory host-backed, then free them (see fs_bench.py's module
    comment: free page reporting in a VM)."""
    if size <= 0:
        return
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as region:
        try:
            region.madvise(MADV_POPULATE_WRITE)
        except OSError:  # older kernel: touch every page instead
            for offset in range(0, size, PAGE_SIZE):
                region[offset] = 1


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    return 0


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process: what the daemon itself spent, apart from the kernel's FUSE."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the systems -----------------------------------------------------------------------------


class System:
    """A mounted filesystem under test; subclasses know how to mount, unmount and weigh it."""

    name = ""
    verifies = True  # reads give back what was written (false for nullfs)

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size_bytes = size_bytes

    def mount(self) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        raise NotImplementedError

    def pid(self) -> int | None:
        return None

    def settle(self) -> None:
        """Wait until background work caused by the previous workload is done."""

    def memory(self) -> dict[str, float]:
        return {}


class Tmpfs(System):
    name = "tmpfs"

    def mount(self) -> None:
        run(["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes}", "tmpfs", str(self.path)])

    def unmount(self) -> None:
        kernel_unmount(self.path)

    def memory(self) -> dict[str, float]:
        # df's used space of a tmpfs is exactly the Shmem it holds (its pages and nothing more).
        st = os.statvfs(self.path)
        return {"shmem_bytes": (st.f_blocks - st.f_bfree) * st.f_frsize}


class FuseSystem(System):
    def unmount(self) -> None:
        for _ in range(UNMOUNT_TRIES):
            if not is_mounted(self.path):
                return
            if (
                subprocess.run(
                    ["fusermount3", "-u", str(self.path)], check=False, stderr=subprocess.DEVNULL
                ).returncode
                == 0
            ):
                return
            time.sleep(0.25)
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)

    def memory(self) -> dict[str, float]:
        pid = self.pid()
        return {"rss_bytes": rss_bytes(pid)} if pid else {}


class ZfsRam(FuseSystem):
    name = "zfs_ram"

    def __init__(
        self, path: Path, size_bytes: int, extra_options: str = "", tool: str | None = None
    ) -> None:
        super().__init__(path, size_bytes)
        self.extra_options = extra_options
        self._pid: int | None = None
        self.tool = tool or shutil.which("zfs-ram") or str(Path(sys.executable).parent / "zfs-ram")

    def mount(self) -> None:
        options = f"size={self.size_bytes}" + (
            f",{self.extra_options}" if self.extra_options else ""
        )
        run([self.tool, "mount", str(self.path), "-o", options])
        self._pid = ControlClient(self.path).pid()

    def unmount(self) -> None:
        if is_mounted(self.path):
            subprocess.run(
                [self.tool, "umount", str(self.path)], check=False, stderr=subprocess.DEVNULL
            )
        super().unmount()

    def pid(self) -> int | None:
        return self._pid

    def stats(self) -> dict[str, Any]:
        return ControlClient(self.path).stats()

    def settle(self) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            if not self.stats()["compactor"]["running"]:
                return
            time.sleep(0.1)

    def memory(self) -> dict[str, float]:
        stats = self.stats()
        mem = super().memory()
        mem["pool_bytes"] = stats["pool"]["pages_used"] * PAGE_SIZE
        mem["orig_data_size"] = stats["mm_stat"]["orig_data_size"]
        mem["compr_data_size"] = stats["mm_stat"]["compr_data_size"]
        mem["mem_used_total"] = stats["mm_stat"]["mem_used_total"]
        return mem


class ZfsRamReference(ZfsRam):
    """zfs_ram as another checkout builds it (its venv's zfs-ram), e.g. the code before a
    change, mounted beside this one so that the two compare in one run."""

    name = "zfs_ram_ref"


class NullFs(FuseSystem):
    name = "nullfs"
    verifies = False

    extra_args: tuple[str, ...] = ()

    def __init__(self, path: Path, size_bytes: int, xattrs: bool = False) -> None:
        super().__init__(path, size_bytes)
        self.xattrs = xattrs
        self.process: subprocess.Popen[bytes] | None = None

    def mount(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "nullfs.py"), str(self.path), *self.extra_args]
            + (["--xattrs"] if self.xattrs else []),
            start_new_session=True,  # Ctrl-C goes to us; we unmount it in order
        )
        deadline = time.monotonic() + 30
        while not is_mounted(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nullfs did not mount")
            time.sleep(0.05)
        os.stat(self.path)  # the first request: FUSE_INIT is answered
        # The same kernel read-ahead as zfs_ram sets for itself (read_ahead_kb=), so that the
        # ceiling gets sequential reads in the same 1 MiB requests.
        info = find_mount(str(self.path))
        if info is not None:
            set_read_ahead(info, DEFAULT_READ_AHEAD_KB)

    def unmount(self) -> None:
        super().unmount()
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def pid(self) -> int | None:
        return self.process.pid if self.process else None


class Lz4NullFs(NullFs):
    """nullfs --lz4: the ceiling plus zfs_ram's codec on every page, and nothing else. Its
    ratio to nullfs bounds what any pure-Python filesystem that lz4-compresses each page can
    reach here, whatever its allocator and page table cost."""

    name = "lz4null"
    extra_args = ("--lz4",)


class ZramExt4(System):
    """ext4 on a zram device of our own (hot_add, lz4), mounted -o discard so that deleted
    files' blocks go back to zram at once. settle() writes ext4's dirty pages back (sync -f),
    so that its writeback does not run during the next system's workload."""

    name = "zram"

    def __init__(self, path: Path, size_bytes: int) -> None:
        super().__init__(path, size_bytes)
        self.device: int | None = None
        self.algorithm = ""

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why zram+ext4 cannot be mounted here, or None if it can."""
        if os.geteuid() != 0:
            return "needs root"
        if not (ZRAM_CONTROL / "hot_add").exists():
            return f"no {ZRAM_CONTROL} (modprobe zram)"
        if shutil.which("mkfs.ext4") is None:
            return "mkfs.ext4 not found (apt-get install -y e2fsprogs)"
        return None

    def mount(self) -> None:
        self.device = int((ZRAM_CONTROL / "hot_add").read_text())
        sysdir = Path(f"/sys/block/zram{self.device}")
        with contextlib.suppress(OSError):  # not built in: the kernel's default stays
            (sysdir / "comp_algorithm").write_text("lz4\n")
        chosen = (sysdir / "comp_algorithm").read_text().split()
        self.algorithm = next((a.strip("[]") for a in chosen if a.startswith("[")), "?")
        (sysdir / "disksize").write_text(f"{self.size_bytes}\n")
        device = Path(f"/dev/zram{self.device}")
        deadline = time.monotonic() + ZRAM_DEVICE_WAIT
        while not device.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{device} did not appear after hot_add")
            time.sleep(0.05)
        # Inode tables and journal written now, not by ext4lazyinit during the measurements.
        run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
            + [str(device)]
        )
        run(["mount", "-t", "ext4", "-o", "discard", str(device), str(self.path)])

    def unmount(self) -> None:
        if is_mounted(self.path):
            kernel_unmount(self.path)
        if self.device is None:
            return
        sysdir = Path(f"/sys/block/zram{self.device}")
        try:
            (sysdir / "reset").write_text("1\n")
            (ZRAM_CONTROL / "hot_remove").write_text(f"{self.device}\n")
        except OSError as error:  # busy after a lazy unmount: it goes when its last user does
            log(f"zram{self.device} not removed: {error}")
        else:
            self.device = None

    def settle(self) -> None:
        if is_mounted(self.path):
            subprocess.run(["sync", "-f", str(self.path)], check=False)
