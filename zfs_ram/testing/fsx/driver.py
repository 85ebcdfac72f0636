"""The fsx model and driver: seeded random file operations checked against an in-memory model.

In the spirit of fsx (Apple's, then xfstests' ltp/fsx.c): one random number generator drives
every choice, so a seed replays a run exactly. Each step is one operation on one of a fixed set
of paths spread over three directories: writes at random offsets and lengths, O_APPEND writes,
truncates up and down, sparse writes far past the end (up to 1 TiB), reads, mmap reads and
writes, renames (which may replace), hard links, unlinks, and writes through a handle whose last
name was just removed. The model holds each inode's bytes as a sparse page map; after every step
the files touched are read back whole (first dropped from the kernel's page cache with
posix_fadvise(DONTNEED), so the bytes come from the daemon, not the kernel) and compared.

Every ``compact_every`` steps it asks the mount to compact (through its ControlClient) and then
verifies every file, and, when it owns the mount (``check_accounting``), that mm_stat's
orig_data_size is exactly the pages the model says are held: a leak or a lost page shows up at
once. At the end it deletes everything and checks that the pool is empty again.

A failure raises FsxFailure, whose text has the seed, the failing step and the last steps of the
log; the command line (cli.py) writes the whole log to a file. The same seed and ``--ops``
replay it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zfs_ram.client import ControlClient
from zfs_ram.mounts import locate
from zfs_ram.vocabulary import PAGE_SIZE

__all__ = ["FileModel", "Fsx", "FsxConfig", "FsxFailure", "FsxResult", "make_data"]

# Directories the paths are spread over: renames and links cross them.
DIRS = ("", "a", "a/b")
# Files this big or smaller are read back whole; larger (sparse) ones by their data pages plus
# samples of the holes, since reading 1 TiB of zeros would take hours.
FULL_VERIFY_LIMIT = 4 << 20
# Sparse writes land anywhere below this: 1 TiB spans many page-table chunks and costs one page.
SPARSE_LIMIT = 1 << 40
# Hole samples read in a large file on each verification.
HOLE_SAMPLES = 4
# Log lines shown in a failure's message (the CLI writes all of them to a file).
LOG_TAIL = 40
# The mm_stat columns that must all be zero once everything is deleted and compacted.
EMPTY_POOL_FIELDS = ("orig_data_size", "compr_data_size", "mem_used_total")


class FsxFailure(AssertionError):
    """The filesystem disagreed with the model; the message says how to replay it."""


@dataclass
class FsxConfig:
    """One run. The defaults are the CI run's; a soak raises ``ops``."""

    root: Path  # an empty or missing directory on the mount under test
    seed: int = 1
    ops: int = 1000
    files_per_dir: int = 4  # the fixed set of paths: DIRS x files_per_dir
    max_len: int = 256 << 10  # ordinary writes and truncates stay below this offset
    max_write: int = 64 << 10  # bytes per write
    compact_every: int = 25  # 0: never write to .zfs_ram/compact
    control: ControlClient | None = None  # the mount's control client, found above root if None
    check_accounting: bool = False  # the run owns the mount: mm_stat must match the model
    use_mmap: bool = True
    cleanup: bool = True  # delete everything at the end (and check the pool is empty)


@dataclass
class FsxResult:
    ops: int
    compactions: int
    pages_compacted: int  # growth of mm_stat's pages_compacted during the run, -1 if unknown
    bytes_written: int
    bytes_verified: int
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)


class FileModel:
    """What one inode must contain: its size and its written pages (absent pages are holes).

    Invariant: bytes past ``size`` in the last page are zero, and no page lies past the end.
    ``pages`` is also what the page store must hold: a page exists once any byte of it was
    written and until a truncate cuts it off.
    """

    __slots__ = ("size", "pages", "names")

    def __init__(self) -> None:
        self.size = 0
        self.pages: dict[int, bytearray] = {}
        self.names = 0

    def write(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            page, start = divmod(offset + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - start, len(data) - pos)
            buf = self.pages.get(page)
            if buf is None:
                buf = self.pages[page] = bytearray(PAGE_SIZE)
            buf[start : start + n] = data[pos : pos + n]
            pos += n
        self.size = max(self.size, offset + len(data))

    def truncate(self, size: int) -> None:
        if size < self.size:
            keep = (size + PAGE_SIZE - 1) // PAGE_SIZE
            for page in [p for p in self.pages if p >= keep]:
                del self.pages[page]
            last, tail = divmod(size, PAGE_SIZE)
            if tail and last in self.pages:
                self.pages[last][tail:] = bytes(PAGE_SIZE - tail)
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        out = bytearray()
        pos = offset
        while pos < end:
            page, start = divmod(pos, PAGE_SIZE)
            n = min(PAGE_SIZE - start, end - pos)
            buf = self.pages.get(page)
            out += buf[start : start + n] if buf is not None else bytes(n)
            pos += n
        return bytes(out)


def make_data(rng: random.Random, length: int, tag: int) -> tuple[str, bytes]:
    """Bytes of one of the kinds the page store treats differently, and the kind's name."""
    kind = rng.choice(("random", "text", "zeros", "fill", "word", "mixed"))
    if kind == "random":  # incompressible: stored raw (huge pages)
        data = rng.randbytes(length)
    elif kind == "text":  # compressible and unique to this step
        unit = f"step {tag:08d} of zfs_ram fsx; ".encode()
        data = (unit * (length // len(unit) + 1))[:length]
    elif kind == "zeros":  # same-filled with word 0
        data = bytes(length)
    elif kind == "fill":  # same-filled with a non-zero byte
        data = bytes([rng.randrange(1, 256)]) * length
    elif kind == "word":  # same-filled with an 8-byte word when page-aligned
        word = struct.pack("<Q", rng.getrandbits(64))
        data = (word * (length // 8 + 1))[:length]
    else:  # a partly compressible page: the odd size classes
        cut = rng.randrange(length + 1)
        data = bytes(cut) + rng.randbytes(length - cut)
    return kind, data


class Fsx:
    """One seeded run; ``run()`` returns an FsxResult or raises FsxFailure."""

    def __init__(self, config: FsxConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.root = config.root
        self.paths = [
            f"{d}/f{i}" if d else f"f{i}" for d in DIRS for i in range(config.files_per_dir)
        ]
        self.names: dict[str, int] = {}  # path -> inode key
        self.inodes: dict[int, FileModel] = {}
        self._next_key = 1
        self.log: list[str] = []
        self.step = 0
        self.control = config.control if config.control is not None else _find_control(self.root)
        self.counts: dict[str, int] = {}
        self.compactions = 0
        self.written = 0
        self.verified = 0
        self._made_root = False
        ops: list[tuple[Callable[[], None], int]] = [
            (self.op_write, 20),
            (self.op_append, 8),
            (self.op_truncate, 8),
            (self.op_sparse_write, 2),
            (self.op_read, 12),
            (self.op_rename, 5),
            (self.op_link, 3),
            (self.op_unlink, 4),
            (self.op_write_unlinked, 2),
        ]
        if config.use_mmap:
            ops += [(self.op_mmap_read, 5), (self.op_mmap_write, 5)]
        self._ops = [op for op, _ in ops]
        self._weights = [w for _, w in ops]

    # -- driving -------------------------------------------------------------------------------

    def run(self) -> FsxResult:
        started = time.monotonic()
        self._made_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        for d in DIRS[1:]:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        compacted_before = self._pages_compacted()
        try:
            for step in range(1, self.cfg.ops + 1):
                self.step = step
                op = self.rng.choices(self._ops, self._weights)[0]
                self.counts[op.__name__[3:]] = self.counts.get(op.__name__[3:], 0) + 1
                op()
                if self.cfg.compact_every and self.step % self.cfg.compact_every == 0:
                    self.compact_and_verify_all()
            self.step += 1
            self.compact_and_verify_all()
            if self.cfg.cleanup:
                self.cleanup()
        except FsxFailure:
            raise
        except Exception as error:  # an unexpected OSError is a failure like any other
            raise self.failure(f"{type(error).__name__}: {error}") from error
        compacted_after = self._pages_compacted()
        return FsxResult(
            ops=self.cfg.ops,
            compactions=self.compactions,
            pages_compacted=(compacted_after - compacted_before if compacted_before >= 0 else -1),
            bytes_written=self.written,
            bytes_verified=self.verified,
            seconds=time.monotonic() - started,
            op_counts=dict(sorted(self.counts.items())),
        )

    def note(self, text: str) -> None:
        self.log.append(f"#{self.step} {text}")

    def failure(self, what: str) -> FsxFailure:
        tail = "\n".join(self.log[-LOG_TAIL:])
        return FsxFailure(
            f"fsx seed={self.cfg.seed} failed at step {self.step} of {self.cfg.ops}: {what}\n"
            f"replay: python -m zfs_ram.testing.fsx --mount MOUNT --seed {self.cfg.seed}"
            f" --ops {self.step} (same --files/--max-len/--compact-every)\n"
            f"last {min(LOG_TAIL, len(self.log))} of {len(self.log)} steps:\n{tail}"
        )

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            raise self.failure(what)

    def expect_error(self, code: int, action: Callable[[], object], what: str) -> None:
        try:
            action()
        except OSError as error:
            self.check(
                error.errno == code, f"{what}: expected {errno.errorcode[code]}, got {error!r}"
            )
            return
        raise self.failure(f"{what}: expected {errno.errorcode[code]}, it succeeded")

    def pick_path(self) -> str:
        return self.rng.choice(self.paths)

    def pick_existing(self) -> str | None:
        if not self.names:
            return None
        return self.rng.choice(sorted(self.names))

    def model_of(self, path: str, create: bool = False) -> FileModel | None:
        key = self.names.get(path)
        if key is None:
            if not create:
                return None
            key = self._next_key
            self._next_key += 1
            self.inodes[key] = FileModel()
            self.inodes[key].names = 1
            self.names[path] = key
        return self.inodes[key]

    def drop_name(self, path: str) -> FileModel:
        key = self.names.pop(path)
        model = self.inodes[key]
        model.names -= 1
        if model.names == 0:
            del self.inodes[key]
        return model

    # -- operations ----------------------------------------------------------------------------

    def op_write(self) -> None:
        self._write_at("write", self.cfg.max_len, self.cfg.max_write + 1)

    def _write_at(self, label: str, offset_limit: int, length_limit: int) -> None:
        """pwrite fresh bytes at a random offset of a random path, then check the file."""
        path = self.pick_path()
        offset = self.rng.randrange(offset_limit)
        length = self.rng.randrange(1, length_limit)
        kind, data = make_data(self.rng, length, self.step)
        self.note(f"{label} {path} off={offset} len={length} kind={kind}")
        model = self.model_of(path, create=True)
        assert model is not None
        fd = os.open(self.root / path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._pwrite_all(fd, data, offset)
        finally:
            os.close(fd)
        model.write(offset, data)
        self.written += length
        self.verify(path)

    def op_append(self) -> None:
        path = self.pick_path()
        length = self.rng.randrange(1, self.cfg.max_write + 1)
        kind, data = make_data(self.rng, length, self.step)
        self.note(f"append {path} len={length} kind={kind}")
        model = self.model_of(path, create=True)
        assert model is not None
        fd = os.open(self.root / path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.check(os.write(fd, data) == length, "short append")
        finally:
            os.close(fd)
        model.write(model.size, data)
        self.written += length
        self.verify(path)

    def op_sparse_write(self) -> None:
        self._write_at("sparse_write", SPARSE_LIMIT, 2 * PAGE_SIZE)

    def op_truncate(self) -> None:
        path = self.pick_existing()
        if path is None:
            return
        size = self.rng.randrange(self.cfg.max_len + 1)
        if self.rng.random() < 0.2:
            size -= size % PAGE_SIZE  # page-aligned cuts are a separate corner
        model = self.model_of(path)
        assert model is not None
        self.note(f"truncate {path} {model.size} -> {size}")
        os.truncate(self.root / path, size)
        model.truncate(size)
        self.verify(path)

    def op_read(self) -> None:
        path = self.pick_existing()
        if path is None:
            return
        model = self.model_of(path)
        assert model is not None
        span = max(model.size, 1)
        offset = (
            self.rng.randrange(span + PAGE_SIZE)
            if span < self.cfg.max_len * 4
            else (self.rng.choice(sorted(model.pages)) * PAGE_SIZE if model.pages else 0)
        )
        length = self.rng.randrange(1, self.cfg.max_write + 1)
        self.note(f"read {path} off={offset} len={length}")
        with self._open(path, os.O_RDONLY) as fd:
            drop_cache(fd)
            got = _pread_all(fd, length, offset)
        want = model.read(offset, length)
        self._compare(path, offset, got, want)

    def op_mmap_read(self) -> None:
        found = self._map_range()
        if found is None:
            return
        path, model, offset, length = found
        self.note(f"mmap_read {path} off={offset} len={length}")
        with self._open(path, os.O_RDONLY) as fd:
            drop_cache(fd)
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(fd, offset + length - base, prot=mmap.PROT_READ, offset=base) as view:
                got = view[offset - base : offset - base + length]
        self._compare(path, offset, got, model.read(offset, length))

    def op_mmap_write(self) -> None:
        found = self._map_range()
        if found is None:
            return
        path, model, offset, length = found
        kind, data = make_data(self.rng, length, self.step)
        self.note(f"mmap_write {path} off={offset} len={length} kind={kind}")
        with self._open(path, os.O_RDWR) as fd:
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(fd, offset + length - base, offset=base) as view:
                view[offset - base : offset - base + length] = data
                view.flush()  # msync: the dirty pages go to the daemon as writes now
        model.write(offset, data)
        self.written += length
        self.verify(path)

    def op_rename(self) -> None:
        src = self.pick_existing()
        if src is None:
            return
        dst = self.pick_path()
        self.note(f"rename {src} -> {dst}")
        os.rename(self.root / src, self.root / dst)
        if dst == src or self.names.get(dst) == self.names[src]:
            # Two names of one inode: POSIX rename does nothing and both names stay.
            self.verify(src)
            return
        if dst in self.names:
            self.drop_name(dst)
        self.names[dst] = self.names.pop(src)
        self.verify(dst)
        self.check(not (self.root / src).exists(), f"{src} still exists after rename")

    def op_link(self) -> None:
        src = self.pick_existing()
        if src is None:
            return
        dst = self.pick_path()
        self.note(f"link {src} -> {dst}")
        if dst in self.names:
            self.expect_error(
                errno.EEXIST,
                lambda: os.link(self.root / src, self.root / dst),
                f"link {src} onto existing {dst}",
            )
            return
        os.link(self.root / src, self.root / dst)
        key = self.names[src]
        self.names[dst] = key
        self.inodes[key].names += 1
        self.verify(dst)

    def op_unlink(self) -> None:
        path = self.pick_path()
        self.note(f"unlink {path}")
        if path not in self.names:
            self.expect_error(
                errno.ENOENT, lambda: os.unlink(self.root / path), f"unlink missing {path}"
            )
            return
        os.unlink(self.root / path)
        model = self.drop_name(path)
        if model.names:
            for other, key in self.names.items():
                if self.inodes.get(key) is model:
                    self.verify(other)
                    break

    def op_write_unlinked(self) -> None:
        """Remove the last name of an open file, then use the handle: the inode must live."""
        path = self.pick_existing()
        if path is None:
            return
        offset = self.rng.randrange(self.cfg.max_len)
        length = self.rng.randrange(1, self.cfg.max_write + 1)
        kind, data = make_data(self.rng, length, self.step)
        self.note(f"write_unlinked {path} off={offset} len={length} kind={kind}")
        key = self.names[path]
        model = self.inodes[key]
        others = [p for p, k in self.names.items() if k == key and p != path]
        fd = os.open(self.root / path, os.O_RDWR)
        try:
            for name in [path, *others]:
                os.unlink(self.root / name)
                self.drop_name(name)
            self._pwrite_all(fd, data, offset)
            model.write(offset, data)
            self.written += length
            self.verify_fd(fd, model, f"{path} (unlinked)", nlink=0)
        finally:
            os.close(fd)

    # -- verification ------------------------------------------------------------------------

    def verify(self, path: str) -> None:
        model = self.model_of(path)
        assert model is not None
        with self._open(path, os.O_RDONLY) as fd:
            self.verify_fd(fd, model, path, nlink=model.names)

    def verify_fd(self, fd: int, model: FileModel, path: str, nlink: int) -> None:
        st = os.fstat(fd)
        self.check(st.st_size == model.size, f"{path}: size {st.st_size}, model {model.size}")
        self.check(st.st_nlink == nlink, f"{path}: st_nlink {st.st_nlink}, model {nlink}")
        drop_cache(fd)
        if model.size <= FULL_VERIFY_LIMIT:
            self._compare(
                path, 0, _pread_all(fd, model.size + PAGE_SIZE, 0), model.read(0, model.size)
            )
            return
        pages = sorted(model.pages)
        for page in pages:
            offset = page * PAGE_SIZE
            self._compare(
                path, offset, _pread_all(fd, PAGE_SIZE, offset), model.read(offset, PAGE_SIZE)
            )
        for _ in range(HOLE_SAMPLES):
            offset = self.rng.randrange(model.size)
            self._compare(path, offset, _pread_all(fd, 64, offset), model.read(offset, 64))
        tail = max(0, model.size - 100)
        self._compare(path, tail, _pread_all(fd, 200, tail), model.read(tail, 200))

    def _compare(self, path: str, offset: int, got: bytes, want: bytes) -> None:
        self.verified += len(got)
        if got == want:
            return
        if len(got) != len(want):
            raise self.failure(
                f"{path}: read at {offset} gave {len(got)} bytes, model has {len(want)}"
            )
        first = next(i for i in range(len(got)) if got[i] != want[i])
        at = offset + first
        raise self.failure(
            f"{path}: bytes differ from offset {at} (page {at // PAGE_SIZE}, +{at % PAGE_SIZE}):"
            f" got {got[first : first + 16].hex()} want {want[first : first + 16].hex()}"
        )

    def compact_and_verify_all(self) -> None:
        if self.control is not None:
            self.note("compact")
            self.control.compact()
            self.compactions += 1
        for path in sorted(self.names):
            self.verify(path)
        self.check_tree()
        if self.cfg.check_accounting and self.control is not None:
            held = sum(len(m.pages) for m in self.inodes.values())
            orig = self.control.mm_stat()["orig_data_size"]
            self.check(
                orig == held * PAGE_SIZE,
                f"mm_stat orig_data_size {orig}, model holds {held} pages"
                f" ({held * PAGE_SIZE} bytes)",
            )

    def check_tree(self) -> None:
        """The directory listings name exactly the model's paths."""
        found = set()
        for d in DIRS:
            for entry in os.scandir(self.root / d if d else self.root):
                if entry.is_file(follow_symlinks=False):
                    found.add(f"{d}/{entry.name}" if d else entry.name)
        self.check(
            found == set(self.names), f"listing {sorted(found)} != model {sorted(self.names)}"
        )

    def cleanup(self) -> None:
        self.note("cleanup")
        for path in sorted(self.names):
            os.unlink(self.root / path)
        self.names.clear()
        self.inodes.clear()
        for d in reversed(DIRS[1:]):
            os.rmdir(self.root / d)
        if self._made_root:
            os.rmdir(self.root)
        if self.cfg.check_accounting and self.control is not None:
            self.control.compact()
            stat = self.control.mm_stat()
            self.check(
                all(stat[name] == 0 for name in EMPTY_POOL_FIELDS),
                f"after deleting everything mm_stat is {stat}: the pool is not empty",
            )

    # -- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _open(self, path: str, flags: int) -> Iterator[int]:
        fd = os.open(self.root / path, flags)
        try:
            yield fd
        finally:
            os.close(fd)

    def _pwrite_all(self, fd: int, data: bytes, offset: int) -> None:
        done = os.pwrite(fd, data, offset)
        self.check(done == len(data), f"short write: {done} of {len(data)} bytes")

    def _map_range(self) -> tuple[str, FileModel, int, int] | None:
        path = self.pick_existing()
        if path is None:
            return None
        model = self.model_of(path)
        assert model is not None
        if model.size == 0:
            return None
        if model.size > self.cfg.max_len * 4 and model.pages:
            start = self.rng.choice(sorted(model.pages)) * PAGE_SIZE
        else:
            start = self.rng.randrange(model.size)
        length = self.rng.randrange(1, min(self.cfg.max_write, model.size - start) + 1)
        return path, model, start, length

    def _pages_compacted(self) -> int:
        if self.control is None:
            return -1
        return self.control.mm_stat()["pages_compacted"]


def drop_cache(fd: int) -> None:
    """Drop the file's clean pages from the kernel's cache, so reads reach the daemon."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(fd, min(length, 1 << 20), offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _find_control(path: Path) -> ControlClient | None:
    """The client of the zfs_ram mount that holds ``path``, None on any other filesystem.
    Found in the mount table, never by a look inside a mount whose daemon may be stopped."""
    mount = locate(str(path)).zfs_ram
    return ControlClient(mount.mountpoint) if mount is not None else None
