"""The scratch work of a typical CI job on tmpfs, zfs_ram and the kernel's zram+ext4, in one run.

zfs_ram's first use is the scratch directory of a CI job (issue 13). This runs such a job's
scratch work in phases, each timed on its own, on every system:

  unpack       tar -xf of a real source tree (--size-mib, ~100 MiB of this machine's files: the C
               headers below, Python's stdlib and packages, then /usr/include and
               /usr/share/doc), made once into a cached tarball in /tmp/zfs_ram_bench
  compileall   python3 -m compileall -q over the unpacked tree (no __pycache__ in the tarball)
  git          git init, git add -A, git commit -q of the tree (compiled files included)
  sqlite       one database file, 2000 transactions of one small INSERT each, committed one by
               one (python's sqlite3 in a subprocess, journal_mode DELETE and synchronous FULL,
               the defaults)
  grep         grep -r -F of a fixed string over the tree (the .git directory included)
  gcc          (if gcc exists) gcc -O1 -c of a few small C files whose headers (<Python.h> and
               libc's) all come from the tree, one link, and the program runs once
  rm           rm -rf of everything the job made

Every command runs with its working directory in the mount and TMPDIR there too (gcc's
temporary files land in the scratch directory, as in a CI job). The systems: tmpfs; zfs_ram
(`zfs-ram mount`, --zfs-ram-options added); and ext4 on a zram device of our own, mounted
-o discard, when run as root where the zram module exists (benchmarks/systems.py mounts all
three). Each repetition runs every phase on all systems back to back, the order of the systems
rotating from one repetition to the next, so the tree of each system goes through the phases
in order and one phase's runs are close together in time. The report gives per phase the median
seconds of each system and the median of the per-repetition ratios to tmpfs.

Between phases, untimed: zfs_ram's compactor is waited for, ext4's dirty pages are written back
(sync -f, so ext4's writeback does not run during another system's phase), and guest memory is
warmed (2x the tree; --no-prewarm turns it off; see fs_bench.py's module comment: free page
reporting in this VM makes the first touch of memory 4x dearer).

FUSE requests: zfs_ram's stats.json counts the requests by opcode. It is read before and after
every phase; the read itself costs a few requests (LOOKUP, OPEN, READ, ...), measured by a
second read right before the phase and subtracted, so the figures are the phase's own.

Run as root with the project's venv:
  /work/main/.venv/bin/python benchmarks/ci_job.py --reps 3 --json ci_job.json
Everything mounted is unmounted in a finally block, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from systems import (
    CACHE_DIR,
    MIB,
    System,
    Tmpfs,
    ZfsRam,
    ZfsRamReference,
    ZramExt4,
    describe_run,
    is_mounted,
    log,
    run,
    warm_memory,
)

SYSTEMS = ("tmpfs", "zfs_ram", "zram", "zfs_ram_ref")
DEFAULT_SYSTEMS = ("tmpfs", "zfs_ram", "zram")
PHASES = ("unpack", "compileall", "git", "sqlite", "grep", "gcc", "rm")
DEFAULT_REPS = 3  # the median of 3 outvotes one disturbed repetition
DEFAULT_SIZE_MIB = 100  # the issue's "100 MB source tree"
QUICK_SIZE_MIB = 4  # --quick: the C headers and a few MiB of Python, for a smoke run
TRANSACTIONS = 2000  # the issue's sqlite count
QUICK_TRANSACTIONS = 200
C_FILES = 8  # gcc -c of this many files, like a small library's make -j1
QUICK_C_FILES = 2
NEWLINE = b"\n"
GREP_STRING = "Copyright"  # in many files, so grep prints and reads everything to the end
PREWARM_FACTOR = 2  # the tree in the filesystem plus the page cache or pool frames around it
FS_FACTOR, FS_MIN = 8, 1024 * MIB  # room: tree, compiled files, git objects, slack
# The tree, in this order until --size-mib is reached: the headers the C files need first (so
# the gcc phase reads all of them from the mount), then Python's stdlib and packages, then
# the rest of /usr/include and /usr/share/doc.
TREE_ROOTS = (
    *sorted(glob.glob("/usr/lib/python3.[0-9]*")),
    "/usr/lib/python3",
    "/usr/include",
    "/usr/share/doc",
)
C_HEADERS = (
    "stdio.h stdlib.h string.h unistd.h fcntl.h errno.h signal.h time.h math.h pthread.h"
    " sys/stat.h sys/types.h sys/socket.h netinet/in.h".split()
)
SQLITE_SCRIPT = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("CREATE TABLE builds (id INTEGER PRIMARY KEY, name TEXT, status TEXT, log TEXT)")
db.commit()
for i in range(int(sys.argv[2])):
    db.execute(
        "INSERT INTO builds (name, status, log) VALUES (?, ?, ?)",
        (f"job-{i}", "ok" if i % 7 else "failed", f"step {i} finished after {i % 97} s\\n" * 3),
    )
    db.commit()
print(db.execute("SELECT count(*) FROM builds").fetchone()[0])
"""


# -- the tree, built once and cached ----------------------------------------------------------


def python_include() -> Path | None:
    """The machine's <Python.h> directory in /usr/include (python3-dev), or None. The tree is
    made of /usr, so the headers come from there, whichever Python runs this script."""
    found = sorted(glob.glob("/usr/include/python3.[0-9]*/Python.h"))
    return Path(found[-1]).parent if found else None


def c_source(index: int, c_files: int, python_h: bool) -> str:
    """part<index>.c: many headers (the work of a real compile) and one small function; part0.c
    holds main, which calls the functions of part1.c to part<c_files>.c."""
    includes = (["Python.h"] if python_h else []) + list(C_HEADERS)
    head = "".join(f"#include <{h}>\n" for h in includes)
    if index == 0:
        protos = "".join(f"long part{i}(int);\n" for i in range(1, c_files + 1))
        calls = "".join(f"    total += part{i}(argc);\n" for i in range(1, c_files + 1))
        return (
            f"{head}{protos}int main(int argc, char **argv) {{\n    long total = 0;\n"
            f'    (void)argv;\n{calls}    printf("%ld\\n", total);\n    return 0;\n}}\n'
        )
    return (
        f"{head}long part{index}(int n) {{\n    struct stat st;\n    char buffer[64];\n"
        f'    snprintf(buffer, sizeof buffer, "part {index} %d", n);\n'
        "    return (long)strlen(buffer) + (stat(buffer, &st) == 0) + (long)sqrt((double)n);\n"
        "}\n"
    )


def header_dependencies(gcc: str) -> list[str]:
    """The files under /usr/include that the C files read (gcc -M with the phase's flags)."""
    with tempfile.TemporaryDirectory(prefix="ci_job-deps-") as tmp:
        source = Path(tmp) / "deps.c"
        source.write_text(c_source(1, 1, python_include() is not None))
        include = python_include()
        extra = ["-I", str(include)] if include else []
        out = run([gcc, "-O1", "-M", *extra, str(source)], stdout=subprocess.PIPE).stdout
    words = out.replace("\\\n", " ").split()
    return sorted({w for w in words if w.startswith("/usr/include/")})


def _tree_files(root: str) -> Iterator[str]:
    """Regular files under root in a fixed order, without compiled Python (compileall's job)."""
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(top, name)
            if name.endswith(".pyc") or os.path.islink(path) or not os.path.isfile(path):
                continue
            yield path


@dataclass(frozen=True)
class Tree:
    tarball: Path
    files: int
    size_bytes: int


def build_tree(size_mib: int, gcc: str | None) -> Tree:
    """A tarball of about size_mib of this machine's files (once, cached in CACHE_DIR)."""
    tarball = CACHE_DIR / f"ci-tree-{size_mib}MiB{'' if gcc else '-nogcc'}.tar"
    manifest = tarball.with_suffix(".json")
    if tarball.exists() and manifest.exists():
        facts = json.loads(manifest.read_text())
        return Tree(tarball, facts["files"], facts["size_bytes"])
    log(f"building {tarball} from {', '.join(TREE_ROOTS)} (once)")
    budget = size_mib * MIB
    chosen: dict[str, None] = dict.fromkeys(header_dependencies(gcc) if gcc else [])
    total = sum(os.path.getsize(p) for p in chosen)

    def candidates() -> Iterator[str]:
        for root in TREE_ROOTS:
            yield from _tree_files(root)

    for path in candidates():
        if total >= budget:
            break
        if path in chosen:
            continue
        try:
            size = os.path.getsize(path)
            with open(path, "rb"):  # readable: tar must not fail on it later
                pass
        except OSError:
            continue
        chosen[path] = None
        total += size
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    listing = tarball.with_suffix(".list")
    listing.write_bytes(b"".join(p.lstrip("/").encode() + b"\0" for p in chosen))
    tmp = tarball.with_suffix(".tmp")
    run(["tar", "-cf", str(tmp), "-C", "/", "--no-recursion", "--null", "-T", str(listing)])
    listing.unlink()
    tmp.rename(tarball)
    manifest.write_text(json.dumps({"files": len(chosen), "size_bytes": total}) + "\n")
    return Tree(tarball, len(chosen), total)


# -- the phases -------------------------------------------------------------------------------


@dataclass
class Job:
    """What every phase needs to know; `root` is the job's directory in one system's mount."""

    tree: Tree
    python: str
    gcc: str | None
    transactions: int
    c_files: int

    def env(self, root: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TMPDIR=str(root / "tmp"),
            LC_ALL="C",  # the same grep and sort everywhere
            GIT_CONFIG_GLOBAL="/dev/null",  # no user's or system's git config
            GIT_CONFIG_NOSYSTEM="1",
        )
        return env


# A phase: (job, root) -> a check value (the same on every system, or the job went wrong).
Phase = Callable[[Job, Path], str | None]


def _in(job: Job, root: Path, cmd: list[str], cwd: Path, **kwargs: Any) -> str:
    return run(cmd, cwd=cwd, env=job.env(root), stdout=subprocess.PIPE, **kwargs).stdout


def prepare_unpack(job: Job, root: Path) -> None:
    (root / "tmp").mkdir(parents=True)
    (root / "src").mkdir()
    with open(job.tree.tarball, "rb") as f:  # into the page cache: time the target, not /tmp
        while f.read(8 * MIB):
            pass


def phase_unpack(job: Job, root: Path) -> str | None:
    _in(job, root, ["tar", "-xf", str(job.tree.tarball)], root / "src")
    return None


def phase_compileall(job: Job, root: Path) -> str | None:
    # A stdlib tree holds files that do not compile on purpose (lib2to3's test data): exit 1.
    result = subprocess.run(
        [job.python, "-m", "compileall", "-q", "src"],
        cwd=root,
        env=job.env(root),
        stdout=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode not in (0, 1):
        raise RuntimeError(f"compileall exited with {result.returncode}")
    return f"exit {result.returncode}"


# No config of the user's or the machine's (GIT_CONFIG_GLOBAL, GIT_CONFIG_NOSYSTEM in Job.env).
# gc.auto=0 and maintenance.auto=false: no "git gc --auto" detached after the commit, which
# would pack and prune .git in the background of the later phases (files vanishing under grep
# and rm, and its requests counted against them).
GIT = (
    "git -c user.name=CI -c user.email=ci@example.invalid -c init.defaultBranch=main"
    " -c gc.auto=0 -c maintenance.auto=false"
).split()


def phase_git(job: Job, root: Path) -> str | None:
    src = root / "src"
    _in(job, root, [*GIT, "init", "-q"], src)
    _in(job, root, [*GIT, "add", "-A"], src)
    _in(job, root, [*GIT, "commit", "-q", "-m", "import the tree"], src)
    return None


def phase_sqlite(job: Job, root: Path) -> str | None:
    cmd = [job.python, "-c", SQLITE_SCRIPT, str(root / "ci.sqlite"), str(job.transactions)]
    return _in(job, root, cmd, root).strip() + " rows"


def phase_grep(job: Job, root: Path) -> str | None:
    # The output goes to a pipe: GNU grep stops at the first match when stdout is /dev/null.
    result = subprocess.run(
        ["grep", "-r", "-F", GREP_STRING, "."],
        cwd=root / "src",
        env=job.env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # "binary file matches" for every .pyc and git object
        check=False,
    )
    if result.returncode not in (0, 1):
        raise RuntimeError(f"grep exited with {result.returncode}")
    return f"{result.stdout.count(NEWLINE)} lines"


def include_flags(root: Path) -> list[str]:
    """-isystem the tree's copies of /usr/include (multiarch and Python's first), so that no
    header of the C files comes from the machine's own /usr/include."""
    usr_include = root / "src" / "usr" / "include"
    flags: list[str] = []
    include = python_include()
    if include is not None:
        flags += ["-isystem", str(root / "src" / str(include).lstrip("/"))]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        flags += ["-isystem", str(usr_include / multiarch)]
    return [*flags, "-isystem", str(usr_include)]


def prepare_gcc(job: Job, root: Path) -> None:
    cc = root / "cc"
    cc.mkdir()
    python_h = python_include() is not None
    for i in range(job.c_files + 1):
        (cc / f"part{i}.c").write_text(c_source(i, job.c_files, python_h))


def phase_gcc(job: Job, root: Path) -> str | None:
    assert job.gcc is not None
    cc = root / "cc"
    flags = include_flags(root)
    objects = []
    for i in range(job.c_files + 1):  # one gcc per file, as make -j1 runs them
        _in(job, root, [job.gcc, "-O1", *flags, "-c", f"part{i}.c"], cc)
        objects.append(f"part{i}.o")
    _in(job, root, [job.gcc, "-o", "prog", *objects, "-lm"], cc)
    return "prog printed " + _in(job, root, ["./prog"], cc).strip()  # it links and runs


def phase_rm(job: Job, root: Path) -> str | None:
    run(["rm", "-rf", str(root)])
    return None


PHASE_FUNCS: dict[str, Phase] = {
    "unpack": phase_unpack,
    "compileall": phase_compileall,
    "git": phase_git,
    "sqlite": phase_sqlite,
    "grep": phase_grep,
    "gcc": phase_gcc,
    "rm": phase_rm,
}
PREPARE: dict[str, Callable[[Job, Path], None]] = {"unpack": prepare_unpack, "gcc": prepare_gcc}
# gcc's objects sit in the tree's sibling cc/; they go with rm like everything else.


# -- FUSE requests --------------------------------------------------------------------------


Requests = dict[str, dict[str, float]]  # opcode -> {"count": n, "seconds": s}, as stats.json


def _requests(system: ZfsRam) -> Requests:
    section: Requests = system.stats()["requests"]
    return section


def _minus(after: Requests, *befores: Requests) -> Requests:
    """after - sum(befores) per opcode and field; opcodes whose count comes to 0 left out."""
    out: Requests = {}
    for opcode, values in after.items():
        count = values["count"] - sum(b.get(opcode, {}).get("count", 0) for b in befores)
        seconds = values["seconds"] - sum(b.get(opcode, {}).get("seconds", 0.0) for b in befores)
        if count > 0:
            out[opcode] = {"count": count, "seconds": max(seconds, 0.0)}
    return out


def _plus(a: Requests, b: Requests) -> Requests:
    out: Requests = {k: dict(v) for k, v in a.items()}
    for opcode, values in b.items():
        row = out.setdefault(opcode, {"count": 0, "seconds": 0.0})
        row["count"] += values["count"]
        row["seconds"] += values["seconds"]
    return out


class RequestProbe:
    """Counts a phase's requests on zfs_ram: begin() before the clock starts, end() after."""

    def __init__(self, system: ZfsRam) -> None:
        self.system = system
        self._overhead: Requests = {}
        self._start: Requests = {}

    def begin(self) -> None:
        first = _requests(self.system)
        self._start = _requests(self.system)
        # What one read of stats.json costs, between two snapshots: subtracted in end().
        self._overhead = _minus(self._start, first)

    def end(self) -> Requests:
        return _minus(_requests(self.system), self._start, self._overhead)


# -- running ----------------------------------------------------------------------------------


@dataclass
class Sample:
    rep: int
    system: str
    phase: str
    seconds: float
    check: str | None = None
    requests: Requests | None = None


@dataclass
class Report:
    env: dict[str, Any]
    systems: list[str]
    phases: list[str]
    samples: list[Sample] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # system or phase -> why
    errors: list[str] = field(default_factory=list)


def make_systems(
    args: argparse.Namespace, root: Path, fs_size: int, report: Report
) -> list[System]:
    systems: list[System] = []
    for name in SYSTEMS:
        if name not in args.systems:
            continue
        if name == "zram" and (why := ZramExt4.unavailable_reason()) is not None:
            report.skipped["zram"] = why
            log(f"zram+ext4 skipped: {why}")
            continue
        path = root / name
        path.mkdir()
        if name == "tmpfs":
            systems.append(Tmpfs(path, fs_size))
        elif name == "zfs_ram":
            systems.append(ZfsRam(path, fs_size, args.zfs_ram_options))
        elif name == "zfs_ram_ref":
            systems.append(
                ZfsRamReference(path, fs_size, args.zfs_ram_options, tool=args.reference_tool)
            )
        else:
            systems.append(ZramExt4(path, fs_size))
    return systems


def run_phase(job: Job, system: System, phase: str, rep: int, prewarm: bool) -> Sample:
    root = system.path / "job"
    if phase in PREPARE:
        PREPARE[phase](job, root)
    system.settle()
    if prewarm:
        warm_memory(PREWARM_FACTOR * job.tree.size_bytes)
    probe = RequestProbe(system) if isinstance(system, ZfsRam) else None
    if probe is not None:
        probe.begin()
    start = time.perf_counter()
    check = PHASE_FUNCS[phase](job, root)
    seconds = time.perf_counter() - start
    requests = probe.end() if probe is not None else None
    return Sample(rep, system.name, phase, seconds, check, requests)


def clean(system: System) -> None:
    """Remove what a failed phase left of the job (best effort)."""
    shutil.rmtree(system.path / "job", ignore_errors=True)


def run_job(args: argparse.Namespace, argv: list[str]) -> Report:
    gcc = shutil.which("gcc")
    size_mib = QUICK_SIZE_MIB if args.quick else args.size_mib
    tree = build_tree(size_mib, gcc)
    job = Job(
        tree=tree,
        python=sys.executable,
        gcc=gcc,
        transactions=QUICK_TRANSACTIONS if args.quick else TRANSACTIONS,
        c_files=QUICK_C_FILES if args.quick else C_FILES,
    )
    phases = [p for p in PHASES if p != "gcc" or gcc]
    extra = {
        "tree_files": tree.files,
        "tree_mib": round(tree.size_bytes / MIB, 1),
        "tarball": str(tree.tarball),
        "transactions": job.transactions,
        "c_files": job.c_files if gcc else 0,
        "zfs_ram_options": args.zfs_ram_options,
        "prewarm": not args.no_prewarm,
    }
    report = Report(env=describe_run("ci_job.py", argv, extra), systems=[], phases=phases)
    if not gcc:
        report.skipped["gcc"] = "gcc not found"
    fs_size = max(FS_MIN, FS_FACTOR * tree.size_bytes)
    root = Path(tempfile.mkdtemp(prefix="ci_job-"))
    systems: list[System] = []
    try:
        systems = make_systems(args, root, fs_size, report)
        report.systems = [s.name for s in systems]
        for system in systems:
            log(f"mounting {system.name} at {system.path}")
            system.mount()
        for rep in range(args.reps):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            failed: set[str] = set()
            for phase in phases:
                for system in order:
                    if system.name in failed:
                        continue
                    try:
                        sample = run_phase(job, system, phase, rep, not args.no_prewarm)
                    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
                        # One failing system must not end the run: record it, skip the rest of
                        # its job in this repetition, clean up.
                        log(f"rep {rep} {system.name} {phase} FAILED: {error}")
                        report.errors.append(f"rep {rep} {system.name} {phase}: {error}")
                        failed.add(system.name)
                        clean(system)
                        continue
                    report.samples.append(sample)
                    total = sum(v["count"] for v in (sample.requests or {}).values())
                    shown = f", {total:.0f} requests" if sample.requests is not None else ""
                    log(f"rep {rep} {system.name:<8} {phase:<11} {sample.seconds:8.3f} s{shown}")
    finally:
        for system in reversed(systems):
            try:
                system.unmount()
            except Exception as error:  # keep unmounting the others
                log(f"unmounting {system.name} failed: {error}")
        for system in systems:
            if is_mounted(system.path):
                log(f"WARNING: {system.path} is still mounted")
                report.errors.append(f"{system.path} is still mounted")
        with contextlib.suppress(OSError):
            for entry in root.iterdir():
                if not is_mounted(entry):
                    shutil.rmtree(entry, ignore_errors=True)
            root.rmdir()
    return report


# -- reporting --------------------------------------------------------------------------------


def _seconds(report: Report, system: str, phase: str) -> dict[int, float]:
    return {s.rep: s.seconds for s in report.samples if s.system == system and s.phase == phase}


def _totals(report: Report, system: str) -> dict[int, float]:
    """The whole job's seconds per repetition, for repetitions in which every phase ran."""
    by_rep: dict[int, list[float]] = {}
    for s in report.samples:
        if s.system == system:
            by_rep.setdefault(s.rep, []).append(s.seconds)
    return {rep: sum(v) for rep, v in by_rep.items() if len(v) == len(report.phases)}


def _median_and_ratio(
    mine: dict[int, float], tmpfs: dict[int, float]
) -> tuple[float | None, float | None]:
    """The median seconds, and the median of the per-repetition ratios to tmpfs."""
    median = statistics.median(mine.values()) if mine else None
    ratios = [mine[r] / tmpfs[r] for r in mine if r in tmpfs and tmpfs[r] > 0]
    return median, statistics.median(ratios) if ratios else None


def summary(report: Report) -> dict[str, dict[str, dict[str, float | None]]]:
    """{phase or "total": {system: {"seconds": median, "x_tmpfs": median ratio}}}."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for phase in [*report.phases, "total"]:
        tmpfs = _totals(report, "tmpfs") if phase == "total" else _seconds(report, "tmpfs", phase)
        row: dict[str, dict[str, float | None]] = {}
        for system in report.systems:
            mine = _totals(report, system) if phase == "total" else _seconds(report, system, phase)
            median, ratio = _median_and_ratio(mine, tmpfs)
            row[system] = {"seconds": median, "x_tmpfs": ratio}
        out[phase] = row
    return out


def request_medians(report: Report, system: str = "zfs_ram") -> dict[str, Requests]:
    """A zfs_ram's requests per phase (and "total"): the median over repetitions per opcode."""
    per_phase: dict[str, list[Requests]] = {}
    per_rep_total: dict[int, Requests] = {}
    for s in report.samples:
        if s.system == system and s.requests is not None:
            per_phase.setdefault(s.phase, []).append(s.requests)
            per_rep_total[s.rep] = _plus(per_rep_total.get(s.rep, {}), s.requests)
    per_phase["total"] = list(per_rep_total.values())
    out: dict[str, Requests] = {}
    for phase, runs in per_phase.items():
        opcodes = sorted({op for r in runs for op in r})
        out[phase] = {
            op: {
                key: statistics.median(r.get(op, {}).get(key, 0) for r in runs)
                for key in ("count", "seconds")
            }
            for op in opcodes
        }
    return out


def _count(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"


def _against_reference(report: Report) -> list[str]:
    """zfs_ram / zfs_ram_ref per phase (--reference-tool): the median of the per-repetition
    ratios of seconds, and each build's median requests."""
    lines = [
        "",
        "against the reference build (--reference-tool): median (range) of per-repetition "
        "ratios of seconds; requests",
    ]
    mine_requests, ref_requests = request_medians(report), request_medians(report, "zfs_ram_ref")
    for phase in [*report.phases, "total"]:
        if phase == "total":
            mine, ref = _totals(report, "zfs_ram"), _totals(report, "zfs_ram_ref")
        else:
            mine = _seconds(report, "zfs_ram", phase)
            ref = _seconds(report, "zfs_ram_ref", phase)
        ratios = [mine[r] / ref[r] for r in mine if r in ref and ref[r] > 0]
        counts = [
            _count(sum(v["count"] for v in table.get(phase, {}).values()))
            for table in (mine_requests, ref_requests)
        ]
        text = f"{phase:<12}"
        text += (
            f"{statistics.median(ratios):>6.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            if ratios
            else f"{'-':>6}"
        )
        lines.append(f"{text:<32}requests {counts[0]} / {counts[1]}")
    return lines


def render(report: Report) -> str:
    env = report.env
    lines = [
        f"ci_job {env['date']} on {env['host']}: {env['cpu']}, {env['mem_gib']} GiB, "
        f"Linux {env['kernel']}, Python {env['python']}, zfs_ram {env['commit']}",
        f"command: {env['command']}",
        f"tree: {env['tree_mib']} MiB in {env['tree_files']} files ({env['tarball']}); sqlite: "
        f"{env['transactions']} transactions; gcc: {env['c_files']} files and a main",
        f"zfs_ram mount options: {env['zfs_ram_options'] or '(defaults)'}; guest memory warmed "
        f"before each phase: {'yes' if env['prewarm'] else 'no (--no-prewarm)'}",
    ]
    lines += [f"skipped {what}: {why}" for what, why in report.skipped.items()]
    lines.append("")
    table = summary(report)
    head = f"{'phase':<12}" + "".join(
        f"{name + ' s':>12}" + ("" if name == "tmpfs" else f"{'x tmpfs':>9}")
        for name in report.systems
    )
    lines += [head, "-" * len(head)]
    for phase, row in table.items():
        text = f"{phase:<12}"
        for name in report.systems:
            seconds, ratio = row[name]["seconds"], row[name]["x_tmpfs"]
            text += f"{seconds:>12.3f}" if seconds is not None else f"{'-':>12}"
            if name != "tmpfs":
                text += f"{ratio:>9.2f}" if ratio is not None else f"{'-':>9}"
        lines.append(text)
    if "zfs_ram_ref" in report.systems:
        lines += _against_reference(report)
    requests = request_medians(report)
    if requests:
        lines += [
            "",
            "zfs_ram FUSE requests per phase (medians over repetitions; handler s: time inside "
            "zfs_ram's handlers)",
        ]
        head = f"{'phase':<12}{'requests':>10}{'handler s':>11}  top opcodes"
        lines += [head, "-" * 100]
        for phase in [*report.phases, "total"]:
            if phase not in requests:
                continue
            ops = requests[phase]
            total = sum(v["count"] for v in ops.values())
            handler = sum(v["seconds"] for v in ops.values())
            top = sorted(ops.items(), key=lambda kv: -kv[1]["count"])[:6]
            listed = ", ".join(f"{op} {_count(v['count'])}" for op, v in top)
            lines.append(f"{phase:<12}{_count(total):>10}{handler:>11.2f}  {listed}")
    checks: dict[tuple[int, str], set[str]] = {}
    for s in report.samples:
        if s.check is not None:
            checks.setdefault((s.rep, s.phase), set()).add(s.check)
    for (rep, phase), seen in sorted(checks.items()):
        if len(seen) > 1:
            lines.append(f"WARNING: rep {rep} {phase} differs between systems: {sorted(seen)}")
    lines.append("")
    lines += [f"FAILED: {e}" for e in report.errors]
    lines.append(
        "seconds: medians over repetitions; x tmpfs: median of the per-repetition ratios to "
        "tmpfs; total: the whole job"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description="a CI job's scratch work on tmpfs, zfs_ram and zram+ext4",
        epilog="Needs root (tmpfs and zram mounts).",
    )
    parser.add_argument(
        "--reps", type=int, help=f"repetitions (default {DEFAULT_REPS}; 1 with --quick)"
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=SYSTEMS,
        help="the systems to run (default tmpfs, zfs_ram and zram; zram+ext4 only as root where "
        "zram exists; zfs_ram_ref with --reference-tool)",
    )
    parser.add_argument(
        "--reference-tool",
        help="the zfs-ram of another checkout (e.g. /work/ref/.venv/bin/zfs-ram): mounted as "
        "zfs_ram_ref beside this one, and zfs_ram / zfs_ram_ref reported per phase",
    )
    parser.add_argument(
        "--zfs-ram-options", default="", help="extra zfs-ram mount options, e.g. noxattr"
    )
    parser.add_argument(
        "--size-mib",
        type=int,
        default=DEFAULT_SIZE_MIB,
        help=f"size of the source tree in MiB (default {DEFAULT_SIZE_MIB})",
    )
    parser.add_argument("--json", type=Path, help="write the samples and the summary here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a {QUICK_SIZE_MIB} MiB tree, {QUICK_TRANSACTIONS} transactions, 1 rep: a smoke run",
    )
    parser.add_argument(
        "--no-prewarm", action="store_true", help="do not warm guest memory before each phase"
    )
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else DEFAULT_REPS
    if args.reps < 1 or args.size_mib < 1:
        parser.error("--reps and --size-mib must be at least 1")
    if args.systems is None:
        args.systems = [*DEFAULT_SYSTEMS, *(["zfs_ram_ref"] if args.reference_tool else [])]
    if "zfs_ram_ref" in args.systems and not args.reference_tool:
        parser.error("zfs_ram_ref needs --reference-tool")
    if "tmpfs" not in args.systems:
        parser.error("tmpfs is the reference of every ratio: keep it in --systems")
    if os.geteuid() != 0:
        parser.error("must run as root (mount -t tmpfs, zram)")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally that unmounts

    signal.signal(signal.SIGTERM, on_term)
    report = run_job(args, argv)
    print(render(report))
    if args.json:
        payload = asdict(report)
        payload["summary"] = summary(report)
        payload["requests"] = request_medians(report)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
