"""The fragmentation workload: a seeded file set, written in a chosen order, partly deleted.

It reproduces the kernel measurement in the research notes (zsmalloc-kernel.md, Part 2): about
70% of the bytes are real files sampled from /usr/lib and /usr/share, 30% are synthetic files
whose pages carry a chosen share of random bytes, so that lz4 output is spread over many size
classes. Deleting a random subset of files then leaves free slots scattered over zspages.

Invariants:
- Everything random comes from ``random.Random`` seeded with strings derived from the seed, so
  the same (spec, seed) gives byte-identical files and the same write and delete orders on the
  same machine (real files depend on what /usr holds).
- The file set is built once, in memory, and reused for every arm of an experiment.
- Pure and synchronous; the only I/O is reading /usr (building) and the target directory
  (writing, deleting).
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from zfs_ram.vocabulary import PAGE_SIZE  # the unit zram, zsmalloc and zfs_ram compress and store

MIB = 1 << 20

# The research workload's composition: 70% of the bytes from real files.
DEFAULT_REAL_SHARE = 0.7
DEFAULT_REAL_ROOTS = ("/usr/lib", "/usr/share")
# Real files up to 16 MiB, as in the research; larger ones would dominate small runs.
REAL_MAX_FILE = 16 * MIB
# Synthetic files: log-uniform sizes between one page and 1 MiB ...
SYNTH_MIN_SIZE = PAGE_SIZE
SYNTH_MAX_SIZE = MIB
# ... each with an incompressible share drawn from U(0.02, 0.98) ...
SYNTH_MIN_RANDOM = 0.02
SYNTH_MAX_RANDOM = 0.98
# ... and jittered by up to this much per page, so one file's pages land in several classes.
SYNTH_PAGE_JITTER = 0.05
# Files go into this many directories, so no directory grows to thousands of entries.
NR_DIRS = 16
# Filler for the compressible part of a synthetic page: lz4 reduces it to a few bytes per page.
_FILLER = (b"zfs_ram synthetic page filler: the quick brown fox jumps over the lazy dog.\n" * 64)[
    :PAGE_SIZE
]
# Headroom kept below RLIMIT_NOFILE for the process's other descriptors.
FD_HEADROOM = 256

WRITE_ORDERS = ("sequential", "interleaved", "shuffled")
# "interleaved" writes groups of this many files round-robin, one page at a time (research 2.1).
INTERLEAVE_GROUP = 64


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate. Sizes are targets; the file set lands within one file of them."""

    size_bytes: int
    seed: int = 1
    real_share: float = DEFAULT_REAL_SHARE
    real_roots: tuple[str, ...] = DEFAULT_REAL_ROOTS


@dataclass(frozen=True)
class WorkloadFile:
    """One file of the set. ``random_share`` is None for real files."""

    name: str  # relative path inside the target directory
    data: bytes
    origin: str  # source path for real files, "synthetic" otherwise
    random_share: float | None

    @property
    def nr_pages(self) -> int:
        return -(-len(self.data) // PAGE_SIZE)


@dataclass(frozen=True)
class FileSet:
    """The generated files plus what they were generated from."""

    spec: WorkloadSpec
    files: tuple[WorkloadFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(len(f.data) for f in self.files)

    @property
    def nr_pages(self) -> int:
        return sum(f.nr_pages for f in self.files)

    def summary(self) -> dict[str, int | float]:
        """Counts and bytes by kind, for the report and the JSON file."""
        real = [f for f in self.files if f.random_share is None]
        synth = [f for f in self.files if f.random_share is not None]
        return {
            "files": len(self.files),
            "real_files": len(real),
            "real_bytes": sum(len(f.data) for f in real),
            "synthetic_files": len(synth),
            "synthetic_bytes": sum(len(f.data) for f in synth),
            "total_bytes": self.total_bytes,
            "pages": self.nr_pages,
        }


def _rng(seed: int, *parts: object) -> random.Random:
    """An independent stream per purpose, so changing one part does not shift the others."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def list_real_candidates(roots: Sequence[str], max_size: int = REAL_MAX_FILE) -> list[str]:
    """Readable regular files (no symlinks) of 1 B..max_size under roots, sorted."""
    found: list[str] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and 0 < st.st_size <= max_size:
                    found.append(path)
    found.sort()
    return found


def synthetic_page(rng: random.Random, random_share: float, length: int = PAGE_SIZE) -> bytes:
    """A page of compressible filler followed by ``random_share`` of random bytes.

    lz4 cannot shrink the random part and reduces the filler to about 100 bytes, so the
    compressed size is about random_share * 4096 + 100. The filler comes first because lz4
    skips ahead ever faster after failing to match, and would step over filler placed after
    a long random run.
    """
    nr_random = round(min(1.0, max(0.0, random_share)) * length)
    return _FILLER[: length - nr_random] + rng.randbytes(nr_random)


def synthetic_file_data(seed: int, index: int, size: int, random_share: float) -> bytes:
    """The bytes of synthetic file ``index``: pages jittered around random_share."""
    rng = _rng(seed, "synthetic-data", index)
    pages = []
    for offset in range(0, size, PAGE_SIZE):
        length = min(PAGE_SIZE, size - offset)
        jitter = rng.uniform(-SYNTH_PAGE_JITTER, SYNTH_PAGE_JITTER)
        pages.append(synthetic_page(rng, random_share + jitter, length))
    return b"".join(pages)


def build_file_set(spec: WorkloadSpec, candidates: Sequence[str] | None = None) -> FileSet:
    """Generate the file set: real files first (sampled), then synthetic ones, then shuffled.

    ``candidates`` overrides the scan of spec.real_roots (tests pass a small list).
    """
    files: list[WorkloadFile] = []
    real_budget = round(spec.size_bytes * spec.real_share)
    if real_budget > 0:
        if candidates is None:
            candidates = list_real_candidates(spec.real_roots)
        order = list(candidates)
        _rng(spec.seed, "real-pick").shuffle(order)
        left = real_budget
        for path in order:
            if left <= 0:
                break
            try:
                size = os.path.getsize(path)
                if size > left and left >= PAGE_SIZE:
                    continue  # would overshoot: look for a smaller one
                with open(path, "rb") as f:
                    data = f.read(REAL_MAX_FILE)
            except OSError:
                continue
            if not data:
                continue
            idx = len(files)
            base = os.path.basename(path)[:40]
            files.append(WorkloadFile(f"d{idx % NR_DIRS:02d}/r{idx:05d}-{base}", data, path, None))
            left -= len(data)
    synth_budget = spec.size_bytes - sum(len(f.data) for f in files)
    rng = _rng(spec.seed, "synthetic-sizes")
    index = 0
    while synth_budget > 0:
        size = round(SYNTH_MIN_SIZE * (SYNTH_MAX_SIZE / SYNTH_MIN_SIZE) ** rng.random())
        size = min(size, synth_budget) if synth_budget >= SYNTH_MIN_SIZE else synth_budget
        share = rng.uniform(SYNTH_MIN_RANDOM, SYNTH_MAX_RANDOM)
        data = synthetic_file_data(spec.seed, index, size, share)
        idx = len(files)
        files.append(WorkloadFile(f"d{idx % NR_DIRS:02d}/s{idx:05d}", data, "synthetic", share))
        synth_budget -= size
        index += 1
    return FileSet(spec, tuple(files))


def choose_deletions(file_set: FileSet, fraction: float) -> list[int]:
    """Indices of round(fraction * files) files, in the (shuffled) order to delete them.

    Depends only on the seed and the fraction, so every arm deletes the same files.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"delete fraction must be in [0, 1], not {fraction}")
    count = round(fraction * len(file_set.files))
    return _rng(file_set.spec.seed, "delete", fraction).sample(range(len(file_set.files)), count)


def page_order(file_set: FileSet, order: str) -> Iterator[tuple[int, int]]:
    """(file index, page index) pairs in the order the fill writes them."""
    files = file_set.files
    if order == "sequential":
        for i, f in enumerate(files):
            for p in range(f.nr_pages):
                yield i, p
    elif order == "interleaved":
        for start in range(0, len(files), INTERLEAVE_GROUP):
            group = range(start, min(start + INTERLEAVE_GROUP, len(files)))
            for p in range(max(files[i].nr_pages for i in group)):
                for i in group:
                    if p < files[i].nr_pages:
                        yield i, p
    elif order == "shuffled":
        pairs = [(i, p) for i, f in enumerate(files) for p in range(f.nr_pages)]
        _rng(file_set.spec.seed, "write-order").shuffle(pairs)
        yield from pairs
    else:
        raise ValueError(f"unknown write order {order!r} (use one of {', '.join(WRITE_ORDERS)})")


class _FdCache:
    """Open files for writing, at most ``limit`` at a time (LRU), for out-of-order writes."""

    def __init__(self, root: str, direct: bool, limit: int) -> None:
        self.root = root
        self.direct = direct
        self.limit = max(1, limit)
        self.fds: OrderedDict[int, int] = OrderedDict()
        self.created: set[int] = set()

    def get(self, index: int, name: str) -> int:
        fd = self.fds.get(index)
        if fd is not None:
            self.fds.move_to_end(index)
            return fd
        if len(self.fds) >= self.limit:
            _, old = self.fds.popitem(last=False)
            os.close(old)
        path = os.path.join(self.root, name)
        flags = os.O_WRONLY | os.O_CREAT | (0 if index in self.created else os.O_TRUNC)
        if self.direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # the filesystem refuses O_DIRECT: write through normally
                fd = os.open(path, flags, 0o644)
        else:
            fd = os.open(path, flags, 0o644)
        self.created.add(index)
        self.fds[index] = fd
        return fd

    def close_all(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])


def _fd_limit() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft - FD_HEADROOM)


def write_file_set(
    root: str,
    file_set: FileSet,
    order: str = "shuffled",
    direct: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write every file under root, page by page in ``order``.

    Each page is one pwrite. With ``direct`` the files are opened O_DIRECT, so the page cache
    cannot reorder the writes (the kernel arm needs this; FUSE without writeback cache writes
    through anyway); O_DIRECT takes whole aligned blocks only, so a file's last page then goes
    out zero-padded and a final ftruncate restores the file's exact size. Without O_DIRECT
    (asked for or refused by the filesystem) each page is written with its exact bytes: a file
    never grows past its data, so whatever reads the target during the fill (the runner's
    sampler) never sees more bytes than the file set holds. ``progress(done, total)`` is called
    now and then.
    """
    for d in sorted({os.path.dirname(f.name) for f in file_set.files}):
        if d:
            os.makedirs(os.path.join(root, d), exist_ok=True)
    cache = _FdCache(root, direct, _fd_limit())
    buf = mmap.mmap(-1, PAGE_SIZE)  # page-aligned, as O_DIRECT requires
    total = file_set.nr_pages
    try:
        for done, (i, p) in enumerate(page_order(file_set, order)):
            f = file_set.files[i]
            chunk = f.data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
            fd = cache.get(i, f.name)  # first, as it finds out whether O_DIRECT works here
            if cache.direct:
                buf.seek(0)
                buf.write(chunk)
                if len(chunk) < PAGE_SIZE:
                    buf.write(bytes(PAGE_SIZE - len(chunk)))
                os.pwrite(fd, buf, p * PAGE_SIZE)
            else:
                os.pwrite(fd, chunk, p * PAGE_SIZE)
            if progress is not None and done % 1024 == 0:
                progress(done, total)
        if cache.direct:  # cut the zero-padded last pages back
            for i, f in enumerate(file_set.files):
                if len(f.data) % PAGE_SIZE:
                    os.ftruncate(cache.get(i, f.name), len(f.data))
    finally:
        cache.close_all()
        buf.close()
    if progress is not None:
        progress(total, total)


def delete_files(root: str, file_set: FileSet, indices: Sequence[int]) -> int:
    """Unlink the given files in the given order; returns the bytes of file data deleted."""
    deleted = 0
    for i in indices:
        f = file_set.files[i]
        os.unlink(os.path.join(root, f.name))
        deleted += len(f.data)
    return deleted
